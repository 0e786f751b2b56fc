//! Templates against the real filesystem, as root: busybox build (and running it under chroot),
//! instantiate fidelity, owner shifting and speed, import of GNU tar output, remove_tree_fast
//! refusing mount points. Run: `cargo test -p berth-tests --test template -- --test-threads=1`.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_runtime::template::{
    DebianInit, TemplateError, TemplateKind, TemplateStore, remove_tree_fast,
};
use berth_tests::template::{TestStore, TmpfsMount, assert_same_tree, has_mounts_below, snapshot};

fn busybox_store() -> TestStore {
    let ts = TestStore::new().unwrap();
    ts.store.build_busybox("bb").unwrap();
    ts
}

#[test]
fn busybox_template_is_complete_and_runs() {
    let ts = TestStore::new().unwrap();
    let t0 = Instant::now();
    let info = ts.store.build_busybox("bb").unwrap();
    println!("build_busybox: {:?}", t0.elapsed());
    assert_eq!(info.kind, TemplateKind::Busybox);
    assert_eq!(info.stop_signal, "SIGUSR2");
    assert_eq!(info.init, "/sbin/init");
    assert!(info.source.contains("BusyBox v"), "{}", info.source);
    assert_eq!(ts.store.list().unwrap(), vec![info.clone()]);
    assert_eq!(ts.entries(), ["bb"], "no scratch directory left");

    let r = ts.store.rootfs("bb");
    let bin = fs::symlink_metadata(r.join("bin/busybox")).unwrap();
    assert!(
        bin.is_file(),
        "bin/busybox must be the binary, not a link to itself"
    );
    assert_eq!(bin.len(), fs::metadata("/bin/busybox").unwrap().len());
    assert_eq!(bin.mode() & 0o777, 0o755);
    assert_eq!(
        fs::read_link(r.join("sbin/init")).unwrap(),
        Path::new("/bin/busybox")
    );
    let applets = String::from_utf8(
        Command::new("/bin/busybox")
            .arg("--list-full")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let n = applets.lines().count();
    for a in applets.lines().filter(|a| *a != "bin/busybox") {
        let m = fs::symlink_metadata(r.join(a)).unwrap_or_else(|e| panic!("{a}: {e}"));
        assert!(m.file_type().is_symlink(), "{a}");
    }
    println!("{n} applets");
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root", "var/log", "usr/bin",
        "usr/sbin", "home",
    ] {
        assert!(r.join(d).is_dir(), "{d}");
    }
    assert_eq!(fs::metadata(r.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
    assert_eq!(
        fs::metadata(r.join("etc/shadow")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(r.join("etc/init.d/rcS")).unwrap().mode() & 0o777,
        0o755
    );
    let inittab = fs::read_to_string(r.join("etc/inittab")).unwrap();
    assert!(inittab.contains("::sysinit:/etc/init.d/rcS"));
    assert!(
        fs::read_to_string(r.join("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0:")
    );

    // The tree is self-contained: the static shell and applets run inside it, including rcS
    // (in throwaway UTS and network namespaces, as a CT's would be).
    let out = Command::new("unshare")
        .args(["--uts", "--net", "chroot"])
        .arg(&r)
        .args([
            "/bin/sh",
            "-c",
            "/etc/init.d/rcS; echo hi from $(basename $(readlink /bin/ls))",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hi from busybox"
    );

    // Same name again: refused, store unchanged.
    assert!(matches!(
        ts.store.build_busybox("bb"),
        Err(TemplateError::Exists { .. })
    ));
    ts.store.remove("bb").unwrap();
    assert!(ts.entries().is_empty());
}

#[test]
fn busybox_build_errors_are_clear() {
    let ts = TestStore::new().unwrap();
    let missing = TemplateStore::open(ts.store.dir.clone())
        .unwrap()
        .with_busybox("/nonexistent/busybox");
    let e = missing.build_busybox("x").unwrap_err().to_string();
    assert!(
        e.contains("/nonexistent/busybox") && e.contains("busybox-static"),
        "{e}"
    );
    // A dynamically linked binary would not run inside the CT.
    let dynamic = TemplateStore::open(ts.store.dir.clone())
        .unwrap()
        .with_busybox("/bin/ls");
    let e = dynamic.build_busybox("x").unwrap_err().to_string();
    assert!(e.contains("dynamically linked"), "{e}");
    let e = ts.store.build_busybox("../x").unwrap_err();
    assert!(matches!(e, TemplateError::InvalidName { .. }), "{e}");
    assert!(
        ts.entries().is_empty(),
        "nothing left behind: {:?}",
        ts.entries()
    );
}

/// Adds what a real distribution tree has and busybox lacks: owners, set-id bits, hard links,
/// a fifo, device nodes, an odd directory mode, a non-ASCII name.
fn enrich(r: &Path) {
    fs::create_dir_all(r.join("home/user/deep/er")).unwrap();
    fs::write(r.join("home/user/deep/er/file"), vec![42u8; 300_000]).unwrap();
    fs::write(r.join("home/user/.profile"), "PS1='$ '\n").unwrap();
    nix::unistd::chown(&r.join("home/user"), Some(1000.into()), Some(1000.into())).unwrap();
    nix::unistd::chown(
        &r.join("home/user/.profile"),
        Some(1000.into()),
        Some(100.into()),
    )
    .unwrap();
    std::os::unix::fs::lchown(r.join("bin/ls"), Some(7), Some(8)).unwrap();
    fs::write(r.join("usr/bin/suid"), "x").unwrap();
    fs::set_permissions(r.join("usr/bin/suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(r.join("usr/bin/sgid"), "y").unwrap();
    nix::unistd::chown(&r.join("usr/bin/sgid"), None, Some(42.into())).unwrap();
    fs::set_permissions(r.join("usr/bin/sgid"), fs::Permissions::from_mode(0o2711)).unwrap();
    fs::hard_link(r.join("home/user/deep/er/file"), r.join("home/hardlink")).unwrap();
    fs::hard_link(r.join("home/user/deep/er/file"), r.join("usr/hardlink2")).unwrap();
    nix::unistd::mkfifo(
        &r.join("run/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o620),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &r.join("dev/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    fs::set_permissions(r.join("dev/null"), fs::Permissions::from_mode(0o666)).unwrap();
    fs::create_dir(r.join("var/spool")).unwrap();
    fs::set_permissions(r.join("var/spool"), fs::Permissions::from_mode(0o3710)).unwrap();
    fs::write(r.join("etc/grüße"), "").unwrap();
    fs::write(r.join("etc/empty"), "").unwrap();
    // Set directory times last: the writes above changed them.
    Command::new("touch")
        .args(["-h", "-d", "2001-02-03 04:05:06.789"])
        .arg(r.join("home"))
        .arg(r.join("bin/ls"))
        .status()
        .unwrap();
}

#[test]
fn instantiate_preserves_everything() {
    let ts = busybox_store();
    enrich(&ts.store.rootfs("bb"));
    let src = snapshot(&ts.store.rootfs("bb")).unwrap();
    let dest = ts.path("private-101");
    ts.store.instantiate("bb", &dest, None).unwrap();
    let copy = snapshot(&dest).unwrap();
    assert_same_tree(&src, &copy);
    let root_src = fs::metadata(ts.store.rootfs("bb")).unwrap();
    let root_dst = fs::metadata(&dest).unwrap();
    assert_eq!(root_src.mode(), root_dst.mode());
    let a = fs::metadata(dest.join("home/hardlink")).unwrap();
    assert_eq!(a.nlink(), 3, "hard links recreated within the copy");
    assert_ne!(
        a.ino(),
        fs::metadata(ts.store.rootfs("bb").join("home/hardlink"))
            .unwrap()
            .ino(),
        "the copy does not share inodes with the template"
    );
    // Writing to the copy leaves the template alone.
    fs::write(dest.join("home/hardlink"), "changed").unwrap();
    assert_eq!(
        fs::metadata(ts.store.rootfs("bb").join("home/hardlink"))
            .unwrap()
            .len(),
        300_000
    );
    remove_tree_fast(&dest).unwrap();
    assert!(!dest.exists());
}

#[test]
fn instantiate_shifts_owners() {
    let ts = busybox_store();
    enrich(&ts.store.rootfs("bb"));
    let src = snapshot(&ts.store.rootfs("bb")).unwrap();
    let dest = ts.path("private-102");
    ts.store
        .instantiate("bb", &dest, Some((100_000, 200_000)))
        .unwrap();
    let mut expect = src.clone();
    for n in expect.values_mut() {
        n.uid += 100_000;
        n.gid += 200_000;
    }
    assert_same_tree(&expect, &snapshot(&dest).unwrap());
    let root = fs::metadata(&dest).unwrap();
    assert_eq!((root.uid(), root.gid()), (100_000, 200_000));
    // set-id bits survive the chown (it clears them; the mode is applied after).
    assert_eq!(
        fs::metadata(dest.join("usr/bin/suid")).unwrap().mode() & 0o7777,
        0o4755
    );

    // An overflowing shift is refused and leaves no half copy behind.
    let bad = ts.path("private-103");
    let e = ts
        .store
        .instantiate("bb", &bad, Some((u32::MAX - 10, 0)))
        .unwrap_err();
    assert!(e.to_string().contains("overflows"), "{e}");
    assert!(!bad.exists());
}

#[test]
fn instantiate_refuses_bad_destinations() {
    let ts = busybox_store();
    let dest = ts.path("full");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep"), "x").unwrap();
    let e = ts.store.instantiate("bb", &dest, None).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    assert_eq!(fs::read_to_string(dest.join("keep")).unwrap(), "x");
    let e = ts
        .store
        .instantiate("nope", &ts.path("x"), None)
        .unwrap_err();
    assert!(matches!(e, TemplateError::NotFound { .. }), "{e}");
    assert!(!ts.path("x").exists());
    // An existing empty directory (e.g. prepared with a quota project) is filled.
    let empty = ts.path("empty");
    fs::create_dir(&empty).unwrap();
    ts.store.instantiate("bb", &empty, None).unwrap();
    assert!(empty.join("bin/busybox").is_file());
}

fn percentiles(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 9 / 10], v[v.len() - 1])
}

struct Timings {
    copy: (Duration, Duration, Duration),
    shifted: (Duration, Duration, Duration),
    remove: (Duration, Duration, Duration),
    cp: Duration,
    rm: Duration,
}

/// `n` rounds of instantiate / shifted instantiate / remove_tree_fast / `cp -a` / `rm -rf` of
/// template `bb` into `dir`.
fn time_rounds(store: &TemplateStore, dir: &Path, n: usize) -> Timings {
    let (mut copy, mut remove, mut shifted, mut cp, mut rm) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let dest = dir.join(format!("p{i}"));
        let t = Instant::now();
        store.instantiate("bb", &dest, None).unwrap();
        copy.push(t.elapsed());
        let t = Instant::now();
        remove_tree_fast(&dest).unwrap();
        remove.push(t.elapsed());

        let dest = dir.join(format!("s{i}"));
        let t = Instant::now();
        store
            .instantiate("bb", &dest, Some((100_000, 100_000)))
            .unwrap();
        shifted.push(t.elapsed());
        remove_tree_fast(&dest).unwrap();

        let dest = dir.join(format!("c{i}"));
        let t = Instant::now();
        let st = Command::new("cp")
            .arg("-a")
            .arg(store.rootfs("bb"))
            .arg(&dest)
            .status()
            .unwrap();
        cp.push(t.elapsed());
        assert!(st.success());
        let t = Instant::now();
        assert!(
            Command::new("rm")
                .arg("-rf")
                .arg(&dest)
                .status()
                .unwrap()
                .success()
        );
        rm.push(t.elapsed());
    }
    Timings {
        copy: percentiles(&mut copy),
        shifted: percentiles(&mut shifted),
        remove: percentiles(&mut remove),
        cp: percentiles(&mut cp).0,
        rm: percentiles(&mut rm).0,
    }
}

fn print_timings(label: &str, t: &Timings) {
    println!(
        "[{label}] instantiate:         p50 {:?} p90 {:?} max {:?}   (cp -a p50 {:?})",
        t.copy.0, t.copy.1, t.copy.2, t.cp
    );
    println!(
        "[{label}] instantiate shifted: p50 {:?} p90 {:?} max {:?}",
        t.shifted.0, t.shifted.1, t.shifted.2
    );
    println!(
        "[{label}] remove_tree_fast:    p50 {:?} p90 {:?} max {:?}   (rm -rf p50 {:?})",
        t.remove.0, t.remove.1, t.remove.2, t.rm
    );
}

/// Times instantiate and remove_tree_fast on the busybox tree. On tmpfs that is berth's own cost
/// (syscalls, no disk); on disk it is dominated by inode creation, which varies a lot (on the
/// project VM between ~17 µs and ~1 ms per inode depending on the directory), so there the bar
/// is `cp -a` / `rm -rf` of the same tree in the same place.
#[test]
fn instantiate_and_remove_are_fast() {
    let ts = busybox_store();
    let files = snapshot(&ts.store.rootfs("bb")).unwrap().len();
    println!("busybox tree: {files} entries");

    let mnt = TmpfsMount::new(&ts.path("tmpfs")).unwrap();
    let mem_store = TemplateStore::open(mnt.path.join("template")).unwrap();
    mem_store.build_busybox("bb").unwrap();
    let mem = time_rounds(&mem_store, &mnt.path, 20);
    print_timings("tmpfs", &mem);
    drop(mnt);

    let disk = time_rounds(&ts.store, ts.tmp.path(), 10);
    print_timings(&ts.tmp.path().display().to_string(), &disk);

    // Relative bars hold on a loaded shared machine, where absolute times swing 2x; the absolute
    // one is the whole create→start→stop→destroy budget.
    assert!(
        mem.copy.0 < mem.cp && mem.copy.0 < Duration::from_millis(25),
        "instantiate on tmpfs p50 {:?} (cp -a {:?})",
        mem.copy.0,
        mem.cp
    );
    assert!(
        mem.remove.0 < mem.rm,
        "remove on tmpfs p50 {:?} (rm -rf {:?})",
        mem.remove.0,
        mem.rm
    );
    assert!(
        disk.copy.0 < disk.cp + disk.cp / 2,
        "instantiate p50 {:?} vs cp -a {:?}",
        disk.copy.0,
        disk.cp
    );
    assert!(
        disk.remove.0 < disk.rm * 2,
        "remove p50 {:?} vs rm -rf {:?}",
        disk.remove.0,
        disk.rm
    );
}

#[test]
fn imports_gnu_tar_output_identically() {
    let ts = busybox_store();
    enrich(&ts.store.rootfs("bb"));
    let src = snapshot(&ts.store.rootfs("bb")).unwrap();
    for (flag, ext) in [
        ("-cf", "tar"),
        ("-czf", "tar.gz"),
        ("-cJf", "tar.xz"),
        ("--zstd", "tar.zst"),
    ] {
        let file = ts.path(&format!("bb2.{ext}"));
        let mut cmd = Command::new("tar");
        cmd.args(["--numeric-owner", "-C"])
            .arg(ts.store.rootfs("bb"));
        if flag == "--zstd" {
            cmd.args(["--zstd", "-cf"]);
        } else {
            cmd.arg(flag);
        }
        let st = cmd.arg(&file).arg(".").status().unwrap();
        assert!(st.success());
        let t = Instant::now();
        let info = ts.store.import(&file, None).unwrap();
        println!("import {ext}: {:?}", t.elapsed());
        assert_eq!(info.name, "bb2");
        assert_eq!(info.stop_signal, "SIGUSR2");
        let mut got = snapshot(&ts.store.rootfs("bb2")).unwrap();
        // Device nodes are skipped on import (berth provides /dev), and GNU tar stores seconds only.
        assert!(!got.contains_key(Path::new("dev/null")));
        let mut want = src.clone();
        want.remove(Path::new("dev/null"));
        for n in want.values_mut().chain(got.values_mut()) {
            n.mtime.1 = 0;
        }
        assert_same_tree(&want, &got);
        ts.store.remove("bb2").unwrap();
    }
    assert_eq!(ts.entries(), ["bb"]);
}

#[test]
fn remove_tree_fast_refuses_mounts_and_never_follows_symlinks() {
    let ts = TestStore::new().unwrap();
    let tree = ts.path("private");
    fs::create_dir_all(tree.join("a/b")).unwrap();
    fs::write(tree.join("a/b/f"), "x").unwrap();
    let outside = ts.path("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("precious"), "keep").unwrap();
    std::os::unix::fs::symlink(&outside, tree.join("a/link-to-outside")).unwrap();
    std::os::unix::fs::symlink(outside.join("precious"), tree.join("file-link")).unwrap();

    {
        let mnt = TmpfsMount::new(&tree.join("a/mnt")).unwrap();
        fs::write(mnt.path.join("in-mount"), "data").unwrap();
        let e = remove_tree_fast(&tree).unwrap_err();
        assert!(e.to_string().contains("a/mnt is a mount point"), "{e}");
        assert!(
            mnt.path.join("in-mount").exists(),
            "nothing removed inside the mount"
        );
        assert!(tree.join("a/b/f").exists(), "nothing removed at all");
    }
    assert!(!has_mounts_below(&tree), "test mount left behind");

    remove_tree_fast(&tree).unwrap();
    assert!(!tree.exists());
    assert_eq!(
        fs::read_to_string(outside.join("precious")).unwrap(),
        "keep"
    );
    // Missing is fine (destroy is idempotent); a symlink itself is removed, not its target.
    remove_tree_fast(&tree).unwrap();
    std::os::unix::fs::symlink(&outside, ts.path("dirlink")).unwrap();
    remove_tree_fast(&ts.path("dirlink")).unwrap();
    assert!(outside.join("precious").exists());
}

/// Downloads ~60 MB of packages from deb.debian.org and takes about a minute.
#[test]
#[ignore = "needs network access to a Debian mirror and ~1 min; run with --ignored"]
fn debian_template_builds_and_instantiates() {
    let ts = TestStore::new().unwrap();
    let t = Instant::now();
    let info = ts
        .store
        .build_debian("bookworm", "debian-12", None, DebianInit::Sysvinit)
        .unwrap();
    println!("build_debian: {:?}, {} MB", t.elapsed(), info.size >> 20);
    assert_eq!(info.kind, TemplateKind::Debian);
    assert_eq!(info.stop_signal, "SIGPWR");
    let r = ts.store.rootfs("debian-12");
    let init = fs::symlink_metadata(r.join("sbin/init")).unwrap();
    assert!(init.is_file(), "sysvinit's /sbin/init");
    let inittab = fs::read_to_string(r.join("etc/inittab")).unwrap();
    assert!(
        inittab.lines().any(|l| l == "pf::powerfail:/sbin/init 0"),
        "{inittab}"
    );
    assert!(
        !inittab
            .lines()
            .any(|l| l.starts_with("1:") && l.contains("getty"))
    );
    assert!(r.join("sbin/ip").exists() || r.join("bin/ip").exists());
    assert!(r.join("sbin/ifup").exists());
    let src = snapshot(&r).unwrap();
    let dest = ts.path("private-200");
    let t = Instant::now();
    ts.store.instantiate("debian-12", &dest, None).unwrap();
    println!(
        "instantiate debian ({} entries): {:?}",
        src.len(),
        t.elapsed()
    );
    assert_same_tree(&src, &snapshot(&dest).unwrap());
    let t = Instant::now();
    remove_tree_fast(&dest).unwrap();
    println!("remove_tree_fast debian: {:?}", t.elapsed());
    let e = ts
        .store
        .build_debian("no such suite", "x", None, DebianInit::Sysvinit)
        .unwrap_err();
    assert!(e.to_string().contains("invalid suite"), "{e}");
    assert_eq!(ts.entries(), ["debian-12"]);
}
