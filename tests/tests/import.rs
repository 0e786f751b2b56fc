//! `berth import vz`: OpenVZ configs written here as vzctl writes them, mapped key by key;
//! a simfs private area with everything a copy can lose, imported from a directory and from a
//! vzdump archive; ploop and bad input refused with nothing left behind; an imported busybox
//! CT with its own OpenVZ-style venet0 setup booted routed and answering on its addresses; and
//! the boot order of `start --all-onboot` / `stop --all`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, wait_for};
use berth_tests::template::{Node, assert_same_tree, snapshot};
use serde_json::Value;

/// An OpenVZ node's /etc/vz, in a directory of the test's own.
struct VzNode {
    dir: tempfile::TempDir,
}

impl VzNode {
    fn new(vz_conf: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-vz-")
            .tempdir()
            .unwrap();
        fs::create_dir_all(dir.path().join("vz/conf")).unwrap();
        fs::create_dir_all(dir.path().join("vz/names")).unwrap();
        let private = dir.path().join("private");
        fs::create_dir_all(&private).unwrap();
        let vz_conf = vz_conf.replace("/vz/private", private.to_str().unwrap());
        fs::write(dir.path().join("vz/vz.conf"), vz_conf).unwrap();
        fs::write(
            dir.path().join("resolv.conf"),
            "nameserver 198.51.100.53\nsearch node.example\n",
        )
        .unwrap();
        Self { dir }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// Writes CTID.conf, its VE_PRIVATE pointed into the node's directory.
    fn conf(&self, ctid: u32, text: &str) {
        let text = text.replace("/vz/private", self.path("private").to_str().unwrap());
        fs::write(self.path(&format!("vz/conf/{ctid}.conf")), text).unwrap();
    }
    fn name(&self, name: &str, ctid: u32) {
        symlink(
            format!("../conf/{ctid}.conf"),
            self.path(&format!("vz/names/{name}")),
        )
        .unwrap();
    }
    /// `import vz` arguments for this node.
    fn args<'a>(&'a self, rest: &[&'a str]) -> Vec<String> {
        let mut v = vec![
            "import".to_string(),
            "vz".into(),
            "--conf-dir".into(),
            self.path("vz/conf").display().to_string(),
            "--vz-conf".into(),
            self.path("vz/vz.conf").display().to_string(),
            "--resolv-conf".into(),
            self.path("resolv.conf").display().to_string(),
        ];
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    }
}

fn run_args(h: &TestHost, args: &[String]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    h.run(&a)
}

fn ok_json(h: &TestHost, args: &[String]) -> Value {
    let mut a = args.to_vec();
    a.push("--json".into());
    let o = run_args(h, &a);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn fails(h: &TestHost, args: &[String]) -> String {
    let o = run_args(h, args);
    assert!(
        !o.status.success(),
        "{args:?} succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// key → (verdict, target) of one CT's report.
fn verdicts(ct: &Value) -> BTreeMap<String, (String, String)> {
    ct["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap().to_string(),
                (
                    i["verdict"].as_str().unwrap().to_string(),
                    i["target"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// Asserts nothing of CT `ctid` exists in the installation (no half CT).
fn assert_no_ct(h: &TestHost, ctid: u32) {
    assert!(
        !h.root.join(format!("conf/{ctid}.toml")).exists(),
        "config of {ctid} left"
    );
    assert!(
        !h.root.join(format!("private/{ctid}")).exists(),
        "private area of {ctid} left"
    );
    assert!(
        !h.root.join(format!("private/.{ctid}.tmp")).exists(),
        "scratch of {ctid} left"
    );
    let claims: Vec<String> = fs::read_dir(h.root.join("userns"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !claims.iter().any(|c| c.trim() == ctid.to_string()),
        "id range of {ctid} left: {claims:?}"
    );
}

const VZ_CONF: &str = r#"## Global parameters
VIRTUOZZO=yes
LOCKDIR=/vz/lock
VE_ROOT=/vz/root/$VEID
VE_PRIVATE=/vz/private/$VEID
TRAFFIC_SHAPING=yes
NEIGHBOUR_DEVS=detect
IPTABLES="ipt_REJECT ipt_tos ipt_limit"
"#;

/// A VSwap CT as vzctl 4 writes it, with IPv4+IPv6 and a bridged NETIF.
const VSWAP_101: &str = r#"# Configuration file generated by vzctl
PHYSPAGES="0:262144"
SWAPPAGES="0:512M"
DISKSPACE="2G:2.2G"
DISKINODES="131072:144179"
QUOTATIME="0"
CPUUNITS="1000"
CPULIMIT="50%"
CPUS="2"
IOPRIO="6"
NUMPROC="400:400"
KMEMSIZE="unlimited"
VE_ROOT="/vz/root/$VEID"
VE_PRIVATE="/vz/private/$VEID"
OSTEMPLATE="debian-7.0-x86_64"
ORIGIN_SAMPLE="vswap-1g"
HOSTNAME="web1.example.com"
IP_ADDRESS="192.0.2.101 192.0.2.111/24 2001:db8:1::101"
NETIF="ifname=eth0,mac=00:18:51:AA:BB:01,host_ifname=veth101.0,host_mac=00:18:51:CC:DD:01,bridge=vmbr0"
NAMESERVER="inherit"
SEARCHDOMAIN="example.com"
RATE="eth0:1:8000 eth0:2:2000"
ONBOOT="yes"
BOOTORDER="20"
STOP_TIMEOUT="45"
CAPABILITY="SYS_TIME:on"
DEVICES="c:10:200:rw"
NAME="web1"
"#;

/// A pre-VSwap CT from the old ve-basic sample: beancounters, LONG_MAX, no PHYSPAGES limit.
const BASIC_102: &str = r#"ONBOOT="no"
KMEMSIZE="14372700:14790164"
LOCKEDPAGES="256:256"
PRIVVMPAGES="65536:69632"
SHMPAGES="21504:21504"
NUMPROC="240:240"
PHYSPAGES="0:9223372036854775807"
VMGUARPAGES="33792:9223372036854775807"
OOMGUARPAGES="26112:9223372036854775807"
NUMTCPSOCK="360:360"
NUMFLOCK="188:206"
NUMPTY="16:16"
NUMSIGINFO="256:256"
TCPSNDBUF="1720320:2703360"
TCPRCVBUF="1720320:2703360"
OTHERSOCKBUF="1126080:2097152"
DGRAMRCVBUF="262144:262144"
NUMOTHERSOCK="360:360"
DCACHESIZE="3409920:3624960"
NUMFILE="9312:9312"
AVNUMPROC="180:180"
NUMIPTENT="128:128"
DISKSPACE="1048576:1153024"
DISKINODES="200000:220000"
QUOTATIME="0"
CPUUNITS="1000"
IP_ADDRESS="192.0.2.102"
HOSTNAME="basic.example.com"
NAMESERVER="192.0.2.53 2001:db8::53"
"#;

/// Decimals, unlimited, a name and a host name berth refuses.
const ODD_103: &str = r#"PHYSPAGES="1G:1.5G"
SWAPPAGES="unlimited"
DISKSPACE="unlimited"
NUMPROC="9223372036854775807"
CPULIMIT="150"
NAME="my web server!"
HOSTNAME="under_score.example"
"#;

#[test]
fn configs_map_key_by_key_and_dry_run_changes_nothing() {
    let h = TestHost::new();
    let n = VzNode::new(VZ_CONF);
    n.conf(101, VSWAP_101);
    n.conf(102, BASIC_102);
    n.conf(103, ODD_103);
    n.name("basic", 102);
    for c in [101, 102, 103] {
        fs::create_dir_all(n.path(&format!("private/{c}/etc"))).unwrap();
    }
    let before = snapshot(&h.root).unwrap();

    // CPULIMIT in % without the source's CPU count: refused, naming file, line and key.
    let e = fails(&h, &n.args(&["all", "--dry-run"]));
    let conf101 = n.path("vz/conf/101.conf").display().to_string();
    assert!(
        e.contains(&format!("{conf101}:8: CPULIMIT")) && e.contains("--source-cpus"),
        "{e}"
    );

    let v = ok_json(&h, &n.args(&["all", "--dry-run", "--source-cpus", "4"]));
    assert_eq!(v["dry_run"], true);
    let cts = v["cts"].as_array().unwrap();
    assert_eq!(cts.len(), 3);

    // 101: VSwap, key by key.
    let c = &cts[0]["config"];
    assert_eq!(cts[0]["ctid"], 101);
    assert_eq!(c["hostname"], "web1.example.com");
    assert_eq!(c["name"], "web1");
    assert_eq!(c["onboot"], true);
    assert_eq!(c["bootorder"], 20);
    assert_eq!(c["stop_timeout"], 45);
    assert_eq!(c["layout"], "copy");
    let r = &c["resources"];
    assert_eq!(r["memory"], "1G");
    assert_eq!(r["swap"], "512M");
    assert_eq!(r["cpuunits"], 1000);
    assert_eq!(r["cpulimit"], 200, "50% of 4 CPUs");
    assert_eq!(r["cpus"], 2);
    assert_eq!(r["numproc"], 400);
    assert_eq!(r["ioweight"], 400);
    let limit = (2.2 * (1u64 << 30) as f64).round() as u64;
    assert_eq!(r["diskspace"], limit.to_string());
    let ifaces = c["net"]["ifaces"].as_array().unwrap();
    assert_eq!(ifaces[0]["mode"], "routed");
    assert_eq!(
        ifaces[0]["addrs"],
        serde_json::json!(["192.0.2.101", "192.0.2.111", "2001:db8:1::101"])
    );
    assert_eq!(ifaces[1]["mode"], "bridged");
    assert_eq!(ifaces[1]["name"], "eth0");
    assert_eq!(ifaces[1]["mac"], "00:18:51:aa:bb:01");
    assert_eq!(ifaces[1]["host_ifname"], "veth101.0");
    assert_eq!(ifaces[1]["host_mac"], "00:18:51:cc:dd:01");
    assert_eq!(ifaces[1]["bridge"], "vmbr0");
    assert_eq!(
        c["net"]["nameservers"],
        serde_json::json!(["198.51.100.53"])
    );
    assert_eq!(
        c["net"]["searchdomains"],
        serde_json::json!(["example.com"])
    );
    let classes = c["shaping"]["class"].as_array().unwrap();
    assert_eq!(classes.len(), 2);
    assert_eq!(classes[0]["class"], 1);
    assert_eq!(classes[0]["rate_out"], "8mbit");
    assert_eq!(classes[1]["rate_out"], "2mbit");
    let vd = verdicts(&cts[0]);
    let want = [
        ("PHYSPAGES", "MAP"),
        ("SWAPPAGES", "MAP"),
        ("DISKSPACE", "APPROX"),
        ("DISKINODES", "DROP"),
        ("QUOTATIME", "DROP"),
        ("CPUUNITS", "MAP"),
        ("CPULIMIT", "APPROX"),
        ("CPUS", "MAP"),
        ("IOPRIO", "APPROX"),
        ("NUMPROC", "MAP"),
        ("KMEMSIZE", "DROP"),
        ("OSTEMPLATE", "MAP"),
        ("ORIGIN_SAMPLE", "DROP"),
        ("HOSTNAME", "MAP"),
        ("IP_ADDRESS", "APPROX"),
        ("NETIF", "MAP"),
        ("NAMESERVER", "APPROX"),
        ("SEARCHDOMAIN", "MAP"),
        ("RATE", "APPROX"),
        ("ONBOOT", "MAP"),
        ("BOOTORDER", "MAP"),
        ("STOP_TIMEOUT", "MAP"),
        ("CAPABILITY", "DROP"),
        ("DEVICES", "DROP"),
        ("NAME", "MAP"),
        ("VE_ROOT", "DROP"),
        ("VE_PRIVATE", "MAP"),
        ("IPTABLES", "DROP"),
        ("NEIGHBOUR_DEVS", "MAP"),
    ];
    for (k, verdict) in want {
        assert_eq!(
            vd.get(k).map(|v| v.0.as_str()),
            Some(verdict),
            "101 {k}: {vd:?}"
        );
    }
    assert_eq!(vd.len(), want.len(), "101: unexpected keys in {vd:?}");
    assert_eq!(vd["VE_PRIVATE"].1, "private/101");

    // 102: pre-VSwap. Memory from the VMGUARPAGES barrier, with a warning; beancounters dropped.
    let c = &cts[1]["config"];
    assert_eq!(c["onboot"], Value::Null, "onboot=false is not written");
    assert_eq!(c["name"], "basic", "from names/");
    assert_eq!(c["resources"]["memory"], "132M", "33792 pages");
    assert_eq!(c["resources"]["numproc"], 240);
    assert_eq!(
        c["resources"]["diskspace"], "1126M",
        "the limit, 1153024 KiB"
    );
    assert_eq!(c["resources"]["swap"], Value::Null);
    assert_eq!(
        c["net"]["nameservers"],
        serde_json::json!(["192.0.2.53", "2001:db8::53"])
    );
    let vd = verdicts(&cts[1]);
    assert_eq!(vd["PHYSPAGES"].0, "APPROX");
    assert_eq!(
        vd["VMGUARPAGES"],
        ("APPROX".into(), "resources.memory = \"132M\"".into())
    );
    for k in [
        "KMEMSIZE",
        "LOCKEDPAGES",
        "PRIVVMPAGES",
        "SHMPAGES",
        "OOMGUARPAGES",
        "NUMTCPSOCK",
        "NUMFLOCK",
        "NUMPTY",
        "NUMSIGINFO",
        "TCPSNDBUF",
        "TCPRCVBUF",
        "OTHERSOCKBUF",
        "DGRAMRCVBUF",
        "NUMOTHERSOCK",
        "DCACHESIZE",
        "NUMFILE",
        "AVNUMPROC",
        "NUMIPTENT",
    ] {
        assert_eq!(vd[k].0, "DROP", "102 {k}");
    }
    assert_eq!(vd["names/"].0, "MAP");
    let warn = cts[1]["warnings"].to_string();
    assert!(
        warn.contains("pre-VSwap") && warn.contains("VMGUARPAGES"),
        "{warn}"
    );

    // 103: decimals and unlimited; the name and host name berth refuses are dropped, said why.
    let c = &cts[2]["config"];
    assert_eq!(c["resources"]["memory"], "1536M");
    assert_eq!(c["resources"]["cpulimit"], 150);
    for k in ["swap", "diskspace", "numproc"] {
        assert_eq!(c["resources"][k], Value::Null, "103 {k} unlimited");
    }
    assert_eq!(c["name"], Value::Null);
    assert_eq!(c["hostname"], Value::Null);
    let items = cts[2]["items"].as_array().unwrap();
    let name = items.iter().find(|i| i["key"] == "NAME").unwrap();
    assert_eq!(name["verdict"], "DROP");
    assert!(
        name["rule"].as_str().unwrap().contains("my web server!"),
        "{name}"
    );
    let host = items.iter().find(|i| i["key"] == "HOSTNAME").unwrap();
    assert!(
        host["rule"].as_str().unwrap().contains("invalid hostname"),
        "{host}"
    );

    // The human table says the same.
    let a = n.args(&["101", "--dry-run", "--source-cpus", "4"]);
    let out = String::from_utf8(run_args(&h, &a).stdout).unwrap();
    assert!(
        out.contains("CAPABILITY") && out.contains("[matters: --strict refuses]"),
        "{out}"
    );
    assert!(out.contains("dry run: nothing changed"), "{out}");

    // --strict refuses 101: a capability turned on and a device would be lost.
    let e = fails(
        &h,
        &n.args(&["101", "--dry-run", "--strict", "--source-cpus", "4"]),
    );
    assert!(
        e.contains("--strict") && e.contains("CAPABILITY") && e.contains("DEVICES"),
        "{e}"
    );

    // Nothing changed anywhere in the installation.
    assert_same_tree(&before, &snapshot(&h.root).unwrap());
    for c in [101, 102, 103] {
        assert_no_ct(&h, c);
    }
}

#[test]
fn malformed_and_unreadable_configs_are_named() {
    let h = TestHost::new();
    let n = VzNode::new(VZ_CONF);
    let path = n.path("vz/conf/104.conf").display().to_string();
    for (text, want) in [
        (
            "HOSTNAME=\"a\"\nDISKSPACE=\"10X:20X\"\n",
            format!("{path}:2: DISKSPACE: unknown suffix"),
        ),
        (
            "HOSTNAME=\"$(reboot)\"\n",
            format!("{path}:1: HOSTNAME: command substitution"),
        ),
        (
            "IP_ADDRESS=\"192.0.2.300\"\n",
            format!("{path}:1: IP_ADDRESS: \"192.0.2.300\" is not an IP address"),
        ),
        ("ONBOOT=\"maybe\"\n", format!("{path}:1: ONBOOT")),
        (
            "\n\nNUMPROC=\"12:x\n",
            format!("{path}:3: NUMPROC: unterminated"),
        ),
    ] {
        n.conf(104, text);
        let e = fails(&h, &n.args(&["104", "--dry-run"]));
        assert!(e.contains(&want), "{text:?}: {e}");
    }
    // Unreadable: a directory where the config belongs.
    fs::remove_file(n.path("vz/conf/104.conf")).unwrap();
    fs::create_dir(n.path("vz/conf/104.conf")).unwrap();
    let e = fails(&h, &n.args(&["104"]));
    assert!(e.contains(&format!("read {path}")), "{e}");
    let e = fails(&h, &n.args(&["105"]));
    assert!(e.contains("105.conf") && e.contains("No such file"), "{e}");
    assert_no_ct(&h, 104);
}

/// Builds a simfs private area with what a naive copy loses; returns the sparse file's path.
fn build_tree(root: &Path) {
    let sh = |cmd: &str| {
        let o = Command::new("sh")
            .arg("-ec")
            .arg(cmd)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    fs::create_dir_all(root).unwrap();
    sh("mkdir -p etc sbin bin dev home/alice srv/shared var/empty etc/vzdump
        ln -s /bin/busybox sbin/init
        echo hello > home/alice/file && chown 1500:2500 home/alice/file home/alice
        ln home/alice/file srv/hardlink
        echo other > srv/big-owner && chown 4242:4343 srv/big-owner
        truncate -s 64M srv/sparse && printf data | dd of=srv/sparse bs=1 seek=33554432 conv=notrunc status=none
        mknod dev/null2 c 1 3 && mknod dev/loop9 b 7 9 && mkfifo srv/fifo && chown 1500:2500 srv/fifo
        chmod 4755 bin && chmod 1777 var/empty && chmod 2770 srv/shared && chown 0:2500 srv/shared
        ln -s ../home/alice/file srv/rel-link && ln -s /etc/shadow srv/abs-link
        setfacl -m u:1500:r,g:2500:rw home/alice/file
        setfacl -d -m u:1600:rwx srv/shared
        touch -h -d '2011-04-01 12:00:00' srv/rel-link && touch -d '2012-05-06 07:08:09' home/alice/file");
    xattr::set(root.join("home/alice/file"), "user.origin", b"openvz").unwrap();
    xattr::set(root.join("srv/shared"), "user.dir", b"d").unwrap();
    xattr::set(root.join("srv/sparse"), "trusted.secret", b"t").unwrap();
}

/// getfacl -n of every file with an ACL, for comparison (ids as numbers).
fn acls(root: &Path, shift: u32) -> Vec<String> {
    let mut out = Vec::new();
    for rel in ["home/alice/file", "srv/shared"] {
        let o = Command::new("getfacl")
            .args(["-n", "-p", "-E", "--omit-header"])
            .arg(root.join(rel))
            .output()
            .unwrap();
        let text = String::from_utf8(o.stdout).unwrap();
        for l in text.lines().filter(|l| !l.is_empty()) {
            // user:1500:r-- → user:<id - shift>:r--
            let parts: Vec<&str> = l.split(':').collect();
            let l = match parts.as_slice() {
                [pre @ .., kind, id, perm]
                    if !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()) =>
                {
                    let id: u32 = id.parse().unwrap();
                    format!(
                        "{}{kind}:{}:{perm}",
                        pre.iter().map(|p| format!("{p}:")).collect::<String>(),
                        id - shift
                    )
                }
                _ => l.to_string(),
            };
            out.push(format!("{rel} {l}"));
        }
    }
    out
}

fn xattrs(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for rel in ["home/alice/file", "srv/shared", "srv/sparse"] {
        for n in xattr::list(root.join(rel)).unwrap() {
            let n = n.to_string_lossy().into_owned();
            if n.starts_with("system.posix_acl") {
                continue; // compared through getfacl, ids shifted
            }
            out.insert(
                format!("{rel} {n}"),
                xattr::get(root.join(rel), &n).unwrap().unwrap(),
            );
        }
    }
    out
}

/// The snapshot with owners shifted back and times cut to what the source format keeps.
fn unshifted(
    t: BTreeMap<PathBuf, Node>,
    base: (u32, u32),
    whole_seconds: bool,
) -> BTreeMap<PathBuf, Node> {
    t.into_iter()
        .map(|(p, mut n)| {
            n.uid -= base.0;
            n.gid -= base.1;
            if whole_seconds {
                n.mtime.1 = 0;
            }
            (p, n)
        })
        .collect()
}

fn assert_imported_same(src: &Path, dst: &Path, base: (u32, u32), from_tar: bool) {
    let mut want = snapshot(src).unwrap();
    if from_tar {
        for n in want.values_mut() {
            n.mtime.1 = 0;
        }
    }
    assert_same_tree(&want, &unshifted(snapshot(dst).unwrap(), base, from_tar));
    assert_eq!(
        fs::read(src.join("srv/sparse")).unwrap(),
        fs::read(dst.join("srv/sparse")).unwrap()
    );
    let blocks = fs::metadata(dst.join("srv/sparse")).unwrap().blocks();
    assert!(
        blocks * 512 < 1 << 20,
        "sparse file filled in: {blocks} blocks"
    );
    assert_eq!(fs::read(dst.join("srv/hardlink")).unwrap(), b"hello\n");
}

fn userns_base(h: &TestHost, ct: &str) -> (u32, u32) {
    let s = h.status(ct);
    (
        s["userns"]["uid_base"].as_u64().unwrap() as u32,
        s["userns"]["gid_base"].as_u64().unwrap() as u32,
    )
}

const SIMPLE_CONF: &str = "HOSTNAME=\"tree.example.com\"\nPHYSPAGES=\"0:128M\"\n";

#[test]
fn simfs_tree_and_vzdump_archive_import_identical() {
    let h = TestHost::new();
    let n = VzNode::new(VZ_CONF);
    let src = n.path("private/301");
    build_tree(&src);
    fs::write(src.join("etc/vzdump/vps.conf"), SIMPLE_CONF).unwrap();
    n.conf(301, SIMPLE_CONF);
    n.conf(302, SIMPLE_CONF);
    let srcs = src.display().to_string();

    // Unprivileged (the default): owners, ACL ids shifted into the CT's range.
    let v = ok_json(&h, &n.args(&["301", "--private", &srcs]));
    assert_eq!(v["cts"][0]["imported"], true);
    let base = userns_base(&h, "301");
    assert!(base.0 >= 65536, "{base:?}");
    let dst = h.root.join("private/301");
    assert_imported_same(&src, &dst, base, false);
    assert_eq!(acls(&src, 0), acls(&dst, base.0), "ACLs (ids shifted)");
    assert_eq!(xattrs(&src), xattrs(&dst));
    let conf = fs::read_to_string(h.root.join("conf/301.toml")).unwrap();
    let cfg: toml::Value = toml::from_str(&conf).unwrap();
    assert_eq!(cfg["imported"]["from"].as_str(), Some("openvz"));
    assert_eq!(cfg["imported"]["private"].as_str(), Some(srcs.as_str()));
    assert_eq!(cfg["imported"]["source_ctid"].as_integer(), Some(301));
    assert!(
        cfg["uuid"].as_str().is_some_and(|u| u.len() == 36),
        "{conf}"
    );
    assert_eq!(cfg["stop_signal"].as_str(), Some("SIGUSR2"));
    assert_eq!(cfg["resources"]["memory"].as_str(), Some("128M"));

    // Privileged: the same tree, byte for byte in its ACLs.
    ok_json(&h, &n.args(&["302", "--private", &srcs, "--privileged"]));
    let dst2 = h.root.join("private/302");
    assert_imported_same(&src, &dst2, (0, 0), false);
    assert_eq!(acls(&src, 0), acls(&dst2, 0));
    for rel in ["home/alice/file", "srv/shared"] {
        for a in ["system.posix_acl_access", "system.posix_acl_default"] {
            assert_eq!(
                xattr::get(src.join(rel), a).unwrap(),
                xattr::get(dst2.join(rel), a).unwrap(),
                "{rel} {a}"
            );
        }
    }

    // A vzdump archive (GNU tar format, --sparse --numeric-owner, as vzdump makes them; that
    // format has no xattrs) imports the same, its config read from ./etc/vzdump/vps.conf.
    let ar = n.path("vzdump-openvz-303-2016_01_02-03_04_05.tar");
    let o = Command::new("tar")
        .args(["--format=gnu", "--sparse", "--numeric-owner", "-cpf"])
        .arg(&ar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ars = ar.display().to_string();
    let v = ok_json(&h, &n.args(&["303", "--archive", &ars]));
    assert_eq!(v["cts"][0]["config"]["hostname"], "tree.example.com");
    let base3 = userns_base(&h, "303");
    assert_imported_same(&src, &h.root.join("private/303"), base3, true);

    // A POSIX-format archive with --xattrs --xattrs-include='*' carries the xattrs too.
    let ar2 = n.path("vzdump-openvz-304-2016_01_02-03_04_05.tar.gz");
    let o = Command::new("tar")
        .args([
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-czpf",
        ])
        .arg(&ar2)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok_json(
        &h,
        &n.args(&[
            "304",
            "--archive",
            &ar2.display().to_string(),
            "--privileged",
        ]),
    );
    let dst4 = h.root.join("private/304");
    assert_eq!(xattrs(&src), xattrs(&dst4));
    let blocks = fs::metadata(dst4.join("srv/sparse")).unwrap().blocks();
    assert!(
        blocks * 512 < 1 << 20,
        "zeros from the archive left as holes: {blocks} blocks"
    );

    // The CTID is in use now: refused, the existing CT untouched.
    let conf_before = fs::read_to_string(h.root.join("conf/301.toml")).unwrap();
    let e = fails(&h, &n.args(&["301", "--private", &srcs]));
    assert!(e.contains("CT 301 already exists"), "{e}");
    assert_eq!(
        fs::read_to_string(h.root.join("conf/301.toml")).unwrap(),
        conf_before
    );
    for c in ["301", "302", "303", "304"] {
        h.ok(&["destroy", c]);
    }
    h.assert_clean();
}

/// A tar with the given entries (name, kind, link target / data) written by the tar crate.
fn evil_tar(path: &Path, entries: &[(&str, tar::EntryType, &str)]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, kind, x) in entries {
        let mut hd = tar::Header::new_gnu();
        hd.set_entry_type(*kind);
        hd.set_mode(0o755);
        hd.set_mtime(1);
        hd.set_uid(0);
        hd.set_gid(0);
        // Raw names: the builder's own checks would refuse '..'.
        hd.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                hd.set_link_name(x).unwrap();
                hd.set_size(0);
                hd.set_cksum();
                b.append(&hd, std::io::empty()).unwrap();
            }
            _ => {
                hd.set_size(x.len() as u64);
                hd.set_cksum();
                b.append(&hd, x.as_bytes()).unwrap();
            }
        }
    }
    b.finish().unwrap();
}

#[test]
fn ploop_unknown_layouts_and_archive_tricks_are_refused_leaving_nothing() {
    use tar::EntryType::{Directory, Regular, Symlink};
    let h = TestHost::new();
    let n = VzNode::new(VZ_CONF);
    n.conf(401, SIMPLE_CONF);

    let ploop = n.path("private/ploop");
    fs::create_dir_all(ploop.join("root.hdd")).unwrap();
    fs::write(
        ploop.join("root.hdd/DiskDescriptor.xml"),
        "<Parallels_disk_image/>",
    )
    .unwrap();
    fs::write(ploop.join("root.hdd/root.hdd"), "").unwrap();
    let e = fails(
        &h,
        &n.args(&[
            "401",
            "--private",
            &ploop.display().to_string(),
            "--dry-run",
        ]),
    );
    assert!(
        e.contains("ploop image") && e.contains("root.hdd/DiskDescriptor.xml"),
        "{e}"
    );
    let e = fails(
        &h,
        &n.args(&["401", "--private", &ploop.display().to_string()]),
    );
    assert!(e.contains("ploop image"), "{e}");
    assert_no_ct(&h, 401);

    let empty = n.path("private/empty");
    fs::create_dir_all(empty.join("lost+found")).unwrap();
    let e = fails(
        &h,
        &n.args(&["401", "--private", &empty.display().to_string()]),
    );
    assert!(e.contains("unknown private area layout"), "{e}");
    // The default, VE_PRIVATE from vz.conf, does not exist.
    let e = fails(&h, &n.args(&["401"]));
    let want = format!("open private area {}", n.path("private/401").display());
    assert!(e.contains(&want), "{e}");
    assert_no_ct(&h, 401);

    let outside = n.path("outside");
    fs::create_dir_all(&outside).unwrap();
    let conf = ("./etc/vzdump/vps.conf", Regular, SIMPLE_CONF);
    let cases: Vec<(&str, Vec<(&str, tar::EntryType, &str)>, &str)> = vec![
        (
            "traversal",
            vec![
                ("./etc/", Directory, ""),
                conf,
                ("./sbin/../../escape", Regular, "x"),
            ],
            "'..' component",
        ),
        (
            "absolute symlink",
            vec![
                ("./etc/", Directory, ""),
                conf,
                ("./srv", Symlink, outside.to_str().unwrap()),
                ("./srv/planted", Regular, "x"),
            ],
            "would be written through the symlink srv",
        ),
        (
            "absolute path",
            vec![conf, ("/etc/escape", Regular, "x")],
            "absolute path",
        ),
        (
            "no config",
            vec![("./etc/hostname", Regular, "x")],
            "not a vzdump archive",
        ),
        (
            "config is a symlink",
            vec![("./etc/vzdump/vps.conf", Symlink, "/etc/shadow")],
            "is not a regular file",
        ),
    ];
    for (what, entries, want) in cases {
        let ar = n.path(&format!("vzdump-openvz-401-{}.tar", what.replace(' ', "-")));
        evil_tar(&ar, &entries);
        let e = fails(
            &h,
            &n.args(&["401", "--archive", &ar.display().to_string()]),
        );
        assert!(e.contains(want), "{what}: {e}");
        assert_no_ct(&h, 401);
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "written outside"
    );
    assert!(!n.path("escape").exists());
    h.assert_clean();
}

#[test]
fn imported_busybox_ct_with_its_venet0_setup_answers_routed() {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let n = VzNode::new(VZ_CONF);
    // The OpenVZ CT: the busybox tree with the network setup vzctl's scripts left in it, which
    // configures venet0 itself (berth's routed CT end has that name, so it keeps working).
    let src = n.path("private/501");
    let o = Command::new("cp")
        .arg("-a")
        .arg(h.root.join("template/busybox/rootfs"))
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success());
    // The template's rcS runs /etc/rc.local: the CT's own network setup goes there.
    let rc = src.join("etc/rc.local");
    fs::write(
        &rc,
        "#!/bin/sh\n\
         # OpenVZ venet0 setup (as vzctl's setup scripts write it)\n\
         ip link set venet0 up\n\
         ip addr add 192.0.2.51/32 dev venet0 2>/dev/null || true\n\
         ip -6 addr add 2001:db8:1::51/128 dev venet0 2>/dev/null || true\n\
         ip route add default dev venet0 2>/dev/null || true\n\
         ip link show venet0 >/dev/null && echo venet0-configured > /run/venet0.done\n",
    )
    .unwrap();
    fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Device nodes are carried; the CT's root must still not reach the host's devices
    // through them (here the host's /dev/mem, 1:1).
    let o = Command::new("mknod")
        .arg(src.join("root/mem"))
        .args(["c", "1", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    n.conf(
        501,
        "ONBOOT=\"yes\"\nHOSTNAME=\"ovz501.example.com\"\nIP_ADDRESS=\"192.0.2.51 2001:db8:1::51/64\"\nPHYSPAGES=\"0:256M\"\nNUMPROC=\"200\"\n",
    );
    ok_json(
        &h,
        &n.args(&["501", "--private", &src.display().to_string()]),
    );
    h.ok(&["start", "501"]);
    assert!(
        wait_for(std::time::Duration::from_secs(5), || h
            .exec("501", &["cat", "/run/venet0.done"])
            .0
            == 0),
        "the CT's own venet0 setup did not run"
    );
    let (code, _, err) = h.exec(
        "501",
        &["dd", "if=/root/mem", "of=/dev/null", "bs=1", "count=1"],
    );
    assert_ne!(
        code, 0,
        "the CT read the host's memory through an imported device node"
    );
    assert!(
        err.contains("not permitted") || err.contains("denied"),
        "{err}"
    );
    let (_, host, _) = h.exec("501", &["hostname"]);
    assert_eq!(host.trim(), "ovz501.example.com");
    for addr in ["192.0.2.51", "2001:db8:1::51"] {
        assert!(
            wait_for(std::time::Duration::from_secs(6), || topo.uplink.ping(addr)),
            "{addr} does not answer from the uplink namespace"
        );
    }
    h.ok(&["stop", "501"]);
    h.ok(&["destroy", "501"]);
    h.assert_clean();
}

#[test]
fn start_all_onboot_follows_bootorder_and_stop_all_stops_everything() {
    let h = TestHost::new();
    // 601 (order 100) first, then 602 and 603 (order 5) together, 604 (no order) last; 605 is
    // not onboot.
    for (c, onboot, order) in [
        (601, true, Some(100)),
        (602, true, Some(5)),
        (603, true, Some(5)),
        (604, true, None),
        (605, false, None),
    ] {
        h.ok(&["create", &c.to_string()]);
        let path = h.root.join(format!("conf/{c}.toml"));
        let mut text = fs::read_to_string(&path).unwrap();
        // Top-level keys go before the first table.
        let at = text.find("\n[").unwrap_or(text.len());
        let mut extra = format!("\nonboot = {onboot}");
        if let Some(o) = order {
            extra.push_str(&format!("\nbootorder = {o}"));
        }
        text.insert_str(at, &extra);
        fs::write(&path, text).unwrap();
    }
    let v = h.json(&["start", "--all-onboot"]);
    assert_eq!(v["started"], serde_json::json!([601, 602, 603, 604]), "{v}");
    let started = |c: u32| -> u64 {
        let s: Value = serde_json::from_str(
            &fs::read_to_string(h.root.join(format!("run/{c}.state.json"))).unwrap(),
        )
        .unwrap();
        s["started_at"].as_u64().unwrap()
    };
    assert!(
        started(601) <= started(602) && started(602) <= started(604),
        "order"
    );
    assert_eq!(h.status("605")["state"], "stopped");
    // Started ones are skipped the second time.
    let v = h.json(&["start", "--all-onboot"]);
    assert_eq!(v["started"], serde_json::json!([]), "{v}");
    h.ok(&["start", "605"]);
    let v = h.json(&["stop", "--all"]);
    assert_eq!(
        v["stopped"],
        serde_json::json!([604, 605, 602, 603, 601]),
        "{v}"
    );
    for c in ["601", "602", "603", "604", "605"] {
        assert_eq!(h.status(c)["state"], "stopped");
        h.ok(&["destroy", c]);
    }
    h.assert_clean();
}
