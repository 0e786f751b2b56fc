//! `berth import vz` of the other private area formats and the node's network classes: a ploop
//! image built here (ext4 in a GPT partition, converted to the Parallels format) imported with
//! nothing left behind and a two-delta one refused; vzdump `.tar.lzo` and `tar --acls --xattrs`
//! archives; networks_classes loaded into an empty class table, left when equal, refused when
//! different unless --replace-classes.

use std::fs;
use std::path::Path;
use std::process::Command;

use berth_tests::ct::TestHost;
use berth_tests::vz::*;

const VZ_CONF: &str = "VE_PRIVATE=/vz/private/$VEID\nTRAFFIC_SHAPING=yes\n";
const SIMPLE_CONF: &str = "HOSTNAME=\"tree.example.com\"\nPHYSPAGES=\"0:128M\"\n";

/// The backing files of this machine's loop devices that lie under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file"))
            && b.contains(dir.to_str().unwrap())
        {
            out.push(b.trim().to_string());
        }
    }
    out
}

/// What is in the installation's private/ besides the CTs' own directories.
fn scratch_left(h: &TestHost) -> Vec<String> {
    fs::read_dir(h.root.join("private"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn ploop_of_one_delta_imports_its_tree_and_several_deltas_are_refused() {
    let h = TestHost::new();
    let n = VzNode::new(VZ_CONF);
    n.conf(501, SIMPLE_CONF);
    n.conf(502, SIMPLE_CONF);
    let tree = n.path("tree");
    build_tree(&tree);
    let area = n.path("private/501");
    ploop_area(&area, &tree, 160);
    let image = area.join("root.hdd/root.hds");

    let v = ok_json(&h, &n.args(&["501", "--dry-run"]));
    assert_eq!(v["cts"][0]["files"]["kind"], "ploop", "{v}");
    assert_eq!(v["cts"][0]["files"]["path"], image.to_str().unwrap());
    assert!(!h.root.join("private/501").exists());

    let v = ok_json(&h, &n.args(&["501"]));
    assert_eq!(v["cts"][0]["imported"], true);
    let base = userns_base(&h, "501");
    let dst = h.root.join("private/501");
    // The filesystem's own lost+found is part of the CT's tree, as on the OpenVZ node.
    assert!(dst.join("lost+found").is_dir());
    fs::remove_dir(dst.join("lost+found")).unwrap();
    // mkfs.ext4 -d keeps whole seconds, as tar does.
    assert_imported_same(&tree, &dst, base, true);
    assert_eq!(acls(&tree, 0), acls(&dst, base.0), "ACLs (ids shifted)");
    assert_eq!(xattrs(&tree), xattrs(&dst));
    let conf: toml::Value =
        toml::from_str(&fs::read_to_string(h.root.join("conf/501.toml")).unwrap()).unwrap();
    assert_eq!(
        conf["imported"]["private"].as_str(),
        Some(area.to_str().unwrap())
    );
    // No raw copy, mount point, mount or loop device outlives the import.
    assert_eq!(scratch_left(&h), Vec::<String>::new());
    assert_eq!(loops_under(&h.root), Vec::<String>::new());

    // Two deltas (a snapshot): refused naming the way out, nothing made.
    let two = n.path("private/502");
    fs::create_dir_all(two.join("root.hdd")).unwrap();
    fs::copy(&image, two.join("root.hdd/root.hds")).unwrap();
    fs::copy(&image, two.join("root.hdd/root.hds.{snap}")).unwrap();
    fs::write(
        two.join("root.hdd/DiskDescriptor.xml"),
        ploop_descriptor(160 << 11, &["root.hds", "root.hds.{snap}"]),
    )
    .unwrap();
    for dry in [true, false] {
        let mut a = vec!["502"];
        if dry {
            a.push("--dry-run");
        }
        let e = fails(&h, &n.args(&a));
        assert!(
            e.contains("2 deltas") && e.contains("ploop snapshot-merge"),
            "{e}"
        );
        assert_no_ct(&h, 502);
    }
    // An image qemu-img cannot read: its error, and nothing left.
    fs::write(
        two.join("root.hdd/DiskDescriptor.xml"),
        ploop_descriptor(160 << 11, &["root.hds"]),
    )
    .unwrap();
    fs::write(two.join("root.hdd/root.hds"), vec![7u8; 4096]).unwrap();
    let e = fails(&h, &n.args(&["502"]));
    assert!(e.contains("qemu-img convert"), "{e}");
    assert_no_ct(&h, 502);
    assert_eq!(scratch_left(&h), Vec::<String>::new());
    assert_eq!(loops_under(&h.root), Vec::<String>::new());

    h.ok(&["destroy", "501"]);
    h.assert_clean();
}

fn tar(args: &[&str], src: &Path) {
    let o = Command::new("tar")
        .args(args)
        .arg("-C")
        .arg(src)
        .arg(".")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn vzdump_lzo_archive_imports_and_a_damaged_one_is_refused() {
    let h = TestHost::new();
    let n = VzNode::new(VZ_CONF);
    let src = n.path("tree");
    build_tree(&src);
    fs::write(src.join("etc/vzdump/vps.conf"), SIMPLE_CONF).unwrap();
    let ar = n.path("vzdump-openvz-601-2016_01_02-03_04_05.tar.lzo");
    let plain = n.path("plain.tar");
    tar(
        &[
            "--format=gnu",
            "--sparse",
            "--numeric-owner",
            "-cpf",
            plain.to_str().unwrap(),
        ],
        &src,
    );
    let o = Command::new("lzop")
        .args(["-q", "-o"])
        .arg(&ar)
        .arg(&plain)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ars = ar.to_str().unwrap();
    let v = ok_json(&h, &n.args(&["601", "--archive", ars]));
    assert_eq!(v["cts"][0]["config"]["hostname"], "tree.example.com");
    let base = userns_base(&h, "601");
    assert_imported_same(&src, &h.root.join("private/601"), base, true);

    // Cut short: lzop's failure, nothing left.
    let bytes = fs::read(&ar).unwrap();
    let cut = n.path("vzdump-openvz-602-cut.tar.lzo");
    fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = fails(&h, &n.args(&["602", "--archive", cut.to_str().unwrap()]));
    assert!(e.contains("lzop"), "{e}");
    assert_no_ct(&h, 602);
    h.ok(&["destroy", "601"]);
    h.assert_clean();
}

#[test]
fn networks_classes_load_into_an_empty_table_and_differing_ones_need_replace() {
    let h = TestHost::new();
    let n = VzNode::new(VZ_CONF);
    let classes = "# the node's classes\n1 0.0.0.0/0\n2 198.51.100.0/24\n1 ::/0\n";
    fs::write(n.path("vz/networks_classes"), classes).unwrap();
    for c in [701, 702, 703] {
        n.conf(c, SIMPLE_CONF);
        let p = n.path(&format!("private/{c}"));
        fs::create_dir_all(p.join("sbin")).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", p.join("sbin/init")).unwrap();
    }
    let list = |h: &TestHost| -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&h.ok(&["netclass", "list", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| format!("{} {}", e["class"], e["net"].as_str().unwrap()))
            .collect()
    };
    assert_eq!(list(&h), Vec::<String>::new());
    // A dry run says what would happen and loads nothing.
    let v = ok_json(&h, &n.args(&["701", "--dry-run"]));
    assert_eq!(v["networks_classes"]["action"], "load", "{v}");
    assert_eq!(v["networks_classes"]["applied"], false);
    assert_eq!(list(&h), Vec::<String>::new());

    let v = ok_json(&h, &n.args(&["701"]));
    assert_eq!(v["networks_classes"]["applied"], true, "{v}");
    let want = vec!["1 0.0.0.0/0", "2 198.51.100.0/24", "1 ::/0"];
    assert_eq!(list(&h), want);

    // The same table again (written differently): left as it is.
    fs::write(
        n.path("vz/networks_classes"),
        "1 ::/0\n2 198.51.100.7/24\n1 0.0.0.0/0\n",
    )
    .unwrap();
    let v = ok_json(&h, &n.args(&["702"]));
    assert_eq!(v["networks_classes"]["action"], "unchanged", "{v}");
    assert_eq!(list(&h), want);

    // Different: refused before any CT is made, the host's table kept.
    fs::write(
        n.path("vz/networks_classes"),
        "3 203.0.113.0/24\n1 0.0.0.0/0\n",
    )
    .unwrap();
    let e = fails(&h, &n.args(&["703"]));
    assert!(
        e.contains("differ from this host's class table") && e.contains("--replace-classes"),
        "{e}"
    );
    assert_no_ct(&h, 703);
    assert_eq!(list(&h), want);
    let v = ok_json(&h, &n.args(&["703", "--replace-classes"]));
    assert_eq!(v["networks_classes"]["action"], "replace", "{v}");
    assert_eq!(list(&h), vec!["1 0.0.0.0/0", "3 203.0.113.0/24"]);
    for c in ["701", "702", "703"] {
        h.ok(&["destroy", c]);
    }
    h.assert_clean();
}

#[test]
fn vzdump_archive_with_acls_and_xattrs_restores_them_shifted() {
    let h = TestHost::new();
    let n = VzNode::new(VZ_CONF);
    let src = n.path("tree");
    build_tree(&src);
    fs::write(src.join("etc/vzdump/vps.conf"), SIMPLE_CONF).unwrap();
    // As vzdump makes them (both the ACL text records and the xattrs), and with --acls alone
    // (the text records only).
    let cases = [
        ("801", vec!["--acls", "--xattrs", "--xattrs-include=*"]),
        ("802", vec!["--acls"]),
    ];
    for (ct, flags) in &cases {
        let ar = n.path(&format!("vzdump-openvz-{ct}-2016_01_02-03_04_05.tar.gz"));
        let mut args = vec!["--format=posix", "--numeric-owner", "-czpf"];
        args.push(ar.to_str().unwrap());
        args.extend(flags);
        tar(&args, &src);
        ok_json(&h, &n.args(&[ct, "--archive", ar.to_str().unwrap()]));
        let base = userns_base(&h, ct);
        let dst = h.root.join(format!("private/{ct}"));
        assert_imported_same(&src, &dst, base, true);
        assert_eq!(
            acls(&src, 0),
            acls(&dst, base.0),
            "CT {ct}: ACLs, ids shifted"
        );
        let got = acls(&dst, 0);
        assert!(
            got.iter()
                .any(|l| l.ends_with(&format!("user:{}:r--", 1500 + base.0))),
            "CT {ct}: {got:?}"
        );
        if flags.contains(&"--xattrs") {
            assert_eq!(xattrs(&src), xattrs(&dst), "CT {ct}");
        }
    }

    // An ACL naming a user (made without --numeric-owner ids): which id it means on the
    // source host is unknown, so it is refused naming it, and nothing is made.
    let ar = n.path("vzdump-openvz-803-names.tar");
    let mut b = tar::Builder::new(fs::File::create(&ar).unwrap());
    let mut add = |path: &str, data: &[u8], pax: Option<&[u8]>| {
        if let Some(acl) = pax {
            b.append_pax_extensions([("SCHILY.acl.access", acl)])
                .unwrap();
        }
        let mut hd = tar::Header::new_ustar();
        hd.set_path(path).unwrap();
        hd.set_mode(0o644);
        hd.set_uid(0);
        hd.set_gid(0);
        hd.set_mtime(1);
        hd.set_size(data.len() as u64);
        hd.set_cksum();
        b.append(&hd, data).unwrap();
    };
    add("./etc/vzdump/vps.conf", SIMPLE_CONF.as_bytes(), None);
    add("./sbin/init", b"x", None);
    add(
        "./etc/secret",
        b"s",
        Some(b"user::rw-\nuser:alice:r--\ngroup::r--\nmask::r--\nother::---\n"),
    );
    b.finish().unwrap();
    drop(b);
    let e = fails(&h, &n.args(&["803", "--archive", ar.to_str().unwrap()]));
    assert!(e.contains("\"alice\"") && e.contains("numeric"), "{e}");
    assert_no_ct(&h, 803);
    for (ct, _) in &cases {
        h.ok(&["destroy", ct]);
    }
    h.assert_clean();
}
