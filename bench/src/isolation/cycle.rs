//! Part 2: unprivileged busybox create → start → stop --fast → destroy, against crun with a user
//! namespace: create → start → kill KILL → delete of the same busybox rootfs, copied once and
//! chowned to [`CRUN_BASE`] (crun has no template store: its copy is made before the timed
//! cycles, whatever berth's create has to do is timed). Not an idmapped mount: crun 1.8.1's
//! experimental `idmap` option is for entries of config.json's `mounts`, not for the root, and
//! a copy made once is the cheapest per-cycle setup crun can have. The same seven namespaces on both
//! sides. Cycles alternate berth, crun, berth, crun… so both see the same machine noise, in
//! rounds that each give one ratio of medians.
//!
//! crun 1.8 refuses this hybrid host ("cgroups in hybrid mode not supported"), so each crun
//! command runs in a mount namespace whose /sys/fs/cgroup shows only the v1 hierarchies (see
//! `start::hide_unified_cgroup2`), entered with setns between fork and exec; berth runs in the
//! host's mount namespace as in production. Both then manage v1 cgroups.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::{UNPRIVILEGED, ct_kind, output, timed};
use crate::start::{Install, hide_unified_cgroup2, quiet};
use crate::stats::{ms, quantile, summarize};

/// First host id of crun's container (ids 0..65536 map to CRUN_BASE..), away from berth's
/// ranges for the CTIDs this benchmark uses.
const CRUN_BASE: u32 = 3_000_000_000;
const IDS: u32 = 65_536;
const WARMUP: usize = 2;
const NAMESPACES: [&str; 7] = ["pid", "mnt", "uts", "ipc", "net", "user", "cgroup"];

struct Crun {
    bin: PathBuf,
    state: PathBuf,
    bundle: PathBuf,
    mnt_ns: OwnedFd,
}

impl Crun {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root")
            .arg(&self.state)
            .arg("--cgroup-manager=cgroupfs")
            .args(args);
        let ns = self.mnt_ns.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe and the closure touches nothing else. It also
        // moves root and cwd to the namespace's root; every path given to crun is absolute.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(ns, libc::CLONE_NEWNS) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        c
    }

    fn create(&self, id: &str) -> Result<()> {
        quiet(self.cmd(&["create", "--bundle"]).arg(&self.bundle).arg(id))
    }

    fn remove(&self, id: &str) -> Result<()> {
        quiet(&mut self.cmd(&["kill", id, "KILL"]))?;
        quiet(&mut self.cmd(&["delete", "--force", id]))
    }

    /// create → start → kill → delete: the time of each.
    fn cycle(&self, id: &str) -> Result<Phases> {
        Ok([
            timed(self.cmd(&["create", "--bundle"]).arg(&self.bundle).arg(id))?,
            timed(&mut self.cmd(&["start", id]))?,
            timed(&mut self.cmd(&["kill", id, "KILL"]))?,
            timed(&mut self.cmd(&["delete", "--force", id]))?,
        ])
    }

    fn pid(&self, id: &str) -> Result<i32> {
        let st: serde_json::Value = serde_json::from_str(&output(&mut self.cmd(&["state", id]))?)?;
        st["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .with_context(|| format!("crun state {id}: no pid in {st}"))
    }
}

impl Drop for Crun {
    /// Containers a failed cycle left behind, then the state directory.
    fn drop(&mut self) {
        if let Ok(d) = std::fs::read_dir(&self.state) {
            for e in d.flatten() {
                let _ =
                    quiet(&mut self.cmd(&["delete", "--force", &e.file_name().to_string_lossy()]));
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// The four commands of a cycle, each timed.
type Phases = [Duration; 4];

/// create → start → stop --fast → destroy: the time of each.
fn berth_cycle(inst: &Install, ctid: &str) -> Result<Phases> {
    let mut create = vec!["create", ctid, "--template", "busybox"];
    create.extend_from_slice(UNPRIVILEGED);
    Ok([
        timed(&mut inst.cmd(&create))?,
        timed(&mut inst.cmd(&["start", ctid]))?,
        timed(&mut inst.cmd(&["stop", "--fast", ctid]))?,
        timed(&mut inst.cmd(&["destroy", ctid]))?,
    ])
}

/// "create 1.2, start 3.4, …" (ms): the median of each command over all cycles.
fn phase_p50s(all: &[Phases], names: [&str; 4]) -> String {
    names
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let mut v: Vec<Duration> = all.iter().map(|p| p[k]).collect();
            v.sort_unstable();
            format!("{n} {:.2}", ms(quantile(&v, 0.5)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn run(
    inst: &Install,
    crun_bin: &Path,
    tmp: &Path,
    rounds: usize,
    cycles: usize,
) -> Result<()> {
    println!(
        "cycle: unprivileged busybox create→start→stop→destroy, berth vs crun with a user namespace \
         ({rounds} rounds × {cycles} cycles each, ABAB, after {WARMUP} warm-up cycles each)"
    );
    quiet(&mut inst.cmd(&["template", "build", "busybox"]))?;
    let crun = bundle(inst, crun_bin, tmp)?;
    describe(inst, &crun)?;
    super::settle(&inst.root)?;

    let mut b_all = Vec::with_capacity(rounds * cycles);
    let mut c_all = Vec::with_capacity(rounds * cycles);
    let mut per_round = Vec::with_capacity(rounds);
    let mut n = 0usize;
    let mut b_phases = Vec::with_capacity(rounds * cycles);
    let mut c_phases = Vec::with_capacity(rounds * cycles);
    let pair = |n: &mut usize| -> Result<(Phases, Phases)> {
        let ctid = (4000 + *n).to_string();
        let id = format!("bench{}-{n}", std::process::id());
        *n += 1;
        let b = berth_cycle(inst, &ctid).with_context(|| format!("berth cycle of CT {ctid}"))?;
        let c = crun
            .cycle(&id)
            .with_context(|| format!("crun cycle of {id}"))?;
        Ok((b, c))
    };
    for _ in 0..WARMUP {
        pair(&mut n)?;
    }
    for r in 0..rounds {
        let mut b = Vec::with_capacity(cycles);
        let mut c = Vec::with_capacity(cycles);
        for _ in 0..cycles {
            let (pb, pc) = pair(&mut n)?;
            b.push(pb.iter().sum());
            c.push(pc.iter().sum());
            b_phases.push(pb);
            c_phases.push(pc);
        }
        b_all.extend_from_slice(&b);
        c_all.extend_from_slice(&c);
        let (sb, sc) = (summarize(b), summarize(c));
        let ratio = ms(sb.p50) / ms(sc.p50);
        tracing::info!(
            round = r,
            berth_p50_ms = ms(sb.p50),
            crun_p50_ms = ms(sc.p50),
            ratio,
            "cycle round"
        );
        per_round.push((ms(sb.p50), ms(sc.p50), ratio));
    }

    let (b, c) = (summarize(b_all), summarize(c_all));
    let ratio = ms(b.p50) / ms(c.p50);
    // In round order: a trend across rounds (not noise) shows up as one.
    let in_order = |k: usize, prec: usize| {
        per_round
            .iter()
            .map(|r| format!("{:.prec$}", [r.0, r.1, r.2][k]))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut rr: Vec<f64> = per_round.iter().map(|r| r.2).collect();
    rr.sort_by(f64::total_cmp);
    for (name, s, k) in [("berth:", &b, 0), ("crun: ", &c, 1)] {
        println!(
            "  {name} p50 {:.2} ms  p90 {:.2} ms  (min {:.2}, max {:.2}; p50 per round: {})",
            ms(s.p50),
            ms(s.p90),
            ms(s.min),
            ms(s.max),
            in_order(k, 1)
        );
    }
    println!(
        "  per command p50 (ms): berth {}; crun {}",
        phase_p50s(&b_phases, ["create", "start", "stop --fast", "destroy"]),
        phase_p50s(&c_phases, ["create", "start", "kill", "delete"])
    );
    println!(
        "  ratio berth/crun of medians: {ratio:.3} (all cycles); per round: median {:.3}, {:.3}..{:.3} over {rounds} rounds ({})",
        quantile(&rr, 0.5),
        rr[0],
        rr[rr.len() - 1],
        in_order(2, 2)
    );
    println!(
        "  bar: berth p50 <= 25 ms: {}; berth/crun <= 1.0: {}",
        crate::verdict(ms(b.p50) <= 25.0),
        crate::verdict(ratio <= 1.0)
    );
    Ok(())
}

/// The crun bundle: a copy of berth's busybox template rootfs owned by the container's ids, and
/// `crun spec`'s config.json with a user namespace, the namespaces berth's CTs get and busybox
/// init as PID 1.
fn bundle(inst: &Install, crun_bin: &Path, tmp: &Path) -> Result<Crun> {
    let bundle = tmp.join("crun-bundle");
    std::fs::create_dir_all(&bundle)?;
    let rootfs = bundle.join("rootfs");
    quiet(
        Command::new("cp")
            .arg("-a")
            .arg(inst.root.join("template/busybox/rootfs"))
            .arg(&rootfs),
    )?;
    shift_owner(&rootfs, CRUN_BASE)?;
    quiet(Command::new(crun_bin).arg("spec").current_dir(&bundle))?;
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["/sbin/init"]);
    spec["root"] = json!({ "path": "rootfs", "readonly": false });
    spec["hostname"] = json!("crun-bench");
    spec["linux"]["namespaces"] = json!(
        ["pid", "network", "ipc", "uts", "mount", "user", "cgroup"].map(|t| json!({ "type": t }))
    );
    let map = json!([{ "containerID": 0, "hostID": CRUN_BASE, "size": IDS }]);
    spec["linux"]["uidMappings"] = map.clone();
    spec["linux"]["gidMappings"] = map;
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(Crun {
        bin: crun_bin.to_owned(),
        // On tmpfs like berth's run dir (and crun's default /run/crun).
        state: PathBuf::from(format!("/run/berth-bench-{}-crun", std::process::id())),
        bundle,
        mnt_ns: crun_mount_ns()?,
    })
}

/// Every file below `root` to owner + `base` (ids within the container's range); chown clears
/// setuid/setgid, which are put back.
fn shift_owner(root: &Path, base: u32) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::symlink_metadata(root)?;
    if m.uid() >= IDS || m.gid() >= IDS {
        bail!(
            "{}: owner {}:{} outside 0..{IDS}",
            root.display(),
            m.uid(),
            m.gid()
        );
    }
    std::os::unix::fs::lchown(root, Some(m.uid() + base), Some(m.gid() + base))
        .with_context(|| format!("chown {}", root.display()))?;
    if !m.file_type().is_symlink() && m.mode() & 0o6000 != 0 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    if m.is_dir() {
        for e in std::fs::read_dir(root)? {
            shift_owner(&e?.path(), base)?;
        }
    }
    Ok(())
}

/// A mount namespace with only the v1 cgroup hierarchies under /sys/fs/cgroup, for crun. A
/// child sets it up and waits until the parent holds it open.
fn crun_mount_ns() -> Result<OwnedFd> {
    use nix::unistd::{ForkResult, fork, pipe, read, write};
    let (go_r, go_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    // SAFETY: the benchmark is single-threaded here (it only ever spawned processes).
    match unsafe { fork() }.context("fork the mount namespace holder")? {
        ForkResult::Child => {
            drop(go_w);
            drop(ready_r);
            let ok = match hide_unified_cgroup2() {
                Ok(()) => 1u8,
                Err(e) => {
                    eprintln!("berth-bench: crun's mount namespace: {e:#}");
                    0
                }
            };
            let _ = write(&ready_w, &[ok]);
            let _ = read(&go_r, &mut [0u8]);
            // SAFETY: leave without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(go_r);
            drop(ready_w);
            let mut ok = [0u8];
            let got = read(&ready_r, &mut ok);
            let ns = std::fs::File::open(format!("/proc/{child}/ns/mnt"));
            drop(go_w);
            nix::sys::wait::waitpid(child, None)?;
            if got != Ok(1) || ok[0] != 1 {
                bail!("could not set up crun's mount namespace (v1 cgroups only)");
            }
            Ok(ns
                .context("open the mount namespace holder's ns/mnt")?
                .into())
        }
    }
}

/// What each side does, as seen from the host on one CT of each: namespaces of its own, id
/// map, seccomp mode, cgroup hierarchies it is placed in.
fn describe(inst: &Install, crun: &Crun) -> Result<()> {
    let ctid = "3999";
    let mut create = vec!["create", ctid, "--template", "busybox"];
    create.extend_from_slice(UNPRIVILEGED);
    quiet(&mut inst.cmd(&create))?;
    quiet(&mut inst.cmd(&["start", ctid]))?;
    let st: serde_json::Value =
        serde_json::from_str(&output(&mut inst.cmd(&["status", "--json", ctid]))?)?;
    let pid = st["ct"]["init_pid"]
        .as_i64()
        .context("berth status: no init_pid")?;
    let berth = seen(pid, &inst.cg_parent);
    let (_, layout) = ct_kind(inst, ctid)?;
    quiet(&mut inst.cmd(&["stop", "--fast", ctid]))?;
    quiet(&mut inst.cmd(&["destroy", ctid]))?;
    let berth = berth?;

    let id = format!("bench{}-describe", std::process::id());
    crun.create(&id)?;
    quiet(&mut crun.cmd(&["start", &id]))?;
    let c = crun.pid(&id).map(i64::from).and_then(|p| seen(p, &id));
    crun.remove(&id)?;
    let c = c?;
    println!(
        "  berth: `create --template busybox {}` (private area layout: {layout}), \
         `start`: monitor + console pty, cgroups v1 with limits and device rules, pivot_root, caps \
         dropped, seccomp filter, busybox init; `stop --fast`: SIGKILL, wait for the pid \
         namespace to empty, remove cgroups and mounts; `destroy`: private area and config",
        UNPRIVILEGED.join(" ")
    );
    println!("         seen on its init: {berth}");
    println!(
        "  crun:  `create` + `start` (busybox init, terminal false: no pty, config.json of `crun spec`: \
         cgroupfs v1 with device rules, masked paths; no seccomp in it), `kill KILL`, `delete --force`; \
         rootfs = one copy of the busybox template chowned to {CRUN_BASE} before the timed cycles \
         (no idmapped mount), state in /run (tmpfs, as berth's run dir)"
    );
    println!("         seen on its init: {c}");
    Ok(())
}

/// "own ns: pid mnt …; uid_map 0 B 65536; seccomp 2; in 9 cgroup hierarchies" for a process,
/// counting the hierarchies whose path contains `marker`.
fn seen(pid: i64, marker: &str) -> Result<String> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let own: Vec<&str> = NAMESPACES
        .into_iter()
        .filter(|ns| {
            let a = std::fs::read_link(proc.join("ns").join(ns)).ok();
            let b = std::fs::read_link(format!("/proc/1/ns/{ns}")).ok();
            a.is_some() && a != b
        })
        .collect();
    let uid_map = std::fs::read_to_string(proc.join("uid_map"))?;
    let status = std::fs::read_to_string(proc.join("status"))?;
    let seccomp = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map_or("?", str::trim)
        .to_owned();
    let cgroups = std::fs::read_to_string(proc.join("cgroup"))?
        .lines()
        .filter(|l| l.contains(marker))
        .count();
    Ok(format!(
        "own namespaces: {}; uid_map {}; seccomp mode {seccomp}; in {cgroups} cgroup hierarchies of its own",
        own.join(" "),
        uid_map.split_whitespace().collect::<Vec<_>>().join(" ")
    ))
}
