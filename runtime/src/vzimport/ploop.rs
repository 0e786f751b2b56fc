//! ploop private areas (`root.hdd/DiskDescriptor.xml` and its image files).
//!
//! A layout with one delta (no snapshots) is converted: `qemu-img` reads the Parallels image
//! format into a raw temporary file next to the CT's scratch directory, the filesystem inside
//! it (usually the one partition of a GPT, as `ploop init` makes it) is mounted read-only on
//! a loop device in a mount namespace private to one thread, and copied as a simfs tree. The
//! namespace, and with it the mount and the auto-clearing loop device, ends with the thread,
//! so nothing outlives the import on any path. Several deltas are refused: merging them is
//! ploop's job on the OpenVZ node.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use tracing::warn;

use super::{CopyStats, ImportError, copy_private};

/// Where a ploop private area keeps its descriptor.
pub const DESCRIPTOR: &str = "root.hdd/DiskDescriptor.xml";

/// Descriptors are a few KiB; anything near this is not one.
const MAX_DESCRIPTOR: u64 = 1 << 20;

const SECTOR: u64 = 512;

fn refuse(private: &Path, why: impl Into<String>) -> ImportError {
    ImportError::Ploop {
        path: private.to_path_buf(),
        why: why.into(),
    }
}

/// Reads `private`'s DiskDescriptor.xml and returns its one image file, or refuses the
/// layout naming why (several deltas, an image outside root.hdd, a malformed descriptor).
pub fn single_delta(private: &Path) -> Result<PathBuf, ImportError> {
    let desc = private.join(DESCRIPTOR);
    let meta = fs::symlink_metadata(&desc).map_err(|source| ImportError::Io {
        op: "stat",
        path: desc.clone(),
        source,
    })?;
    if !meta.is_file() || meta.len() > MAX_DESCRIPTOR {
        return Err(refuse(
            private,
            format!("{DESCRIPTOR} is not a regular file of at most {MAX_DESCRIPTOR} bytes"),
        ));
    }
    let text = fs::read_to_string(&desc).map_err(|source| ImportError::Io {
        op: "read",
        path: desc.clone(),
        source,
    })?;
    let file = image_file(&text).map_err(|why| refuse(private, why))?;
    let image = private.join("root.hdd").join(file);
    match fs::symlink_metadata(&image) {
        Ok(m) if m.is_file() => Ok(image),
        Ok(_) => Err(refuse(
            private,
            format!("its image {} is not a regular file", image.display()),
        )),
        Err(source) => Err(ImportError::Io {
            op: "open ploop image",
            path: image,
            source,
        }),
    }
}

/// The file name of the descriptor's one delta.
fn image_file(text: &str) -> Result<String, String> {
    let doc = roxmltree::Document::parse(text).map_err(|e| format!("{DESCRIPTOR}: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Parallels_disk_image" {
        return Err(format!(
            "{DESCRIPTOR}: the root element is <{}>, not <Parallels_disk_image>",
            root.tag_name().name()
        ));
    }
    let named = |tag: &'static str| {
        root.descendants()
            .filter(move |n| n.is_element() && n.tag_name().name() == tag)
    };
    let files: Vec<String> = named("Image")
        .map(|img| {
            img.children()
                .find(|c| c.is_element() && c.tag_name().name() == "File")
                .and_then(|f| f.text())
                .map(|t| t.trim().to_string())
                .unwrap_or_default()
        })
        .collect();
    let shots = named("Shot").count();
    let storages = named("Storage").count();
    if files.len() > 1 || shots > 1 || storages > 1 {
        return Err(format!(
            "{} deltas ({}) in {shots} snapshots: berth converts a ploop image of one delta; merge them on the OpenVZ node first (`ploop snapshot-merge -A {DESCRIPTOR}`, or `vzctl snapshot-delete` each snapshot)",
            files.len(),
            files.join(", ")
        ));
    }
    let Some(file) = files.into_iter().next() else {
        return Err(format!("{DESCRIPTOR} names no <Image>"));
    };
    let mut comps = Path::new(&file).components();
    match (comps.next(), comps.next()) {
        (Some(Component::Normal(_)), None) => Ok(file),
        _ => Err(format!(
            "{DESCRIPTOR} names the image {file:?}: not a file name inside root.hdd"
        )),
    }
}

/// Byte offset and length of the one filesystem in the raw disk image `raw`: the only
/// partition of a GPT or MBR, or the whole image when it holds an ext2/3/4 filesystem itself.
pub fn find_filesystem(raw: &Path) -> Result<(u64, u64), String> {
    let f = File::open(raw).map_err(|e| format!("open {}: {e}", raw.display()))?;
    let len = f
        .metadata()
        .map_err(|e| format!("stat {}: {e}", raw.display()))?
        .len();
    let read = |off: u64, n: usize| -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, off)
            .map_err(|e| format!("read {} at {off}: {e}", raw.display()))?;
        Ok(b)
    };
    if len < 4 * SECTOR {
        return Err(format!(
            "the disk is {len} bytes: too small to hold a filesystem"
        ));
    }
    let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let hdr = read(SECTOR, SECTOR as usize)?;
    let mut parts = Vec::new();
    if &hdr[..8] == b"EFI PART" {
        let (lba, count, size) = (le64(&hdr, 72), le32(&hdr, 80), le32(&hdr, 84));
        if !(128..=4096).contains(&size) || count > 1024 {
            return Err(format!(
                "GPT with {count} entries of {size} bytes: not a partition table ploop writes"
            ));
        }
        let table = read(
            lba.checked_mul(SECTOR)
                .ok_or("GPT table offset overflows")?,
            count as usize * size as usize,
        )?;
        for e in table.chunks(size as usize) {
            if e[..16].iter().any(|&b| b != 0) {
                let (first, last) = (le64(e, 32), le64(e, 40));
                if last < first {
                    return Err(format!("GPT partition ends (LBA {last}) before it starts"));
                }
                parts.push((first, last - first + 1));
            }
        }
    } else if le16(&read(1024 + 56, 2)?) == 0xef53 {
        return Ok((0, len));
    } else {
        let mbr = read(0, SECTOR as usize)?;
        if mbr[510..512] != [0x55, 0xaa] {
            return Err("neither a GPT or MBR partition table nor an ext2/3/4 filesystem".into());
        }
        for e in mbr[446..510].chunks(16) {
            if e[4] != 0 {
                parts.push((u64::from(le32(e, 8)), u64::from(le32(e, 12))));
            }
        }
    }
    let [(start, sectors)] = parts[..] else {
        return Err(format!(
            "{} partitions: berth imports a ploop disk holding one filesystem",
            parts.len()
        ));
    };
    let (off, size) = (start.saturating_mul(SECTOR), sectors.saturating_mul(SECTOR));
    if size == 0 || off.checked_add(size).is_none_or(|end| end > len) {
        return Err(format!(
            "the partition ({size} bytes at {off}) lies outside the {len}-byte disk"
        ));
    }
    Ok((off, size))
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// The raw copy and the mount point, removed whatever happens.
struct Scratch {
    raw: PathBuf,
    mnt: PathBuf,
}

impl Scratch {
    fn clear(&self) -> io::Result<()> {
        for r in [fs::remove_file(&self.raw), fs::remove_dir(&self.mnt)] {
            match r {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = self.clear() {
            warn!(raw = %self.raw.display(), error = %e, "ploop import: remove scratch files");
        }
    }
}

/// Converts the ploop image `image` and copies its filesystem's tree into the new directory
/// `dst` as [`copy_private`] does; `scratch` is a path prefix (in the berth root) for the raw
/// copy and the mount point.
pub fn import_image(
    private: &Path,
    image: &Path,
    scratch: &Path,
    dst: &Path,
    shift: Option<(u32, u32)>,
    mut progress: Option<&mut dyn FnMut(CopyStats)>,
) -> Result<CopyStats, ImportError> {
    let s = Scratch {
        raw: PathBuf::from(format!("{}.ploop.raw.tmp", scratch.display())),
        mnt: PathBuf::from(format!("{}.ploop.mnt.tmp", scratch.display())),
    };
    // Left over by a killed import (`berth gc` removes them too: `.*.tmp`): nothing can be
    // using them, the CT's lock is held.
    s.clear().map_err(|source| ImportError::Io {
        op: "remove stale",
        path: s.raw.clone(),
        source,
    })?;
    check_space(private, image, &s.raw)?;
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "parallels", "-O", "raw"])
        .arg(image)
        .arg(&s.raw)
        .output()
        .map_err(|e| {
            refuse(
                private,
                format!("run qemu-img (Debian package qemu-utils): {e}"),
            )
        })?;
    if !out.status.success() {
        return Err(refuse(
            private,
            format!(
                "qemu-img convert -f parallels {}: {}",
                image.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let (offset, size) = find_filesystem(&s.raw).map_err(|why| refuse(private, why))?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&s.mnt)
        .map_err(|source| ImportError::Io {
            op: "create mount point",
            path: s.mnt.clone(),
            source,
        })?;
    let (tx, rx) = mpsc::channel();
    let (raw, mnt, dst2, private2) = (
        s.raw.clone(),
        s.mnt.clone(),
        dst.to_path_buf(),
        private.to_path_buf(),
    );
    let worker = std::thread::Builder::new()
        .name("ploop-import".into())
        .spawn(move || mount_and_copy(&private2, &raw, &mnt, offset, size, &dst2, shift, tx))
        .map_err(|source| ImportError::Io {
            op: "start the ploop copy thread for",
            path: private.to_path_buf(),
            source,
        })?;
    for stats in rx {
        if let Some(p) = progress.as_mut() {
            p(stats);
        }
    }
    let res = worker
        .join()
        .unwrap_or_else(|_| Err(refuse(private, "the copy thread panicked")));
    drop(s);
    res
}

/// Refuses a conversion that cannot fit before it runs: `qemu-img` writes the raw copy sparse,
/// so it takes about what the image has allocated, and a long convert that ends in ENOSPC
/// would only then fail. The copied tree needs its own space on top; running out there is
/// caught (and cleaned up) by the copy.
fn check_space(private: &Path, image: &Path, raw: &Path) -> Result<(), ImportError> {
    use std::os::unix::fs::MetadataExt;
    let need = fs::metadata(image)
        .map_err(|source| ImportError::Io {
            op: "stat",
            path: image.to_path_buf(),
            source,
        })?
        .blocks()
        .saturating_mul(SECTOR);
    let dir = raw.parent().unwrap_or(Path::new("/"));
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| ImportError::Io {
        op: "statfs",
        path: dir.to_path_buf(),
        source: io::Error::from(e),
    })?;
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    if free < need {
        return Err(refuse(
            private,
            format!(
                "converting {} needs about {} MiB free in {} (the image's allocated size), {} MiB are",
                image.display(),
                need >> 20,
                dir.display(),
                free >> 20
            ),
        ));
    }
    Ok(())
}

/// Runs on a thread of its own: the mount namespace it makes dies with it.
#[allow(clippy::too_many_arguments)]
fn mount_and_copy(
    private: &Path,
    raw: &Path,
    mnt: &Path,
    offset: u64,
    size: u64,
    dst: &Path,
    shift: Option<(u32, u32)>,
    tx: mpsc::Sender<CopyStats>,
) -> Result<CopyStats, ImportError> {
    let sys = |op: &'static str| {
        move |e: nix::Error| ImportError::Io {
            op,
            path: mnt.to_path_buf(),
            source: io::Error::from(e),
        }
    };
    // CLONE_NEWNS also unshares this thread's filesystem context from the process's.
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare the mount namespace for"))?;
    // Without this the loop mount would propagate back into the host's namespace.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("make / private before mounting"))?;
    // mount(8) sets the loop device up with autoclear: it goes away with the mount.
    let out = Command::new("mount")
        .arg("-o")
        .arg(format!(
            "loop,ro,nodev,nosuid,noexec,offset={offset},sizelimit={size}"
        ))
        .arg(raw)
        .arg(mnt)
        .output()
        .map_err(|e| refuse(private, format!("run mount: {e}")))?;
    if !out.status.success() {
        return Err(refuse(
            private,
            format!(
                "mount the image's filesystem read-only: {} (a filesystem whose journal needs replaying: stop the CT on the node (`vzctl stop`) before copying its image)",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let mut send = |s: CopyStats| {
        let _ = tx.send(s);
    };
    let res = copy_private(mnt, dst, shift, Some(&mut send));
    if let Err(e) = nix::mount::umount2(mnt, MntFlags::empty()) {
        warn!(mnt = %mnt.display(), error = %e, "ploop import: unmount (detaching lazily)");
        let _ = nix::mount::umount2(mnt, MntFlags::MNT_DETACH);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
  <Disk_Parameters><Disk_size>20971520</Disk_size></Disk_Parameters>
  <StorageData><Storage><Start>0</Start><End>20971520</End><Blocksize>2048</Blocksize>
    <Image><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><Type>Compressed</Type><File>root.hds</File></Image>
  </Storage></StorageData>
  <Snapshots><TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>
    <Shot><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID></Shot>
  </Snapshots>
</Parallels_disk_image>"#;

    #[test]
    fn descriptor_with_one_delta_names_its_file_others_are_refused() {
        assert_eq!(image_file(ONE).unwrap(), "root.hds");
        let two = ONE.replace(
            "</Image>",
            "</Image><Image><GUID>{b}</GUID><Type>Compressed</Type><File>root.hds.{b}</File></Image>",
        );
        let e = image_file(&two).unwrap_err();
        assert!(
            e.contains("2 deltas") && e.contains("snapshot-merge"),
            "{e}"
        );
        for bad in ["../../etc/shadow", "/etc/shadow", "a/b", ""] {
            let t = ONE.replace("<File>root.hds</File>", &format!("<File>{bad}</File>"));
            assert!(image_file(&t).is_err(), "{bad}");
        }
        assert!(image_file("<other/>").unwrap_err().contains("root element"));
        assert!(
            image_file("<Parallels_disk_image/>")
                .unwrap_err()
                .contains("no <Image>")
        );
        assert!(image_file("<Parallels_disk_image>").is_err());
    }

    #[test]
    fn the_filesystem_is_found_in_an_mbr_or_bare_and_two_partitions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        let len = 8u64 << 20;
        let write = |at: u64, b: &[u8]| {
            let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(b, at).unwrap();
        };
        fs::File::create(&p).unwrap().set_len(len).unwrap();
        assert!(find_filesystem(&p).unwrap_err().contains("neither"));
        write(1024 + 56, &0xef53u16.to_le_bytes());
        assert_eq!(find_filesystem(&p).unwrap(), (0, len));
        write(1024 + 56, &[0, 0]);
        let mut mbr = vec![0u8; 512];
        mbr[510..].copy_from_slice(&[0x55, 0xaa]);
        let entry = |i: usize, start: u32, n: u32, mbr: &mut Vec<u8>| {
            let e = &mut mbr[446 + 16 * i..446 + 16 * (i + 1)];
            e[4] = 0x83;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&n.to_le_bytes());
        };
        entry(0, 2048, 4096, &mut mbr);
        write(0, &mbr);
        assert_eq!(find_filesystem(&p).unwrap(), (2048 * 512, 4096 * 512));
        entry(1, 8192, 4096, &mut mbr);
        write(0, &mbr);
        assert!(find_filesystem(&p).unwrap_err().contains("2 partitions"));
        // A partition past the end of the disk is not read from.
        let mut one = vec![0u8; 512];
        one[510..].copy_from_slice(&[0x55, 0xaa]);
        entry(0, 2048, 1 << 30, &mut one);
        write(0, &one);
        assert!(find_filesystem(&p).unwrap_err().contains("outside"));
    }
}
