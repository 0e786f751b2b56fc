//! Part 1: unprivileged `create` from the Debian template. Each create is one whole `berth create`
//! process; its new disk is what the whole berth root grows by across it (private area, config
//! and anything else berth writes there; the run dir is tmpfs), measured by walking the root
//! before and after, next to the du of the CT's private area alone.

use anyhow::{Context, Result};

use super::{Templates, UNPRIVILEGED, bytes, ct_kind, disk_usage, settle, timed};
use crate::start::{Install, quiet};
use crate::stats::{ms, quantile, summarize};

const TEMPLATE: &str = "debian";

/// Free space the benchmark leaves on the root's filesystem when it keeps every CT it created.
const FREE_RESERVE: u64 = 10 << 30;

pub(super) fn run(inst: &Install, templates: &Templates<'_>, creates: usize) -> Result<()> {
    println!("create: unprivileged create from the Debian 12 template ({creates} creates)");
    templates.provide(inst, TEMPLATE, &[])?;
    settle(&inst.root)?;
    let tpl_size = disk_usage(&inst.root.join("template").join(TEMPLATE))?;
    println!("  template {TEMPLATE}: {} on disk", bytes(tpl_size));

    let mut times = Vec::with_capacity(creates);
    let mut new_disk = Vec::with_capacity(creates);
    let mut private = Vec::with_capacity(creates);
    let mut kept = Vec::new();
    let mut destroy_each = false;
    let mut userns = true;
    let mut layouts = std::collections::BTreeSet::new();
    let mut before = disk_usage(&inst.root)?;
    for i in 0..creates {
        let ctid = (3000 + i).to_string();
        let mut args = vec!["create", &ctid, "--template", TEMPLATE];
        args.extend_from_slice(UNPRIVILEGED);
        times.push(timed(&mut inst.cmd(&args)).with_context(|| format!("create CT {ctid}"))?);
        let (u, layout) = ct_kind(inst, &ctid)?;
        userns &= u;
        layouts.insert(layout);
        private.push(disk_usage(&inst.root.join("private").join(&ctid))?);
        let after = disk_usage(&inst.root)?;
        let grew = after.saturating_sub(before);
        new_disk.push(grew);
        // Every CT stays until the last is measured, as on a node. Only where that would
        // fill the disk is each destroyed after it is measured — and then the next create
        // pays for it: journal-less ext4 (this VM's root) skips inodes freed within
        // dirty_expire_centisecs (30 s) when it allocates one (ext4_new_inode →
        // recently_deleted, reading each candidate's inode table block), so after a destroy
        // of a 190 MiB copy every new inode costs a scan over the ~7k just freed.
        if i == 0 && grew.saturating_mul(creates as u64) + FREE_RESERVE > free_space(&inst.root)? {
            destroy_each = true;
            println!(
                "  note: the first CT added {}: each CT is destroyed after it is measured \
                 (so {creates} of them do not fill the disk), which slows the next create \
                 on journal-less ext4",
                bytes(grew)
            );
        }
        // The next CT is measured against the root as it was before this one: whatever a
        // destroy leaves behind counts against it.
        if destroy_each {
            quiet(&mut inst.cmd(&["destroy", &ctid]))?;
            settle(&inst.root)?;
        } else {
            before = after;
            kept.push(ctid);
        }
    }
    for ctid in &kept {
        quiet(&mut inst.cmd(&["destroy", ctid]))?;
    }

    let t = summarize(times);
    let (max_at, disk_max) = new_disk
        .iter()
        .copied()
        .enumerate()
        .max_by_key(|&(_, b)| b)
        .expect("at least one create");
    new_disk.sort_unstable();
    private.sort_unstable();
    println!(
        "  CTs have a user namespace ([userns] in their config): {}; private area layout: {}",
        if userns {
            "yes, all"
        } else {
            "NO (not unprivileged: the numbers below are not the bar's)"
        },
        layouts.into_iter().collect::<Vec<_>>().join(", ")
    );
    println!(
        "  wall per create: p50 {:.2} ms  p90 {:.2} ms  (min {:.2}, max {:.2}){}",
        ms(t.p50),
        ms(t.p90),
        ms(t.min),
        ms(t.max),
        if destroy_each {
            ""
        } else {
            "  [earlier CTs kept]"
        }
    );
    println!(
        "  new disk per CT (berth root grew by): p50 {}  max {} (create {} of {creates})  ({} B / {} B); private area alone: p50 {}",
        bytes(quantile(&new_disk, 0.5)),
        bytes(disk_max),
        max_at + 1,
        quantile(&new_disk, 0.5),
        disk_max,
        bytes(quantile(&private, 0.5)),
    );
    println!(
        "  bar: p50 <= 50 ms: {}; new disk <= 1 MB (every CT): {}",
        crate::verdict(userns && ms(t.p50) <= 50.0),
        crate::verdict(userns && disk_max <= 1_000_000)
    );
    Ok(())
}

/// Bytes available to root on the filesystem holding `path`.
fn free_space(path: &std::path::Path) -> Result<u64> {
    let st =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(st.blocks_free() * st.fragment_size())
}
