//! import vz: OpenVZ CTs onto this host, with the report of what each setting became.

use std::io::IsTerminal;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

use berth::datapath::{ClassEntry, Datapath, DatapathView, parse_networks_classes};
use berth_runtime::vzimport::{self, CopyStats, FilesFrom, ImportRun, MapOpts, Node, Plan};
use serde_json::{Value, json};

use crate::Ctx;
use crate::cli::VzImportArgs;

/// What the import does with the node's `networks_classes`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClassAction {
    /// This host has no class table: the node's becomes it.
    Load,
    /// This host's table is the node's already.
    Unchanged,
    /// They differ and --replace-classes was given.
    Replace,
}

struct Classes {
    path: PathBuf,
    entries: Vec<ClassEntry>,
    action: ClassAction,
}

impl Classes {
    fn rule(&self, dry_run: bool) -> String {
        let n = self.entries.len();
        let p = self.path.display();
        let (done, todo) = match self.action {
            ClassAction::Load => ("loaded into", "would be loaded into"),
            ClassAction::Replace => ("replaced", "would replace"),
            ClassAction::Unchanged => {
                return format!("{n} entries of {p}: the same as this host's class table");
            }
        };
        let verb = if dry_run { todo } else { done };
        if self.action == ClassAction::Load {
            format!("{n} entries of {p} {verb} this host's empty class table")
        } else {
            format!("{n} entries of {p}: {verb} this host's class table (--replace-classes)")
        }
    }

    fn json(&self, dry_run: bool) -> Value {
        json!({
            "path": self.path,
            "entries": self.entries.len(),
            "verdict": "MAP",
            "action": match self.action {
                ClassAction::Load => "load",
                ClassAction::Unchanged => "unchanged",
                ClassAction::Replace => "replace",
            },
            "applied": !dry_run && self.action != ClassAction::Unchanged,
            "rule": self.rule(dry_run),
        })
    }
}

/// One entry per prefix, host bits cleared and in order, as the class table holds them.
fn normalized(entries: &[ClassEntry]) -> Vec<ClassEntry> {
    let mut v: Vec<ClassEntry> = entries
        .iter()
        .map(|e| ClassEntry {
            class: e.class,
            net: e.net.trunc(),
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Decides what to do with the node's classes before anything is imported, so a conflict
/// refuses the whole import with nothing changed.
fn plan_classes(
    ctx: &Ctx,
    path: &Path,
    entries: Vec<ClassEntry>,
    replace: bool,
) -> Result<Classes> {
    let read = || -> Result<Vec<ClassEntry>> {
        Ok(match DatapathView::open_pinned(&ctx.pin_dir)? {
            Some(dp) => dp.classes()?,
            None => Vec::new(),
        })
    };
    let current = read().with_context(|| {
        format!(
            "read this host's class table, to compare it with {}",
            path.display()
        )
    })?;
    let action = if current.is_empty() {
        ClassAction::Load
    } else if normalized(&current) == normalized(&entries) {
        ClassAction::Unchanged
    } else if replace {
        ClassAction::Replace
    } else {
        bail!(
            "the node's network classes ({}, {} entries) differ from this host's class table ({} entries, `berth netclass list`): give --replace-classes to replace this host's table with the node's, or make them the same first",
            path.display(),
            entries.len(),
            current.len()
        );
    };
    Ok(Classes {
        path: path.to_path_buf(),
        entries,
        action,
    })
}

fn plan_json(p: &Plan, imported: bool) -> Result<Value> {
    Ok(json!({
        "ctid": p.ctid(),
        "config_file": p.config,
        "files": p.files,
        "imported": imported,
        "items": p.mapped.report.items,
        "warnings": p.mapped.report.warnings,
        "scripts": p.mapped.report.scripts,
        "config": serde_json::to_value(&p.mapped.cfg)?,
    }))
}

fn print_plan(p: &Plan) {
    let r = &p.mapped.report;
    let files = match &p.files {
        FilesFrom::Simfs(d) => format!("simfs {}", d.display()),
        FilesFrom::Archive(a) => format!("archive {}", a.display()),
        FilesFrom::Ploop(i) => format!("ploop image {}", i.display()),
    };
    println!("CT {} (config {}, files {files})", r.ctid, p.config);
    println!(
        "  {:<14} {:<7} {:<38} RULE / REASON",
        "KEY", "VERDICT", "BECOMES"
    );
    for i in &r.items {
        println!(
            "  {:<14} {:<7} {:<38} {}{}",
            i.key,
            i.verdict.to_string(),
            i.target.as_deref().unwrap_or("-"),
            i.rule,
            if i.matters {
                " [matters: --strict refuses]"
            } else {
                ""
            }
        );
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
}

pub fn vz(ctx: &Ctx, a: &VzImportArgs) -> Result<()> {
    let opts = MapOpts {
        source_cpus: a.source_cpus,
        resolv_conf: Some(a.resolv_conf.clone()),
    };
    let node = if a.archive.is_some() && !a.conf_dir.is_dir() {
        Node::bare(a.vz_conf.as_deref())?
    } else {
        Node::open(&a.conf_dir, a.vz_conf.as_deref())?
    };
    let ctids: Vec<u32> = if a.target == "all" {
        if a.archive.is_some() || a.private.is_some() {
            bail!("--archive and --private name one CT's files: give its CTID, not `all`");
        }
        node.ctids()?
    } else {
        vec![
            a.target
                .parse()
                .with_context(|| format!("{:?} is neither a CTID nor `all`", a.target))?,
        ]
    };
    // Every CT is planned (read, mapped, checked) before the first is made.
    let mut plans = Vec::new();
    for &c in &ctids {
        let p = match &a.archive {
            Some(ar) => vzimport::plan_archive(&node, c, ar, &opts, a.strict),
            None => vzimport::plan(&node, c, a.private.as_deref(), &opts, a.strict),
        };
        plans.push(p.with_context(|| format!("OpenVZ CT {c}"))?);
    }
    let classes = match &node.classes {
        Some((path, text)) => {
            let entries =
                parse_networks_classes(text).with_context(|| format!("{}", path.display()))?;
            Some(plan_classes(ctx, path, entries, a.replace_classes)?)
        }
        None => None,
    };
    let mut imported = Vec::new();
    if !a.dry_run {
        let tty = std::io::stderr().is_terminal();
        for p in &plans {
            let mut bar = |s: CopyStats| {
                if tty && s.entries.is_multiple_of(256) {
                    eprint!(
                        "\r  CT {}: {} entries, {} MiB",
                        p.ctid(),
                        s.entries,
                        s.bytes >> 20
                    );
                }
            };
            let run = ImportRun {
                privileged: a.privileged,
                progress: Some(&mut bar),
            };
            vzimport::import(&ctx.host, p, run)
                .with_context(|| format!("import OpenVZ CT {}", p.ctid()))?;
            if tty {
                eprintln!();
            }
            imported.push(p.ctid());
        }
        if let Some(c) = &classes
            && c.action != ClassAction::Unchanged
        {
            let mut dp = Datapath::open_or_load(&ctx.pin_dir)?;
            dp.load_classes(&c.entries).with_context(|| {
                format!("load the node's network classes from {}", c.path.display())
            })?;
        }
        if a.privileged && !plans.is_empty() {
            eprintln!(
                "berth: warning: imported CTs are privileged: their root is root on the host. Privileged CTs are for trusted workloads only."
            );
        }
    }
    let v = json!({
        "dry_run": a.dry_run,
        "cts": plans.iter().map(|p| plan_json(p, imported.contains(&p.ctid()))).collect::<Result<Vec<_>>>()?,
        "networks_classes": classes.as_ref().map(|c| c.json(a.dry_run)),
    });
    ctx.print(v, || {
        for p in &plans {
            print_plan(p);
            if imported.contains(&p.ctid()) {
                println!("  imported as CT {}", p.ctid());
            }
        }
        if let Some(c) = &classes {
            println!("networks_classes: {}", c.rule(a.dry_run));
        }
        if a.dry_run {
            println!("dry run: nothing changed");
        }
    });
    Ok(())
}
