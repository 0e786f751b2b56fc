//! Resources running out: a full berth root (a small loop-mounted ext4 of the test's own) during
//! create, template import and OpenVZ import; a full filesystem under berthd's ledger while it
//! ticks; a process out of file descriptors at every point of `start`. Each fails with an error
//! naming the problem and changes nothing; the ledger stays exact once space is back.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use berth_tests::billing::{Berthd, kernel_bytes, ledger_report};
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, assert_same};
use berth_tests::template::{assert_same_tree, snapshot};
use berth_tests::vz::{VzNode, assert_no_ct, build_tree, fails as vz_fails};

const ENOSPC: &str = "No space left on device";

/// An ext4 filesystem of `mb` MiB in a file, loop-mounted on a directory of the test's own
/// (the loop device goes with the unmount: `mount -o loop` sets autoclear).
struct SmallFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl SmallFs {
    fn new(mb: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-smallfs-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("fs.img");
        fs::File::create(&img).unwrap().set_len(mb << 20).unwrap();
        // -m 0: no blocks reserved for root, so berth (root) meets ENOSPC where the blocks end.
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img));
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        sh(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        Self { _dir: dir, mnt }
    }

    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.mnt).unwrap();
        st.blocks_free() * st.fragment_size()
    }

    fn filler(&self) -> PathBuf {
        self.mnt.join("filler")
    }

    /// Takes the free space but about `left` bytes, with one preallocated file outside the
    /// berth root (grown in steps: one fallocate of all that statvfs reports free fails for
    /// the extent tree's own blocks).
    fn fill(&self, left: u64) {
        self.unfill();
        let f = fs::File::create(self.filler()).unwrap();
        let mut len = 0u64;
        for step in [16u64 << 20, 1 << 20, 64 << 10, 4 << 10] {
            while self.free() >= left + step {
                match nix::fcntl::fallocate(
                    &f,
                    nix::fcntl::FallocateFlags::empty(),
                    len as libc::off_t,
                    step as libc::off_t,
                ) {
                    Ok(()) => len += step,
                    Err(nix::errno::Errno::ENOSPC) => break,
                    Err(e) => panic!("fallocate {}: {e}", self.filler().display()),
                }
            }
        }
        f.sync_all().unwrap();
    }

    fn unfill(&self) {
        let _ = fs::remove_file(self.filler());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(&self.mnt).status();
        if !st.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn sh(c: &mut Command) {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A tarball of an OS-like tree holding `mb` MiB of data that does not compress.
fn big_rootfs_tar(dir: &Path, mb: usize) -> PathBuf {
    let path = dir.join("big-rootfs.tar");
    let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..mb << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for (name, body) in [
        ("etc/os-release", &b"ID=big\n"[..]),
        ("sbin/init", &b"#!/bin/sh\n"[..]),
        ("usr/share/blob", &data[..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(body.len() as u64);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, body).unwrap();
    }
    b.finish().unwrap();
    path
}

/// The root's tree without directory mtimes: a command that failed half-way has created and
/// removed entries (its scratch directory, its lock file), which no one can undo on a mtime.
fn tree(root: &Path) -> std::collections::BTreeMap<PathBuf, berth_tests::template::Node> {
    let mut t = snapshot(root).unwrap();
    for n in t.values_mut() {
        if n.kind == 'd' {
            n.mtime = (0, 0);
        }
    }
    t
}

fn assert_enospc(what: &str, err: &str) {
    assert!(
        err.contains(ENOSPC),
        "{what}: the error does not say the disk is full: {err}"
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
}

/// A full root: create (overlay and full copy) and template import fail naming the CT or
/// template and the cause, leave the root's tree, cgroups, mounts and the host netns as they
/// were, and work once space is back.
#[test]
fn full_root_fails_create_and_template_import_cleanly() {
    let topo = Topology::new();
    let before_net = topo.host.settled_snapshot();
    let fs = SmallFs::new(48);
    let h = TestHost::new_at(fs.mnt.join("root")).in_netns(topo.host.fd());
    let before = tree(&h.root);

    fs.fill(0);
    let e = h.fails(&["create", "5301", "--ipadd", "192.0.2.31"]);
    assert_enospc("create on a full disk", &e);
    assert!(e.contains("5301"), "the error does not name the CT: {e}");
    assert_same_tree(&before, &tree(&h.root));
    assert_no_ct(&h, 5301);

    // Room for the config but not for a copy of the template: the copy fails half-way.
    fs.fill(256 << 10);
    let e = h.fails(&["create", "5302", "--copy", "--ipadd", "192.0.2.32"]);
    assert_enospc("a full copy that does not fit", &e);
    assert!(e.contains("5302"), "the error does not name the CT: {e}");
    assert_same_tree(&before, &tree(&h.root));
    assert_no_ct(&h, 5302);

    let tar = big_rootfs_tar(h.dir.path(), 4);
    fs.fill(1 << 20);
    let e = h.fails(&["template", "import", tar.to_str().unwrap(), "--name", "big"]);
    // The importer measures the space before it writes, or meets ENOSPC: either way it says so.
    assert!(
        e.contains("the space free in") || e.contains(ENOSPC),
        "a template import that does not fit: the error does not say the disk is full: {e}"
    );
    assert!(
        e.contains("big"),
        "the error does not name the template: {e}"
    );
    assert_same_tree(&before, &tree(&h.root));
    let list = h.ok(&["template", "list"]);
    assert!(!list.contains("big"), "{list}");
    h.assert_clean();
    assert_same(
        "host netns after the failures",
        &before_net,
        &topo.host.settled_snapshot(),
    );

    // Space back: the same commands work.
    fs.unfill();
    h.ok(&["create", "5302", "--copy", "--ipadd", "192.0.2.32"]);
    h.ok(&["start", "5302"]);
    assert_eq!(h.status("5302")["status"], "running");
    h.ok(&["template", "import", tar.to_str().unwrap(), "--name", "big"]);
    h.ok(&["stop", "5302"]);
    h.ok(&["destroy", "5302"]);
    h.ok(&["template", "remove", "big"]);
    h.assert_clean();
    drop(h);
    assert_same(
        "host netns at the end",
        &before_net,
        &topo.host.settled_snapshot(),
    );
}

/// An OpenVZ private area larger than the space left: the import names the disk as full and
/// leaves no config, private area, scratch or id range behind.
#[test]
fn full_root_fails_vz_import_cleanly() {
    let fs = SmallFs::new(48);
    let h = TestHost::new_at(fs.mnt.join("root"));
    // A node that has had CTs: the id pool's directory exists, as the import finds it.
    h.ok(&["create", "5310"]);
    h.ok(&["destroy", "5310"]);
    let n = VzNode::new("VE_PRIVATE=/vz/private/$VEID\n");
    let src = n.path("private/5311");
    build_tree(&src);
    fs::write(src.join("var-blob"), vec![7u8; 3 << 20]).unwrap();
    n.conf(
        5311,
        "HOSTNAME=\"full.example.com\"\nPHYSPAGES=\"0:128M\"\n",
    );
    let before = tree(&h.root);

    fs.fill(1 << 20);
    let e = vz_fails(&h, &n.args(&["5311", "--private", src.to_str().unwrap()]));
    assert_enospc("import of a private area that does not fit", &e);
    assert!(e.contains("5311"), "the error does not name the CT: {e}");
    assert_same_tree(&before, &tree(&h.root));
    assert_no_ct(&h, 5311);

    fs.unfill();
    let o = berth_tests::vz::run_args(&h, &n.args(&["5311", "--private", src.to_str().unwrap()]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(h.root.join("private/5311/var-blob").exists());
    h.ok(&["destroy", "5311"]);
    h.assert_clean();
}

/// A ploop image whose raw conversion cannot fit is refused before qemu-img runs, naming the
/// space needed and free; nothing is left; it imports once space is back.
#[test]
fn full_root_refuses_a_ploop_conversion_before_it_runs() {
    let fs = SmallFs::new(48);
    let h = TestHost::new_at(fs.mnt.join("root"));
    h.ok(&["create", "5320"]);
    h.ok(&["destroy", "5320"]);
    let n = VzNode::new("VE_PRIVATE=/vz/private/$VEID\n");
    let tree_src = n.path("tree");
    build_tree(&tree_src);
    let area = n.path("private/5321");
    berth_tests::vz::ploop_area(&area, &tree_src, 160);
    n.conf(
        5321,
        "HOSTNAME=\"ploop.example.com\"\nPHYSPAGES=\"0:128M\"\n",
    );
    let before = tree(&h.root);

    fs.fill(1 << 20);
    let e = vz_fails(&h, &n.args(&["5321"]));
    assert!(
        e.contains("5321") && e.contains("needs about") && e.contains("MiB are"),
        "the error does not name the CT and the space: {e}"
    );
    assert_same_tree(&before, &tree(&h.root));
    assert_no_ct(&h, 5321);

    fs.unfill();
    let o = berth_tests::vz::run_args(&h, &n.args(&["5321"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    h.ok(&["destroy", "5321"]);
    h.assert_clean();
}

fn ping_from_ct(h: &TestHost, ct: &str, n: &str) {
    let (rc, out, err) = h.exec(
        ct,
        &["ping", "-c", n, "-i", "0.05", "-s", "1000", "192.0.2.1"],
    );
    assert_eq!(rc, 0, "ping from {ct}: {out}{err}");
}

/// berthd's ledger on a filesystem that fills up while traffic flows: its ticks fail and say
/// why, berthd keeps running, and once space is back the ledger catches up exactly to the
/// kernel's counters (nothing lost in the failed ticks, nothing booked twice).
#[test]
fn full_ledger_disk_loses_no_byte() -> Result<()> {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let fs = SmallFs::new(16);
    let ledger = fs.mnt.join("billing.db");
    let ledger_s = ledger.to_str().context("ledger path")?.to_owned();
    let mut d = Berthd::start(&h, &ledger, "10")?;
    d.wait_tick_end(0, Duration::from_secs(15))?;

    h.ok(&["create", "5321", "--ipadd", "192.0.2.21"]);
    h.ok(&["start", "5321"]);
    ping_from_ct(&h, "5321", "5");
    let ticks = d.tick_ends();
    d.wait_tick_end(ticks, Duration::from_secs(15))?;

    fs.fill(0);
    let lines_before = d.lines().len();
    ping_from_ct(&h, "5321", "20");
    // Ticks go on failing: wait for a few error lines about the ledger.
    let mut failed = 0;
    for _ in 0..300 {
        std::thread::sleep(Duration::from_millis(100));
        failed = d.lines()[lines_before..]
            .iter()
            .filter(|l| l.text.contains("ERROR") || l.text.contains("WARN"))
            .filter(|l| l.text.contains("full") || l.text.contains(ENOSPC))
            .count();
        if failed >= 2 {
            break;
        }
    }
    ensure!(
        failed >= 2,
        "no tick reported the full disk: {:?}",
        &d.lines()[lines_before..]
    );
    ensure!(d.alive(), "berthd exited on a full ledger disk");

    fs.unfill();
    ping_from_ct(&h, "5321", "5");
    h.ok(&["stop", "--fast", "5321"]);
    let (k_in, k_out) = kernel_bytes(&h, "5321");
    let ticks = d.tick_ends();
    d.wait_tick_end(ticks, Duration::from_secs(15))?;
    d.sigterm()?;
    let (report, l_in, l_out) = ledger_report(&h, &ledger_s, "5321")?;
    ensure!(
        (l_in, l_out) == (k_in, k_out) && k_in > 20_000 && k_out > 20_000,
        "ledger {l_in}/{l_out} vs kernel {k_in}/{k_out}: {report}"
    );
    h.ok(&["destroy", "5321"]);
    h.assert_clean();
    Ok(())
}

/// `start` with RLIMIT_NOFILE from very low up to where it succeeds: every failure names the
/// cause and rolls back (CT stopped, no cgroup, mount or host interface left), and the CT
/// starts normally afterwards.
#[test]
fn out_of_file_descriptors_at_every_point_of_start() {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    h.ok(&["create", "5331", "--ipadd", "192.0.2.41"]);
    let before_net = topo.host.settled_snapshot();
    let mut failures = 0;
    let mut started_at = None;
    for limit in 4..=256u64 {
        let mut c = h.cmd(&["start", "5331"]);
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            c.pre_exec(move || {
                let r = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            started_at = Some(limit);
            break;
        }
        failures += 1;
        assert!(!err.contains("panicked"), "limit {limit}: {err}");
        assert!(
            err.contains("Too many open files"),
            "limit {limit}: the error does not name the cause: {err}"
        );
        let st = h.status("5331");
        assert_eq!(st["status"], "stopped", "limit {limit}: {st}");
        h.assert_clean();
        assert_same(
            &format!("host netns after a start with {limit} fds"),
            &before_net,
            &topo.host.settled_snapshot(),
        );
    }
    let at = started_at.expect("start never succeeded up to 256 fds");
    eprintln!("start failed cleanly at {failures} limits and succeeded with {at} fds");
    assert!(failures >= 3, "too few failing points: {failures}");
    assert_eq!(h.status("5331")["status"], "running");
    h.ok(&["stop", "5331"]);
    h.ok(&["start", "5331"]);
    h.ok(&["stop", "5331"]);
    h.ok(&["destroy", "5331"]);
    h.assert_clean();
}

/// Every counter slot held by a CT with an interface attached: the next CT's attach fails
/// naming it and the table, attaches nothing, and leaves the other CTs' interfaces and slots
/// as they were; once one CT detaches, the refused CT gets its slot.
#[test]
fn full_counter_slot_table_refuses_the_next_ct() -> Result<()> {
    use berth::datapath::{Datapath, IfaceConfig};
    use berth_tests::datapath::{CT_MAC, Netns, PinDir};
    const BASE: u32 = 700_000;
    const FIRST_IF: u32 = 100;
    let slots = berth_common::capacity::SLOTS;
    let pin = PinDir::new();
    let ns = Netns::new("bxs")?;
    // One veth per CT and one more, at ifindexes of the test's choosing.
    let batch: String = (0..=slots)
        .map(|i| {
            format!(
                "link add bx{i} index {} type veth peer name by{i} index {}\n",
                FIRST_IF + i,
                FIRST_IF + slots + 1 + i
            )
        })
        .collect();
    let file = tempfile::NamedTempFile::new()?;
    fs::write(file.path(), batch)?;
    ns.ip(&["-batch", file.path().to_str().context("batch path")?])?;
    let in_ns = ns.enter()?;
    let mut dp = Datapath::open_or_load(&pin.path)?;
    for i in 0..slots {
        dp.attach(
            FIRST_IF + i,
            IfaceConfig::routed(berth_tests::ct(BASE + i), CT_MAC),
        )?;
    }
    let attached = dp.attached()?;
    ensure!(
        attached.len() == slots as usize,
        "{} attached",
        attached.len()
    );

    let refused = BASE + slots;
    let e = dp
        .attach(
            FIRST_IF + slots,
            IfaceConfig::routed(berth_tests::ct(refused), CT_MAC),
        )
        .expect_err("an attach with every slot taken succeeded");
    let msg = berth_runtime::error_chain::ErrorChain(&e).to_string();
    ensure!(
        msg.contains(&format!("CT {refused}")) && msg.contains("no counter slot left"),
        "{msg}"
    );
    let after: Vec<_> = dp
        .attached()?
        .iter()
        .map(|a| (a.ifindex, a.config.ctid))
        .collect();
    let before: Vec<_> = attached
        .iter()
        .map(|a| (a.ifindex, a.config.ctid))
        .collect();
    ensure!(
        after == before,
        "the refused attach changed the interface table"
    );

    // One CT goes: its interface detached, the refused CT now fits.
    dp.detach(FIRST_IF)?;
    dp.attach(
        FIRST_IF + slots,
        IfaceConfig::routed(berth_tests::ct(refused), CT_MAC),
    )?;
    ensure!(dp.attached()?.len() == slots as usize);
    drop(dp);
    drop(in_ns);
    drop(pin);
    drop(ns);
    Ok(())
}
