//! `--diskspace` against real filesystems: an ext4 image on a loop device with project quotas
//! (limit enforced: writes fail with EDQUOT near the limit), and the clear refusal on filesystems
//! that cannot enforce it. Run: `cargo test -p berth-tests --test quota -- --test-threads=1`.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_runtime::Size;
use berth_runtime::quota::{
    QuotaError, clear_diskspace, diskspace_usage, project_id, set_diskspace, set_project_tree,
};
use berth_tests::skip::skip;
use berth_tests::template::{TmpfsMount, has_mounts_below};

/// A filesystem image file in a temp dir, attached to a loop device and mounted below the temp
/// dir. Drop unmounts it and detaches exactly that loop device.
struct FsImage {
    tmp: tempfile::TempDir,
    loopdev: String,
    mnt: PathBuf,
    mounted: bool,
}

impl FsImage {
    /// ext4 image; `mkfs_opts` go to mkfs.ext4, `mount_opts` to mount(2).
    fn ext4(mkfs_opts: &[&str], mount_opts: &str) -> Result<Self, String> {
        let mut args = vec!["-q", "-F", "-I", "256"];
        args.extend_from_slice(mkfs_opts);
        Self::new("ext4", 64 << 20, &args, mount_opts)
    }

    /// xfs image (mkfs.xfs wants at least 300 MB; the file is sparse).
    fn xfs(mount_opts: &str) -> Result<Self, String> {
        Self::new("xfs", 320 << 20, &["-q", "-f"], mount_opts)
    }

    fn new(fstype: &str, size: u64, mkfs_args: &[&str], mount_opts: &str) -> Result<Self, String> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("berth-quota-{}-", std::process::id()))
            .tempdir()
            .map_err(|e| e.to_string())?;
        let img = tmp.path().join("fs.img");
        fs::File::create(&img)
            .and_then(|f| f.set_len(size))
            .map_err(|e| e.to_string())?;
        let st = Command::new(format!("mkfs.{fstype}"))
            .args(mkfs_args)
            .arg(&img)
            .status()
            .map_err(|e| format!("mkfs.{fstype}: {e}"))?;
        if !st.success() {
            return Err(format!("mkfs.{fstype} {mkfs_args:?} failed"));
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
        let mut me = FsImage {
            tmp,
            loopdev,
            mnt,
            mounted: false,
        };
        nix::mount::mount(
            Some(me.loopdev.as_str()),
            &me.mnt,
            Some(fstype),
            nix::mount::MsFlags::empty(),
            Some(mount_opts),
        )
        .map_err(|e| format!("mount -t {fstype} -o {mount_opts:?} {}: {e}", me.loopdev))?;
        me.mounted = true;
        Ok(me)
    }
}

impl Drop for FsImage {
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

/// Whether the running kernel's config says `# CONFIG_<option> is not set`. ext4's hidden quota
/// inodes need QFMT_V2 (`EXT4-fs: The kernel was not built with CONFIG_QUOTA and
/// CONFIG_QFMT_V2`); xfs quotas need XFS_QUOTA.
fn kernel_lacks(option: &str) -> bool {
    let Ok(out) = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r)",
        ])
        .output()
    else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout).contains(&format!("# CONFIG_{option} is not set"))
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

/// Sets a 10 MiB limit on a private area holding 512 KiB, fills it until EDQUOT, checks usage,
/// then lifts the limit.
fn enforce_10m(private: &Path, ctid: u32) {
    fs::create_dir_all(private.join("etc")).unwrap();
    fs::write(private.join("etc/existing"), vec![1u8; 512 << 10]).unwrap();

    set_diskspace(private, ctid, Size::Bytes(10 << 20)).unwrap();
    assert_eq!(project_id(private).unwrap(), (ctid, true));
    assert_eq!(
        project_id(&private.join("etc/existing")).unwrap().0,
        ctid,
        "existing files tagged"
    );
    let (used, limit) = diskspace_usage(private, ctid).unwrap();
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
    let (used, _) = diskspace_usage(private, ctid).unwrap();
    assert!(used <= 10 << 20 && used > 9 << 20, "usage {used}");
    // New files inherit the project.
    assert_eq!(project_id(&private.join("big")).unwrap().0, ctid);

    // Setting again (every start does) is cheap and keeps the limit; clearing lifts it.
    set_diskspace(private, ctid, Size::Bytes(10 << 20)).unwrap();
    clear_diskspace(private, ctid).unwrap();
    assert_eq!(diskspace_usage(private, ctid).unwrap().1, Size::Unlimited);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(private.join("big"))
        .unwrap();
    f.write_all(&vec![0u8; 2 << 20]).unwrap();
    f.sync_data().unwrap();
}

fn assert_released(img: FsImage) {
    let (mnt, dev) = (img.mnt.clone(), img.loopdev.clone());
    drop(img);
    assert!(!has_mounts_below(&mnt), "{} still mounted", mnt.display());
    assert!(!loop_attached(&dev), "loop device {dev} still attached");
}

#[test]
fn ext4_project_quota_enforces_diskspace() {
    let img = match FsImage::ext4(
        &["-O", "quota,project", "-E", "quotatype=prjquota"],
        "prjquota",
    ) {
        Ok(i) => i,
        Err(e) if kernel_lacks("QFMT_V2") => {
            skip(
                "ext4_project_quota_enforces_diskspace",
                &format!(
                    "this kernel has no CONFIG_QFMT_V2, so ext4 with the quota feature cannot be mounted ({e})"
                ),
            );
            return;
        }
        Err(e) => panic!("{e}"),
    };
    enforce_10m(&img.mnt.join("private/4242"), 4242);
    assert_released(img);
}

#[test]
fn xfs_project_quota_enforces_diskspace() {
    match FsImage::xfs("prjquota") {
        Ok(img) => {
            enforce_10m(&img.mnt.join("private/4343"), 4343);
            assert_released(img);
        }
        Err(e) if kernel_lacks("XFS_QUOTA") => {
            skip(
                "xfs_project_quota_enforces_diskspace (enforcement)",
                &format!("this kernel has no CONFIG_XFS_QUOTA ({e})"),
            );
            // xfs keeps project ids in every inode even without quota support, so tagging a
            // tree can still be checked for real; the limit is refused, naming the cause.
            let img = FsImage::xfs("").expect("plain xfs image");
            let private = img.mnt.join("private/4343");
            fs::create_dir_all(private.join("a/b")).unwrap();
            fs::write(private.join("a/b/f"), "x").unwrap();
            std::os::unix::fs::symlink("/etc/passwd", private.join("a/link")).unwrap();
            let err = set_diskspace(&private, 4343, Size::Bytes(1 << 20)).unwrap_err();
            println!("{err}");
            assert!(matches!(err, QuotaError::Unsupported { .. }), "{err}");
            assert!(err.to_string().contains("on xfs at"), "{err}");
            assert_eq!(
                project_id(&private).unwrap(),
                (0, false),
                "refusal changed nothing"
            );
            set_project_tree(&private, 4343).unwrap();
            assert_eq!(project_id(&private).unwrap(), (4343, true));
            assert_eq!(project_id(&private.join("a/b")).unwrap(), (4343, true));
            assert_eq!(project_id(&private.join("a/b/f")).unwrap(), (4343, false));
            fs::write(private.join("a/new"), "y").unwrap();
            assert_eq!(
                project_id(&private.join("a/new")).unwrap().0,
                4343,
                "inherited"
            );
            assert_released(img);
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn ext4_without_project_quota_is_refused_clearly() {
    let img = FsImage::ext4(&[], "").expect("plain ext4 image");
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
    assert_released(img);
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
