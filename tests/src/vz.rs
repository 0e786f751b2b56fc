//! Helpers for the OpenVZ import tests (tests/tests/import.rs): an OpenVZ node's /etc/vz in a
//! directory of the test's own, a simfs private area holding everything a copy can lose, the
//! comparisons of a tree with its import, and hand-made archives.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::ct::TestHost;
use crate::template::{Node, assert_same_tree, snapshot};

/// An OpenVZ node's /etc/vz, in a directory of the test's own.
pub struct VzNode {
    dir: tempfile::TempDir,
}

impl VzNode {
    pub fn new(vz_conf: &str) -> Self {
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
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// Writes CTID.conf, its VE_PRIVATE pointed into the node's directory.
    pub fn conf(&self, ctid: u32, text: &str) {
        let text = text.replace("/vz/private", self.path("private").to_str().unwrap());
        fs::write(self.path(&format!("vz/conf/{ctid}.conf")), text).unwrap();
    }
    pub fn name(&self, name: &str, ctid: u32) {
        symlink(
            format!("../conf/{ctid}.conf"),
            self.path(&format!("vz/names/{name}")),
        )
        .unwrap();
    }
    /// `import vz` arguments for this node.
    pub fn args<'a>(&'a self, rest: &[&'a str]) -> Vec<String> {
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

pub fn run_args(h: &TestHost, args: &[String]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    h.run(&a)
}

pub fn ok_json(h: &TestHost, args: &[String]) -> Value {
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

pub fn fails(h: &TestHost, args: &[String]) -> String {
    let o = run_args(h, args);
    assert!(
        !o.status.success(),
        "{args:?} succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// key → (verdict, target) of one CT's report.
pub fn verdicts(ct: &Value) -> BTreeMap<String, (String, String)> {
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
pub fn assert_no_ct(h: &TestHost, ctid: u32) {
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

/// Builds a simfs private area with what a naive copy loses: hard links, holes, xattrs, ACLs,
/// device nodes, a fifo, set-id bits, symlinks and owners above 1000.
pub fn build_tree(root: &Path) {
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
    // A file capability as setcap writes it (v2: effective, cap_net_raw permitted).
    fs::write(root.join("bin/ping"), "not really ping").unwrap();
    xattr::set(root.join("bin/ping"), "security.capability", &fscaps_v2()).unwrap();
}

/// A v2 `security.capability` value: effective, cap_net_raw (13) permitted.
pub fn fscaps_v2() -> Vec<u8> {
    let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
    v.extend((1u32 << 13).to_le_bytes());
    v.extend([0u8; 12]);
    v
}

/// getfacl -n of every file with an ACL, for comparison (ids as numbers).
pub fn acls(root: &Path, shift: u32) -> Vec<String> {
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

pub fn xattrs(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for rel in ["home/alice/file", "srv/shared", "srv/sparse"] {
        for n in xattr::list(root.join(rel)).unwrap() {
            let n = n.to_string_lossy().into_owned();
            if n.starts_with("system.posix_acl") || n == "security.capability" {
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
pub fn unshifted(
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

pub fn assert_imported_same(src: &Path, dst: &Path, base: (u32, u32), from_tar: bool) {
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

pub fn userns_base(h: &TestHost, ct: &str) -> (u32, u32) {
    let s = h.status(ct);
    (
        s["userns"]["uid_base"].as_u64().unwrap() as u32,
        s["userns"]["gid_base"].as_u64().unwrap() as u32,
    )
}

/// One archive entry: name, kind, link target or data.
pub type TarEntry<'a> = (&'a str, tar::EntryType, &'a str);

/// A tar with the given entries, written by the tar crate.
pub fn evil_tar(path: &Path, entries: &[TarEntry<'_>]) {
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

/// CRC-32 (IEEE), as GPT headers and entry arrays carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A GPT header for `disk_sectors` 512-byte sectors, at `my_lba`, entries at `entries_lba`.
fn gpt_header(
    disk_sectors: u64,
    my_lba: u64,
    alt_lba: u64,
    entries_lba: u64,
    table_crc: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; 92];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(disk_sectors - 34).to_le_bytes());
    h[56..72].copy_from_slice(&[0x42; 16]);
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&table_crc.to_le_bytes());
    let crc = crc32(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A ploop private area in `area` holding `tree`, made as `ploop init` lays it out: a raw disk
/// of `mib` MiB with a GPT whose one partition (from 1 MiB, like ploop's) holds an ext4
/// filesystem of `tree` (mkfs.ext4 -d, no mount needed), converted to the Parallels format as
/// `root.hdd/root.hds`, next to a DiskDescriptor.xml with one delta.
pub fn ploop_area(area: &Path, tree: &Path, mib: u64) {
    use std::os::unix::fs::FileExt;
    let hdd = area.join("root.hdd");
    fs::create_dir_all(&hdd).unwrap();
    let raw = area.join("disk.raw");
    let sectors = mib << 11;
    let f = fs::File::create(&raw).unwrap();
    f.set_len(sectors * 512).unwrap();
    // Protective MBR.
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0xee;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&(sectors as u32 - 1).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    f.write_all_at(&mbr, 0).unwrap();
    let (first, last) = (2048u64, sectors - 34);
    let mut table = vec![0u8; 128 * 128];
    // Linux filesystem data, as ploop marks its partition.
    table[..16].copy_from_slice(&[
        0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d,
        0xe4,
    ]);
    table[16..32].copy_from_slice(&[0x17; 16]);
    table[32..40].copy_from_slice(&first.to_le_bytes());
    table[40..48].copy_from_slice(&last.to_le_bytes());
    let tcrc = crc32(&table);
    f.write_all_at(&gpt_header(sectors, 1, sectors - 1, 2, tcrc), 512)
        .unwrap();
    f.write_all_at(&table, 1024).unwrap();
    f.write_all_at(&table, (sectors - 33) * 512).unwrap();
    f.write_all_at(
        &gpt_header(sectors, sectors - 1, 1, sectors - 33, tcrc),
        (sectors - 1) * 512,
    )
    .unwrap();
    drop(f);
    let fs_sectors = last - first + 1;
    let fs_kib = fs_sectors / 2;
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "offset=1048576", "-d"])
        .arg(tree)
        .arg(&raw)
        .arg(format!("{fs_kib}k"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "parallels"])
        .arg(&raw)
        .arg(hdd.join("root.hds"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    fs::remove_file(&raw).unwrap();
    fs::write(
        hdd.join("DiskDescriptor.xml"),
        ploop_descriptor(sectors, &["root.hds"]),
    )
    .unwrap();
}

/// DiskDescriptor.xml as ploop writes it, one <Image> and <Shot> per delta (the first is the
/// base, the last the top).
pub fn ploop_descriptor(sectors: u64, files: &[&str]) -> String {
    let guid = |i: usize| format!("{{5fbaabe3-6958-40ff-92a7-860e329aab{i:02x}}}");
    let mut images = String::new();
    let mut shots = String::new();
    for (i, f) in files.iter().enumerate() {
        images += &format!(
            "\t\t\t<Image>\n\t\t\t\t<GUID>{}</GUID>\n\t\t\t\t<Type>Compressed</Type>\n\t\t\t\t<File>{f}</File>\n\t\t\t</Image>\n",
            guid(i)
        );
        let parent = if i == 0 {
            "{00000000-0000-0000-0000-000000000000}".to_string()
        } else {
            guid(i - 1)
        };
        shots += &format!(
            "\t\t<Shot>\n\t\t\t<GUID>{}</GUID>\n\t\t\t<ParentGUID>{parent}</ParentGUID>\n\t\t</Shot>\n",
            guid(i)
        );
    }
    format!(
        "<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\">\n\t<Disk_Parameters>\n\t\t<Disk_size>{sectors}</Disk_size>\n\t\t<Cylinders>{}</Cylinders>\n\t\t<Heads>16</Heads>\n\t\t<Sectors>63</Sectors>\n\t\t<Padding>0</Padding>\n\t</Disk_Parameters>\n\t<StorageData>\n\t\t<Storage>\n\t\t\t<Start>0</Start>\n\t\t\t<End>{sectors}</End>\n\t\t\t<Blocksize>2048</Blocksize>\n{images}\t\t</Storage>\n\t</StorageData>\n\t<Snapshots>\n\t\t<TopGUID>{}</TopGUID>\n{shots}\t</Snapshots>\n</Parallels_disk_image>\n",
        sectors / (16 * 63),
        guid(files.len() - 1)
    )
}
