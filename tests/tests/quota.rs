//! `--diskspace` against real filesystems: an ext4 image on a loop device with project quotas
//! (limit enforced: writes fail with EDQUOT near the limit), and the clear refusal on filesystems
//! that cannot enforce it. Run: `cargo test -p berth-tests --test quota -- --test-threads=1`.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_runtime::Size;
use berth_runtime::quota::{
    QuotaError, clear_diskspace, diskspace_usage, project_id, set_diskspace,
};
use berth_tests::template::{TmpfsMount, has_mounts_below};

/// An ext4 image file in a temp dir, attached to a loop device and mounted below the temp dir.
/// Drop unmounts it and detaches exactly that loop device.
struct Ext4Image {
    tmp: tempfile::TempDir,
    loopdev: String,
    mnt: PathBuf,
    mounted: bool,
}

impl Ext4Image {
    /// `mkfs_opts` go to mkfs.ext4; `mount_opts` to mount(2).
    fn new(mkfs_opts: &[&str], mount_opts: &str) -> Result<Self, String> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("berth-quota-{}-", std::process::id()))
            .tempdir()
            .map_err(|e| e.to_string())?;
        let img = tmp.path().join("fs.img");
        fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| e.to_string())?;
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-I", "256"])
            .args(mkfs_opts)
            .arg(&img)
            .status()
            .map_err(|e| format!("mkfs.ext4: {e}"))?;
        if !st.success() {
            return Err(format!("mkfs.ext4 {mkfs_opts:?} failed"));
        }
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let mut me = Ext4Image {
            tmp,
            loopdev,
            mnt,
            mounted: false,
        };
        nix::mount::mount(
            Some(me.loopdev.as_str()),
            &me.mnt,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            Some(mount_opts),
        )
        .map_err(|e| format!("mount -t ext4 -o {mount_opts:?} {}: {e}", me.loopdev))?;
        me.mounted = true;
        Ok(me)
    }
}

impl Drop for Ext4Image {
    fn drop(&mut self) {
        if self.mounted
            && let Err(e) = nix::mount::umount(&self.mnt)
        {
            eprintln!("umount {}: {e}", self.mnt.display());
        }
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        let _ = &self.tmp;
    }
}

/// Whether the running kernel was built with quota format v2, which ext4's hidden quota inodes
/// need (`EXT4-fs: The kernel was not built with CONFIG_QUOTA and CONFIG_QFMT_V2`).
fn kernel_lacks_qfmt_v2() -> bool {
    let Ok(out) = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r)",
        ])
        .output()
    else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout).contains("# CONFIG_QFMT_V2 is not set")
}

fn loop_attached(dev: &str) -> bool {
    let name = dev.trim_start_matches("/dev/");
    fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).is_ok()
}

/// Writes 1 MiB chunks until the filesystem refuses; returns (bytes written, final error).
fn fill(path: &Path, max: u64) -> (u64, std::io::Error) {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    loop {
        if written > max {
            panic!("wrote {written} bytes without hitting the quota");
        }
        match f.write(&chunk).and_then(|n| f.sync_data().map(|()| n)) {
            Ok(n) => written += n as u64,
            Err(e) => return (written, e),
        }
    }
}

#[test]
fn ext4_project_quota_enforces_diskspace() {
    let img = match Ext4Image::new(
        &["-O", "quota,project", "-E", "quotatype=prjquota"],
        "prjquota",
    ) {
        Ok(i) => i,
        Err(e) if kernel_lacks_qfmt_v2() => {
            println!(
                "SKIP: this kernel has no CONFIG_QFMT_V2, so ext4 with the quota feature cannot be mounted ({e})"
            );
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let dev = img.loopdev.clone();
    let private = img.mnt.join("private/4242");
    fs::create_dir_all(private.join("etc")).unwrap();
    fs::write(private.join("etc/existing"), vec![1u8; 512 << 10]).unwrap();

    set_diskspace(&private, 4242, Size::Bytes(10 << 20)).unwrap();
    assert_eq!(project_id(&private).unwrap(), (4242, true));
    assert_eq!(
        project_id(&private.join("etc/existing")).unwrap().0,
        4242,
        "existing files tagged"
    );
    let (used, limit) = diskspace_usage(&private, 4242).unwrap();
    assert_eq!(limit, Size::Bytes(10 << 20));
    assert!(used >= 512 << 10, "existing data accounted: {used}");

    let (written, err) = fill(&private.join("big"), 64 << 20);
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
    let total = written + (512 << 10);
    println!("quota 10 MiB: wrote {written} bytes (+512 KiB existing) before EDQUOT");
    assert!(
        total > 9 << 20 && total <= 10 << 20,
        "stopped at {total} bytes, expected just under 10 MiB"
    );
    let (used, _) = diskspace_usage(&private, 4242).unwrap();
    assert!(used <= 10 << 20 && used > 9 << 20, "usage {used}");
    // New files inherit the project.
    assert_eq!(project_id(&private.join("big")).unwrap().0, 4242);

    // Setting again (every start does) is cheap and keeps the limit; clearing lifts it.
    set_diskspace(&private, 4242, Size::Bytes(10 << 20)).unwrap();
    clear_diskspace(&private, 4242).unwrap();
    assert_eq!(diskspace_usage(&private, 4242).unwrap().1, Size::Unlimited);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(private.join("big"))
        .unwrap();
    f.write_all(&vec![0u8; 2 << 20]).unwrap();
    f.sync_data().unwrap();
    drop(f);

    let mnt = img.mnt.clone();
    drop(img);
    assert!(!has_mounts_below(&mnt));
    assert!(!loop_attached(&dev), "loop device {dev} still attached");
}

#[test]
fn ext4_without_project_quota_is_refused_clearly() {
    let img = Ext4Image::new(&[], "").expect("plain ext4 image");
    let dev = img.loopdev.clone();
    let private = img.mnt.join("private/101");
    fs::create_dir_all(&private).unwrap();
    let err = set_diskspace(&private, 101, Size::Bytes(1 << 30)).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, QuotaError::Unsupported { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "--diskspace unsupported on ext4 at {}: ",
            private.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("prjquota"), "says how to enable it: {msg}");
    // Nothing changed: the directory was not tagged.
    let (id, inherit) = project_id(&private).unwrap_or((0, false));
    assert_eq!((id, inherit), (0, false));
    assert!(matches!(
        diskspace_usage(&private, 101),
        Err(QuotaError::Unsupported { .. })
    ));
    assert!(matches!(
        clear_diskspace(&private, 101),
        Err(QuotaError::Unsupported { .. })
    ));
    drop(img);
    assert!(!loop_attached(&dev), "loop device {dev} still attached");
}

#[test]
fn tmpfs_is_refused_clearly() {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("berth-quota-{}-", std::process::id()))
        .tempdir()
        .unwrap();
    let mnt_path = tmp.path().join("tmpfs");
    {
        let mnt = TmpfsMount::new(&mnt_path).unwrap();
        let private = mnt.path.join("private/7");
        fs::create_dir_all(&private).unwrap();
        let err = set_diskspace(&private, 7, Size::Bytes(1 << 20)).unwrap_err();
        let msg = err.to_string();
        println!("{msg}");
        assert!(
            msg.starts_with(&format!(
                "--diskspace unsupported on tmpfs at {}: ",
                private.display()
            )),
            "{msg}"
        );
    }
    assert!(!has_mounts_below(&mnt_path));
    let e = set_diskspace(&tmp.path().join("missing"), 7, Size::Unlimited).unwrap_err();
    assert!(
        matches!(&e, QuotaError::Io { source, .. } if source.kind() == ErrorKind::NotFound),
        "{e}"
    );
}
