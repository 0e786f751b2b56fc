//! `bench isolation`: the bars of issue 12 for unprivileged CTs, each against what the bar names,
//! in one run of the release `berth` (whole CLI processes, as a hoster's panel drives it):
//!
//! 1. `create` from the Debian template: wall time per create and the new disk per CT (what the
//!    berth root grows by, private area and config included);
//! 2. busybox create → start → stop --fast → destroy, against crun with a user namespace on a
//!    chowned copy of the same rootfs (create → start → kill → delete), interleaved ABAB;
//! 3. a Debian 12 systemd CT: start until `systemctl is-system-running` says `running`, and a
//!    graceful stop — or "not measurable" with the reason while this build cannot boot one.
//!
//! The Debian templates are built by this run's berth with debootstrap into the benchmark's
//! throwaway root (~1 min each, from the machine's default mirror or `--mirror`), or copied from
//! `--template-cache DIR`, a berth root holding only templates, which the first run with that DIR
//! fills by the same build. A cached template is what the berth that built it made; the output
//! says when and how it was built; delete DIR to rebuild.

mod create;
mod cycle;
mod systemd;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::start::{Install, quiet};

/// What `berth create` needs to make an unprivileged CT (own user namespace, 65536 ids): none,
/// since that is the default.
pub(super) const UNPRIVILEGED: &[&str] = &[];

#[derive(Args)]
pub struct IsolationArgs {
    /// Creates from the Debian template (the bar wants at least 20).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    creates: u64,
    /// Rounds of the busybox cycle, each giving one berth/crun ratio (spread over at least 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// berth and crun cycles per round, interleaved ABAB (after 2 warm-up cycles of each).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    cycles: u64,
    /// Boots of the systemd CT (start → running, then stop), once systemd boots unprivileged.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    systemd_boots: u64,
    /// A berth root holding the Debian templates between runs: built there on first use,
    /// copied from there afterwards (the copy is not measured).
    #[arg(long)]
    template_cache: Option<PathBuf>,
    /// Run only these parts (comma-separated: create, cycle, systemd); default all three.
    #[arg(long, value_delimiter = ',', default_value = "create,cycle,systemd")]
    only: Vec<Part>,
    /// Debian mirror for debootstrap (default: debootstrap's, deb.debian.org, as apt uses here).
    #[arg(long)]
    mirror: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Create,
    Cycle,
    Systemd,
}

pub fn run(a: &IsolationArgs) -> Result<()> {
    crate::require_root(
        "isolation",
        "namespaces, cgroups, mounts, chown of the crun rootfs",
    )?;
    crate::require_tool("debootstrap", "xtask/setup.sh installs it")?;
    let bin = berth_tests::ct::bin_dir().join("berth");
    if !bin.exists() {
        bail!(
            "{} missing: `cargo xtask bench isolation` builds it (or set BERTH_BIN_DIR)",
            bin.display()
        );
    }
    let crun =
        crate::start::which("crun").context("crun not installed (xtask/setup.sh installs it)")?;
    if let Some(m) = &a.mirror
        && (m.is_empty() || m.starts_with('-') || m.chars().any(char::is_whitespace))
    {
        bail!("--mirror {m:?}: not a mirror URL (e.g. http://deb.debian.org/debian)");
    }
    if let Some(dir) = &a.template_cache
        && dir.exists()
        && !dir.is_dir()
    {
        bail!("--template-cache {}: not a directory", dir.display());
    }
    // Beside the default root (/var/lib/berth), not in /tmp: on this VM's ext4 a symlink took
    // 130-800 µs in a fresh directory under /tmp (a block group other tests churn) and 13-30 µs
    // under /var/lib or /var/tmp, and a create that copies is hundreds of such operations.
    let tmp = PathBuf::from(format!("/var/lib/berth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let inst = Install::new(&bin, &tmp, "");
    let res = run_all(a, &inst, &crun, &tmp);
    // CTs a failed step left behind (running or not), before their root goes.
    if let Ok(d) = std::fs::read_dir(inst.root.join("conf")) {
        for e in d.flatten() {
            if let Some(ctid) = e.file_name().to_string_lossy().strip_suffix(".toml") {
                let _ = quiet(&mut inst.cmd(&["stop", "--fast", ctid]));
                let _ = quiet(&mut inst.cmd(&["destroy", ctid]));
            }
        }
    }
    inst.cleanup();
    let _ = std::fs::remove_dir_all(&tmp);
    res
}

fn run_all(a: &IsolationArgs, inst: &Install, crun: &Path, tmp: &Path) -> Result<()> {
    println!(
        "bench isolation: unprivileged CTs = `berth create <CTID> {}` (berth {}, root {})",
        UNPRIVILEGED.join(" "),
        inst.bin.display(),
        inst.root.display()
    );
    let templates = Templates {
        cache: a.template_cache.as_deref(),
        mirror: a.mirror.as_deref(),
    };
    // The creates last: today each is a full copy of the Debian template, and the ~150k
    // inodes freed when those CTs are destroyed slow every inode allocation on this
    // filesystem for the next 30 s (see `create`), which would land on the other parts.
    if a.only.contains(&Part::Cycle) {
        settle(tmp)?;
        cycle::run(
            inst,
            crun,
            tmp,
            usize::try_from(a.rounds)?,
            usize::try_from(a.cycles)?,
        )?;
    }
    if a.only.contains(&Part::Systemd) {
        settle(tmp)?;
        systemd::run(inst, &templates, usize::try_from(a.systemd_boots)?);
    }
    if a.only.contains(&Part::Create) {
        settle(tmp)?;
        create::run(inst, &templates, usize::try_from(a.creates)?)?;
    }
    Ok(())
}

/// Where the Debian templates come from: built by this run, or copied from a cache root.
pub(super) struct Templates<'a> {
    cache: Option<&'a Path>,
    mirror: Option<&'a str>,
}

impl Templates<'_> {
    /// Makes template `name` (`berth template build debian --name <name> <extra>`) available in
    /// `inst`'s root and prints where it came from.
    pub(super) fn provide(&self, inst: &Install, name: &str, extra: &[&str]) -> Result<()> {
        let mut args = vec!["template", "build", "debian", "--name", name];
        args.extend_from_slice(extra);
        if let Some(m) = self.mirror {
            args.extend(["--mirror", m]);
        }
        let Some(cache) = self.cache else {
            let t0 = Instant::now();
            quiet(&mut inst.cmd(&args)).with_context(|| format!("build template {name}"))?;
            println!(
                "  template {name}: built in this run in {:.0} s (`berth {}`)",
                t0.elapsed().as_secs_f64(),
                args.join(" ")
            );
            return Ok(());
        };
        let cached = cache.join("template").join(name);
        if !cached
            .join(berth_runtime::template::METADATA_FILE)
            .is_file()
        {
            std::fs::create_dir_all(cache)
                .with_context(|| format!("create --template-cache {}", cache.display()))?;
            let t0 = Instant::now();
            let mut cmd = Command::new(&inst.bin);
            cmd.arg("--root")
                .arg(cache)
                .arg("--run-dir")
                .arg(cache.join("run"))
                .args(&args);
            quiet(&mut cmd).with_context(|| format!("build template {name} into the cache"))?;
            println!(
                "  template {name}: built into {} in {:.0} s (`berth {}`)",
                cache.display(),
                t0.elapsed().as_secs_f64(),
                args.join(" ")
            );
        }
        let meta = std::fs::read_to_string(cached.join(berth_runtime::template::METADATA_FILE))?;
        let field = |k: &str| {
            meta.lines()
                .find_map(|l| l.strip_prefix(k)?.trim_start().strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_owned())
                .unwrap_or_default()
        };
        let age = field("created")
            .parse::<u64>()
            .ok()
            .and_then(|c| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?;
                Some(now.as_secs().saturating_sub(c))
            })
            .map_or_else(|| "?".to_owned(), |s| format!("{:.1} h", s as f64 / 3600.0));
        println!(
            "  template {name}: copied from {} (built {age} ago: {})",
            cache.display(),
            field("source")
        );
        let store = inst.root.join("template");
        std::fs::create_dir_all(&store)?;
        quiet(
            Command::new("cp")
                .arg("-a")
                .arg(&cached)
                .arg(store.join(name)),
        )
        .with_context(|| format!("copy cached template {name}"))
    }
}

/// Flushes the filesystem holding `path` (syncfs), outside any timing, so that the writeback of
/// what a previous step wrote or removed (190 MiB per Debian copy; the root is mounted with
/// `discard` here) is not paid by whatever the next step times.
pub(super) fn settle(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncfs {}", path.display()));
    }
    Ok(())
}

/// stdout of a command that must succeed (stderr in the error).
pub(super) fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Wall time of a command that must succeed.
pub(super) fn timed(cmd: &mut Command) -> Result<Duration> {
    let t0 = Instant::now();
    quiet(cmd)?;
    Ok(t0.elapsed())
}

/// Bytes allocated below `path` (`du -sx --block-size=1`): st_blocks of every entry on the same
/// filesystem, each inode once.
pub(super) fn disk_usage(path: &Path) -> Result<u64> {
    fn walk(
        p: &Path,
        dev: u64,
        seen: &mut std::collections::HashSet<u64>,
        total: &mut u64,
    ) -> Result<()> {
        let m = std::fs::symlink_metadata(p).with_context(|| format!("stat {}", p.display()))?;
        if m.dev() != dev || (m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino())) {
            return Ok(());
        }
        *total += m.blocks() * 512;
        if m.is_dir() {
            for e in std::fs::read_dir(p).with_context(|| format!("read {}", p.display()))? {
                walk(&e?.path(), dev, seen, total)?;
            }
        }
        Ok(())
    }
    let dev = std::fs::symlink_metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    let mut total = 0;
    walk(path, dev, &mut Default::default(), &mut total)?;
    Ok(total)
}

/// What CT `ctid`'s config says about its isolation: whether it has a user namespace
/// (`[userns]`) and its private area's `layout` (copy or overlay).
pub(super) fn ct_kind(inst: &Install, ctid: &str) -> Result<(bool, String)> {
    let p = inst.root.join("conf").join(format!("{ctid}.toml"));
    let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
    let userns = text.lines().any(|l| l.trim() == "[userns]");
    let layout = text
        .lines()
        .find_map(|l| l.strip_prefix("layout")?.trim_start().strip_prefix('='))
        .map_or("copy (the default)", |v| v.trim().trim_matches('"'))
        .to_owned();
    Ok((userns, layout))
}

/// "1.23 MB" style.
pub(super) fn bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}
