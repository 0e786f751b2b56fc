//! Unit tests: names, metadata, and import safety with crafted tarballs (malicious ones are
//! written with raw headers, since tar's Builder refuses to set such paths).

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::import::{name_from_file, sanitize, sniff};
use super::*;

const MTIME: u64 = 1_600_000_000;

/// One tar entry, written with a raw GNU header so any path or link name can be crafted.
struct E<'a> {
    path: &'a [u8],
    kind: EntryType,
    link: &'a [u8],
    data: &'a [u8],
    mode: u32,
    uid: u64,
}

fn file<'a>(path: &'a str, data: &'a [u8]) -> E<'a> {
    E {
        path: path.as_bytes(),
        kind: EntryType::Regular,
        link: b"",
        data,
        mode: 0o644,
        uid: 0,
    }
}
fn dir(path: &str) -> E<'_> {
    E {
        path: path.as_bytes(),
        kind: EntryType::Directory,
        link: b"",
        data: b"",
        mode: 0o755,
        uid: 0,
    }
}
fn symlink<'a>(path: &'a str, target: &'a str) -> E<'a> {
    E {
        path: path.as_bytes(),
        kind: EntryType::Symlink,
        link: target.as_bytes(),
        data: b"",
        mode: 0o777,
        uid: 0,
    }
}
fn hardlink<'a>(path: &'a str, target: &'a str) -> E<'a> {
    E {
        path: path.as_bytes(),
        kind: EntryType::Link,
        link: target.as_bytes(),
        data: b"",
        mode: 0o644,
        uid: 0,
    }
}

fn tarball(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..e.path.len()].copy_from_slice(e.path);
        h.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link);
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.uid);
        h.set_mtime(MTIME);
        if matches!(e.kind, EntryType::Char | EntryType::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A minimal bootable-looking tree plus `extra`.
fn rootfs_with(extra: Vec<E<'_>>) -> Vec<u8> {
    let mut v = vec![
        dir("./"),
        dir("./bin/"),
        dir("./sbin/"),
        file("./bin/busybox", b"\x7fELF fake"),
        symlink("./sbin/init", "/bin/busybox"),
    ];
    v.extend(extra);
    tarball(&v)
}

struct Fx {
    _tmp: tempfile::TempDir,
    store: TemplateStore,
    work: PathBuf,
}

fn fixture() -> Fx {
    let tmp = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(tmp.path().join("template")).unwrap();
    let work = tmp.path().join("work");
    fs::create_dir(&work).unwrap();
    Fx {
        _tmp: tmp,
        store,
        work,
    }
}

impl Fx {
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.work.join(name);
        fs::write(&p, bytes).unwrap();
        p
    }

    /// The store holds exactly `names` and no scratch directories.
    fn assert_store(&self, names: &[&str]) {
        let mut got: Vec<String> = fs::read_dir(&self.store.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        assert_eq!(got, names, "store contents");
    }

    fn reject(&self, bytes: &[u8], needle: &str) -> TemplateError {
        let p = self.write("bad.tar", bytes);
        let err = self.store.import(&p, Some("bad")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(needle),
            "error {msg:?} should mention {needle:?}"
        );
        self.assert_store(&[]);
        err
    }
}

fn gz(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}
fn xz(b: &[u8]) -> Vec<u8> {
    let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(b).unwrap();
    e.finish().unwrap()
}
fn zst(b: &[u8]) -> Vec<u8> {
    zstd::encode_all(b, 1).unwrap()
}

#[test]
fn names_are_validated() {
    for ok in ["debian-12", "a", "busybox_1.35", "X.y-z_", &"a".repeat(64)] {
        validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "",
        ".hidden",
        "..",
        ".",
        "a/b",
        "a b",
        "ä",
        &"a".repeat(65),
        "x\n",
    ] {
        let e = validate_name(bad).unwrap_err();
        assert!(matches!(e, TemplateError::InvalidName { .. }), "{bad:?}");
    }
    let fx = fixture();
    assert!(matches!(
        fx.store.get("../etc"),
        Err(TemplateError::InvalidName { .. })
    ));
    assert!(matches!(
        fx.store.get("nope"),
        Err(TemplateError::NotFound { .. })
    ));
}

#[test]
fn names_from_files() {
    assert_eq!(
        name_from_file(Path::new("/x/debian-12.tar.xz")).as_deref(),
        Some("debian-12")
    );
    assert_eq!(name_from_file(Path::new("a.tgz")).as_deref(), Some("a"));
    assert_eq!(
        name_from_file(Path::new("alpine.tar.zst")).as_deref(),
        Some("alpine")
    );
    assert_eq!(
        name_from_file(Path::new("plain.tar")).as_deref(),
        Some("plain")
    );
}

#[test]
fn paths_are_sanitized() {
    assert_eq!(sanitize(b"./a/b").unwrap(), Some(PathBuf::from("a/b")));
    assert_eq!(
        sanitize(b"a//b/./c/").unwrap(),
        Some(PathBuf::from("a/b/c"))
    );
    assert_eq!(sanitize(b"./").unwrap(), None);
    assert_eq!(sanitize(b"/etc/passwd"), Err("absolute path"));
    assert_eq!(sanitize(b"a/../../b"), Err("'..' component"));
    assert_eq!(sanitize(b".."), Err("'..' component"));
    assert_eq!(sanitize(b""), Err("empty path"));
}

#[test]
fn compression_is_sniffed() {
    let t = tarball(&[file("a", b"x")]);
    assert_eq!(sniff(&t).unwrap(), import::Compression::None);
    assert_eq!(sniff(&gz(&t)).unwrap(), import::Compression::Gzip);
    assert_eq!(sniff(&xz(&t)).unwrap(), import::Compression::Xz);
    assert_eq!(sniff(&zst(&t)).unwrap(), import::Compression::Zstd);
    assert_eq!(sniff(b"BZh91AY&SY").unwrap_err(), "bzip2");
}

#[test]
fn inittab_gets_powerfail_and_loses_gettys() {
    // Debian bookworm's sysvinit-core inittab has this `pf` powerwait entry active.
    let debian = "id:2:initdefault:\nsi::sysinit:/etc/init.d/rcS\n1:2345:respawn:/sbin/getty --noclear 38400 tty1\npf::powerwait:/etc/init.d/powerfail start\n";
    let (out, changed) = build::edit_inittab(debian);
    assert!(changed);
    assert!(out.contains("# disabled by berth (SIGPWR halts the CT): pf::powerwait:"));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("pf:")).count(),
        1,
        "two pf ids: sysinit ignores the second: {out}"
    );
    assert!(out.contains("# disabled by berth (no ttys in a CT): 1:2345:respawn:/sbin/getty"));
    assert!(out.lines().any(|l| l == build::POWERFAIL_LINE));
    // Idempotent: a second pass changes nothing.
    let (again, changed) = build::edit_inittab(&out);
    assert!(!changed);
    assert_eq!(again, out);
}

#[test]
fn imports_every_compression_preserving_metadata() {
    let fx = fixture();
    let body = rootfs_with(vec![
        dir("./etc/"),
        E {
            mode: 0o4750,
            uid: 1234,
            ..file("./bin/suid", b"#!/bin/sh\n")
        },
        file("./etc/a", b"hello"),
        hardlink("./etc/b", "./etc/a"),
        symlink("./etc/abs", "/etc/a"),
        E {
            mode: 0o1777,
            ..dir("./tmp/")
        },
        // Directories may come after their content, and appear implicitly.
        file("./var/lib/x", b"x"),
    ]);
    for (i, bytes) in [body.clone(), gz(&body), xz(&body), zst(&body)]
        .iter()
        .enumerate()
    {
        let name = format!("t{i}");
        let p = fx.write(&format!("{name}.tar.any"), bytes);
        let info = fx.store.import(&p, Some(&name)).unwrap();
        assert_eq!(info.kind, TemplateKind::Imported);
        assert_eq!(info.stop_signal, "SIGUSR2", "busybox init detected");
        assert_eq!(
            info.size,
            9 + 10 + 5 + 1,
            "busybox + suid + a (b is a hard link) + x"
        );
        let r = fx.store.rootfs(&name);
        let suid = fs::metadata(r.join("bin/suid")).unwrap();
        assert_eq!(suid.mode() & 0o7777, 0o4750);
        assert_eq!(suid.mtime() as u64, MTIME);
        if nix::unistd::geteuid().is_root() {
            assert_eq!((suid.uid(), suid.gid()), (1234, 1234));
        }
        let a = fs::metadata(r.join("etc/a")).unwrap();
        let b = fs::metadata(r.join("etc/b")).unwrap();
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "hard link kept");
        assert_eq!(
            fs::read_link(r.join("etc/abs")).unwrap(),
            PathBuf::from("/etc/a")
        );
        assert_eq!(fs::metadata(r.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
        assert_eq!(
            fs::metadata(r.join("etc")).unwrap().mtime() as u64,
            MTIME,
            "dir mtime set last"
        );
        assert_eq!(fs::read(r.join("var/lib/x")).unwrap(), b"x");
        assert_eq!(fx.store.get(&name).unwrap(), info);
    }
    assert_eq!(fx.store.list().unwrap().len(), 4);
    // Same name again: refused, nothing changes.
    let p = fx.write("t0.tar", &body);
    assert!(matches!(
        fx.store.import(&p, None),
        Err(TemplateError::Exists { .. })
    ));
    fx.store.remove("t1").unwrap();
    fx.assert_store(&["t0", "t2", "t3"]);
    assert!(matches!(
        fx.store.remove("t1"),
        Err(TemplateError::NotFound { .. })
    ));
}

#[test]
fn rejects_absolute_paths() {
    let fx = fixture();
    fx.reject(
        &rootfs_with(vec![file("/etc/cron.d/evil", b"x")]),
        "\"/etc/cron.d/evil\": absolute path",
    );
}

#[test]
fn rejects_dotdot() {
    let fx = fixture();
    fx.reject(
        &rootfs_with(vec![file("./bin/../../escape", b"x")]),
        "\"./bin/../../escape\": '..'",
    );
    // Even a `..` that would stay inside: there is no legitimate reason for it.
    fx.reject(&rootfs_with(vec![file("bin/../x", b"x")]), "'..'");
}

#[test]
fn rejects_hardlinks_outside() {
    let fx = fixture();
    fx.reject(
        &rootfs_with(vec![hardlink("./etc-shadow", "/etc/shadow")]),
        "points outside the archive",
    );
    fx.reject(
        &rootfs_with(vec![hardlink("./x", "../../etc/shadow")]),
        "points outside the archive",
    );
    fx.reject(
        &rootfs_with(vec![hardlink("./x", "./missing")]),
        "not (yet) in the archive",
    );
}

#[test]
fn rejects_writes_through_symlinks() {
    let fx = fixture();
    let outside = fx.work.join("outside");
    fs::create_dir(&outside).unwrap();
    let target = outside.to_str().unwrap();
    let err = fx.reject(
        &rootfs_with(vec![symlink("./a", target), file("./a/passwd", b"pwned")]),
        "\"./a/passwd\": would be written through the symlink a",
    );
    assert!(matches!(err, TemplateError::UnsafeEntry { .. }));
    assert!(!outside.join("passwd").exists(), "nothing written outside");
    // Also through an in-tree symlink, and for hard-link targets.
    fx.reject(
        &rootfs_with(vec![
            dir("./real/"),
            symlink("./l", "real"),
            file("./l/x", b"x"),
        ]),
        "written through the symlink l",
    );
    fx.reject(
        &rootfs_with(vec![symlink("./l", target), hardlink("./h", "./l/passwd")]),
        "written through the symlink l",
    );
    // A file entry over an earlier symlink replaces the link, never writes through it.
    fs::write(outside.join("victim"), "safe").unwrap();
    let victim = outside.join("victim");
    let ok = rootfs_with(vec![
        symlink("./v", victim.to_str().unwrap()),
        file("./v", b"new"),
    ]);
    let p = fx.write("ok.tar", &ok);
    fx.store.import(&p, Some("ok")).unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "safe");
    assert_eq!(fs::read(fx.store.rootfs("ok").join("v")).unwrap(), b"new");
}

#[test]
fn rejects_replacing_directories() {
    let fx = fixture();
    fx.reject(
        &rootfs_with(vec![
            dir("./d/"),
            symlink("./d", "/etc"),
            file("./d/passwd", b"x"),
        ]),
        "replaces the directory d",
    );
}

#[test]
fn skips_device_nodes() {
    let fx = fixture();
    let body = rootfs_with(vec![
        dir("./dev/"),
        E {
            kind: EntryType::Char,
            ..file("./dev/null", b"")
        },
        E {
            kind: EntryType::Block,
            ..file("./dev/sda", b"")
        },
    ]);
    let p = fx.write("dev.tar", &body);
    fx.store.import(&p, Some("dev")).unwrap();
    let r = fx.store.rootfs("dev");
    assert!(r.join("dev").is_dir());
    assert!(fs::symlink_metadata(r.join("dev/null")).is_err());
    assert!(fs::symlink_metadata(r.join("dev/sda")).is_err());
}

#[test]
fn rejects_truncated_and_corrupt_archives() {
    let fx = fixture();
    let body = rootfs_with(vec![file("./big", &[7u8; 5000])]);
    // Cut in the middle of the last file's data.
    fx.reject(&body[..body.len() - 1024 - 2048], "corrupt or truncated");
    // Cut exactly at a header boundary: the tar crate alone would call this a clean end.
    let headers_only = tarball(&[
        dir("./"),
        file("./bin/busybox", b"x"),
        symlink("./sbin/init", "/bin/busybox"),
    ]);
    fx.reject(
        &headers_only[..headers_only.len() - 1024],
        "without the end-of-archive marker",
    );
    // A flipped byte in a header fails its checksum.
    let mut bad = body.clone();
    bad[600] ^= 0xff;
    fx.reject(&bad, "corrupt");
    // Compressed streams cut short or damaged.
    let g = gz(&body);
    fx.reject(&g[..g.len() / 2], "corrupt or truncated");
    let mut g2 = g.clone();
    let n = g2.len();
    g2[n - 6] ^= 0xff; // CRC32 in the gzip trailer
    fx.reject(&g2, "corrupt or truncated");
    let x = xz(&body);
    fx.reject(&x[..x.len() - 10], "corrupt or truncated");
    let z = zst(&body);
    fx.reject(&z[..z.len() - 10], "corrupt or truncated");
}

#[test]
fn rejects_unknown_compression_missing_file_and_empty_archives() {
    let fx = fixture();
    fx.reject(b"BZh91AY&SY\x00\x00", "unknown compression bzip2");
    fx.reject(
        b"just some text, not an archive at all",
        "unknown compression",
    );
    fx.reject(b"", "unknown compression (empty file)");
    let missing = fx.work.join("missing.tar.gz");
    let e = fx.store.import(&missing, None).unwrap_err();
    assert!(
        matches!(&e, TemplateError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{e}"
    );
    crate::error_chain::assert_causes_not_repeated(&e);
    assert_eq!(
        crate::error_chain::ErrorChain(&e).to_string(),
        format!(
            "open archive {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    fx.reject(&tarball(&[dir("./"), dir("./etc/")]), "contains no files");
    fx.reject(&gz(&tarball(&[])), "contains no files");
    fx.reject(
        &tarball(&[dir("./"), file("./etc/x", b"1")]),
        "no /sbin/init",
    );
}

#[test]
fn sysvinit_import_gets_powerfail_entry() {
    let fx = fixture();
    let body = tarball(&[
        dir("./"),
        file("./sbin/init", b"\x7fELF sysvinit"),
        file("./etc/inittab", b"id:2:initdefault:\n"),
    ]);
    let p = fx.write("sysv.tar", &body);
    let info = fx.store.import(&p, Some("sysv")).unwrap();
    assert_eq!(info.stop_signal, "SIGPWR");
    let tab = fs::read_to_string(fx.store.rootfs("sysv").join("etc/inittab")).unwrap();
    assert!(tab.contains(build::POWERFAIL_LINE));
    let body = tarball(&[dir("./"), symlink("./sbin/init", "/lib/systemd/systemd")]);
    let p = fx.write("sd.tar", &body);
    assert_eq!(
        fx.store.import(&p, Some("sd")).unwrap().stop_signal,
        "SIGRTMIN+4"
    );
}

/// What tar 0.4's own `unpack_in` does with the same hostile entries: it does not write outside
/// the destination, but it skips or rewrites entries silently, so an import built on it would
/// "succeed" with a different tree than the archive describes. That is why berth rejects instead.
#[test]
fn tar_unpack_in_guards_but_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let body = tarball(&[
        file("../escape", b"x"),
        file("/abs", b"x"),
        symlink("a", outside.to_str().unwrap()),
        file("a/passwd", b"x"),
    ]);
    let mut ar = tar::Archive::new(&body[..]);
    let mut results = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        results.push(e.unpack_in(&dst).map_err(|e| e.to_string()));
    }
    assert_eq!(results[0], Ok(false), "'..' skipped without error");
    assert_eq!(results[1], Ok(true), "leading '/' stripped");
    assert!(dst.join("abs").exists());
    assert!(
        results[3]
            .as_ref()
            .is_err_and(|e| e.contains("outside of destination"))
    );
    assert!(!outside.join("passwd").exists());
    assert!(!tmp.path().join("escape").exists());
}

#[test]
fn stale_scratch_directories_are_cleaned() {
    let fx = fixture();
    // pid 0 never names a live process in /proc; our own pid does.
    let dead = fx.store.dir.join(".import-debian-12-0-3");
    let live = fx
        .store
        .dir
        .join(format!(".build-x-{}-0", std::process::id()));
    for d in [&dead, &live] {
        fs::create_dir_all(d.join("rootfs/etc")).unwrap();
    }
    fs::create_dir(fx.store.dir.join("keep")).unwrap();
    assert_eq!(fx.store.cleanup_stale().unwrap(), 1);
    assert!(!dead.exists());
    assert!(live.exists());
    assert!(fx.store.dir.join("keep").exists());
    assert_eq!(super::scratch_owner(".remove-a-b-c-42-7"), Some(42));
    assert_eq!(super::scratch_owner("debian-12"), None);
}

#[test]
fn debian_init_choices_and_a_clear_error_for_others() {
    assert_eq!("systemd".parse(), Ok(DebianInit::Systemd));
    assert_eq!("sysvinit".parse(), Ok(DebianInit::Sysvinit));
    assert_eq!(DebianInit::default(), DebianInit::Sysvinit);
    for bad in ["upstart", "", "Systemd", "systemd "] {
        let e = bad.parse::<DebianInit>().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("unknown init {bad:?} for a Debian template (choose systemd or sysvinit)")
        );
    }
}

/// A gzip bomb and a header claiming a terabyte are refused before their data is written, with
/// an error naming the entry and the limit, instead of filling the disk holding the store.
#[test]
fn refuses_archives_expanding_past_the_limit() {
    let fx = fixture();
    let zeros = vec![0u8; 16 << 20];
    let bomb = gz(&rootfs_with(vec![file("big", &zeros)]));
    let p = fx.write("bomb.tar.gz", &bomb);
    assert!(bomb.len() < 1 << 20, "the bomb compresses");
    let dest = fx.work.join("dest");
    fs::create_dir(&dest).unwrap();
    let opts = || ExtractOpts {
        shift: None,
        devices: false,
        xattrs: false,
        sparse: false,
    };
    let err = extract_limited(&p, &dest, opts(), Some(8 << 20)).unwrap_err();
    assert!(
        matches!(&err, TemplateError::TooLarge { entry, limit, .. } if entry == "big" && *limit == 8 << 20),
        "{err}"
    );
    assert!(!dest.join("big").exists(), "the bomb's entry was written");

    // A header alone claiming 1 TiB: refused on its size, the data never read.
    let mut h = Header::new_gnu();
    h.set_path("huge").unwrap();
    h.set_size(1 << 40);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_entry_type(EntryType::Regular);
    h.set_cksum();
    let p = fx.write("huge.tar", h.as_bytes());
    let dest = fx.work.join("dest2");
    fs::create_dir(&dest).unwrap();
    let err = extract_limited(&p, &dest, opts(), None).unwrap_err();
    assert!(matches!(err, TemplateError::TooLarge { .. }), "{err}");
    assert!(!dest.join("huge").exists());
}
