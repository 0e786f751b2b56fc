//! Unprivileged by default: every CT's own id range from the host's pool, the template shared
//! through an id-mapped lower layer (no copy), privileged CTs only on request, conversion of a
//! stopped CT, and the pool's bad inputs changing nothing.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use berth_tests::ct::TestHost;

fn claims(h: &TestHost) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(h.root.join("userns"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Bytes of every file and directory below `p` (st_blocks, so what the disk really holds).
fn disk_bytes(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let md = fs::symlink_metadata(&d).unwrap();
        total += md.blocks() * 512;
        if md.is_dir() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                stack.push(e.path());
            }
        }
    }
    total
}

fn uid_map(h: &TestHost, ct: &str) -> Vec<u64> {
    let (code, out, err) = h.exec(ct, &["cat", "/proc/self/uid_map"]);
    assert_eq!(code, 0, "{err}");
    out.split_whitespace().map(|x| x.parse().unwrap()).collect()
}

#[test]
fn a_default_ct_is_unprivileged_with_its_own_range_and_shares_the_template() {
    let h = TestHost::new();
    h.ok(&["create", "5101", "--hostname", "u5101"]);
    h.ok(&["create", "5102"]);
    let a = h.status("5101");
    let b = h.status("5102");
    assert_eq!(a["privileged"], false, "{a}");
    let (ba, bb) = (
        a["userns"]["uid_base"].as_u64().unwrap(),
        b["userns"]["uid_base"].as_u64().unwrap(),
    );
    assert_eq!(a["userns"]["size"], 65536);
    assert!(ba.abs_diff(bb) >= 65536, "ranges overlap: {ba} {bb}");
    assert!(ba >= 65536 && bb >= 65536);
    assert_eq!(a["layout"], "overlay");
    assert_eq!(claims(&h).len(), 2);
    // The private area is the overlay's upper layer only: no copy of the template.
    let private = h.root.join("private/5101");
    let bytes = disk_bytes(&private);
    assert!(bytes < 1 << 20, "private area holds {bytes} bytes");
    assert_eq!(
        fs::metadata(private.join("upper")).unwrap().uid() as u64,
        ba
    );
    let list = h.ok(&["list", "-a", "-H", "-o", "ctid,privileged,uid_base"]);
    let row: Vec<&str> = list
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&"5101"))
        .unwrap_or_default();
    assert_eq!(row, ["5101", "no", &ba.to_string()], "{list}");

    h.ok(&["start", "5101"]);
    assert_eq!(uid_map(&h, "5101"), vec![0, ba, 65536]);
    // The template's root-owned files are the CT root's; what it writes lands in the upper layer
    // owned by its range on the host.
    let (code, out, err) = h.exec(
        "5101",
        &[
            "sh",
            "-c",
            "stat -c %u:%g /bin/busybox /etc/hostname && echo x > /root/f && chown 33:44 /root/f && cat /etc/hostname",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "0:0\n0:0\nu5101\n");
    let f = fs::metadata(private.join("upper/root/f")).unwrap();
    assert_eq!((f.uid() as u64, f.gid() as u64), (ba + 33, ba + 44));
    // The template itself is untouched and still host-root owned.
    let t = fs::metadata(h.root.join("template/busybox/rootfs/bin/busybox")).unwrap();
    assert_eq!(t.uid(), 0);
    h.ok(&["stop", "--fast", "5101"]);
    h.assert_clean();
    h.ok(&["destroy", "5101"]);
    assert_eq!(claims(&h).len(), 1, "destroy released its range");
    h.ok(&["destroy", "5102"]);
    assert_eq!(claims(&h), Vec::<String>::new());
}

#[test]
fn privileged_is_an_explicit_warned_opt_in() {
    let h = TestHost::new();
    let o = h.run(&["create", "5111", "--privileged"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("privileged") && err.contains("trusted workloads only"),
        "{err}"
    );
    let st = h.status("5111");
    assert_eq!(st["privileged"], true);
    assert!(st["userns"].is_null());
    assert!(claims(&h).is_empty());
    h.ok(&["start", "5111"]);
    assert_eq!(uid_map(&h, "5111"), vec![0, 0, 4294967295]);
    let human = h.ok(&["status", "5111"]);
    assert!(
        human.contains("privileged: the CT's root is root on the host"),
        "{human}"
    );
    h.ok(&["stop", "--fast", "5111"]);
    h.assert_clean();
}

#[test]
fn converting_a_stopped_ct_shifts_its_files_both_ways() {
    let h = TestHost::new();
    h.ok(&["create", "5121", "--privileged"]);
    h.ok(&["start", "5121"]);
    let (code, _, err) = h.exec(
        "5121",
        &["sh", "-c", "mkdir -p /home/u && echo hi > /home/u/f && chown 1000:1001 /home/u/f && chmod 4755 /home/u/f"],
    );
    assert_eq!(code, 0, "{err}");
    let err = h.fails(&["set", "5121", "--privileged", "no"]);
    assert!(err.contains("stop it first"), "{err}");
    h.ok(&["stop", "--fast", "5121"]);
    let err = h.fails(&["set", "5121", "--privileged", "no", "--memory", "1G"]);
    assert!(err.contains("takes no other setting"), "{err}");
    let err = h.fails(&["set", "5121", "--privileged", "maybe"]);
    assert!(err.contains("expected yes or no"), "{err}");

    h.ok(&["set", "5121", "--privileged", "no"]);
    let st = h.status("5121");
    assert_eq!(st["privileged"], false);
    let base = st["userns"]["uid_base"].as_u64().unwrap();
    let f = fs::metadata(h.root.join("private/5121/upper/home/u/f")).unwrap();
    assert_eq!((f.uid() as u64, f.gid() as u64), (base + 1000, base + 1001));
    assert_eq!(f.mode() & 0o7777, 0o4755, "set-id bit restored after chown");
    h.ok(&["start", "5121"]);
    let (code, out, err) = h.exec("5121", &["stat", "-c", "%u:%g %a", "/home/u/f"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "1000:1001 4755");
    h.ok(&["stop", "--fast", "5121"]);
    assert_eq!(
        h.ok(&["set", "5121", "--privileged", "no"]).trim(),
        "CT 5121 already was unprivileged"
    );

    h.ok(&["set", "5121", "--privileged", "yes"]);
    let f = fs::metadata(h.root.join("private/5121/upper/home/u/f")).unwrap();
    assert_eq!((f.uid(), f.gid()), (1000, 1001));
    assert!(claims(&h).is_empty(), "the range went back to the pool");
    h.assert_clean();
}

#[test]
fn an_interrupted_conversion_blocks_start_and_finishes_when_rerun() {
    let h = TestHost::new();
    h.ok(&["create", "5131", "--privileged"]);
    let upper = h.root.join("private/5131/upper");
    fs::create_dir_all(upper.join("a/b")).unwrap();
    fs::write(upper.join("a/b/f"), "x").unwrap();
    std::os::unix::fs::chown(upper.join("a/b/f"), Some(7), Some(8)).unwrap();
    // What a conversion killed after its journal and its first chowns leaves behind.
    let base = 1_000_000u32 + 65_536 * 5;
    fs::write(
        h.root.join("conf/5131.convert"),
        format!(
            "to = \"unprivileged\"\n\n[range]\nuid_base = {base}\ngid_base = {base}\nsize = 65536\n"
        ),
    )
    .unwrap();
    fs::create_dir_all(h.root.join("userns")).unwrap();
    fs::write(h.root.join("userns/5"), "5131\n").unwrap();
    std::os::unix::fs::chown(upper.join("a"), Some(base), Some(base)).unwrap();
    let err = h.fails(&["start", "5131"]);
    assert!(err.contains("conversion was interrupted"), "{err}");
    // gc keeps the range of a CT in mid-conversion.
    h.ok(&["gc"]);
    assert_eq!(claims(&h), vec!["5"]);
    let err = h.fails(&["set", "5131", "--privileged", "yes"]);
    assert!(err.contains("must finish first"), "{err}");
    h.ok(&["set", "5131", "--privileged", "no"]);
    assert!(!h.root.join("conf/5131.convert").exists());
    let st = h.status("5131");
    assert_eq!(st["userns"]["uid_base"].as_u64(), Some(u64::from(base)));
    for (p, want) in [
        ("a", (base, base)),
        ("a/b/f", (base + 7, base + 8)),
        ("a/b", (base, base)),
    ] {
        let m = fs::metadata(upper.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), want, "{p}");
    }
    h.ok(&["start", "5131"]);
    h.ok(&["stop", "--fast", "5131"]);
    h.assert_clean();
}

#[test]
fn a_bad_or_exhausted_pool_and_an_unmappable_template_change_nothing() {
    let h = TestHost::new();
    let nothing_made = |ct: &str| {
        assert!(!h.root.join(format!("conf/{ct}.toml")).exists());
        assert!(!h.root.join(format!("private/{ct}")).exists());
        assert!(!h.root.join(format!("private/.{ct}.tmp")).exists());
    };
    fs::create_dir_all(&h.root).unwrap();
    let conf = h.root.join("host.toml");
    fs::write(&conf, "[userns]\npool_start = 0\npool_size = 65536\n").unwrap();
    let err = h.fails(&["create", "5141"]);
    assert!(
        err.contains("host.toml") && err.contains("host's root"),
        "{err}"
    );
    nothing_made("5141");
    // uid 1 (daemon on Debian) is a host user: a pool over it is refused.
    fs::write(&conf, "[userns]\npool_start = 1\npool_size = 65536\n").unwrap();
    let err = h.fails(&["create", "5141"]);
    assert!(err.contains("overlap host uid"), "{err}");
    nothing_made("5141");
    assert!(claims(&h).is_empty());
    // One range only: the second CT finds the pool exhausted.
    fs::write(&conf, "[userns]\npool_start = 3000000\npool_size = 65536\n").unwrap();
    h.ok(&["create", "5141"]);
    let err = h.fails(&["create", "5142"]);
    assert!(
        err.contains("CT 5142") && err.contains("exhausted"),
        "{err}"
    );
    nothing_made("5142");
    assert_eq!(claims(&h), vec!["0"]);
    // A claim whose create was killed before it saved a config goes back to the pool in gc.
    h.ok(&["destroy", "5141"]);
    fs::write(h.root.join("userns/0"), "5149\n").unwrap();
    let rep = h.json(&["gc"]);
    assert_eq!(
        rep["released_id_ranges"].as_array().unwrap().len(),
        1,
        "{rep}"
    );
    assert!(
        !h.root.join("run/5149.lock").exists(),
        "gc left a lock file"
    );
    h.ok(&["create", "5143"]);

    // A template with a file owned by an id no 65536-id range can map.
    let dir = h.dir.path().join("odd");
    fs::create_dir_all(dir.join("sbin")).unwrap();
    fs::copy(
        h.root.join("template/busybox/rootfs/bin/busybox"),
        dir.join("sbin/init"),
    )
    .unwrap();
    fs::write(dir.join("big"), "x").unwrap();
    std::os::unix::fs::chown(dir.join("big"), Some(70_000), Some(0)).unwrap();
    let tar = h.dir.path().join("odd.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .args(["--numeric-owner", "-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    h.ok(&["template", "import", tar.to_str().unwrap(), "--name", "odd"]);
    fs::write(&conf, "").unwrap();
    let err = h.fails(&["create", "5144", "--template", "odd"]);
    assert!(
        err.contains("owned by id 70000") && err.contains("--privileged"),
        "{err}"
    );
    nothing_made("5144");
    h.ok(&["create", "5144", "--template", "odd", "--privileged"]);
    let err = h.fails(&["set", "5144", "--privileged", "no"]);
    assert!(err.contains("70000"), "{err}");
    assert_eq!(
        h.status("5144")["privileged"],
        true,
        "a refused conversion changed the CT"
    );
}
