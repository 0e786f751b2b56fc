//! The template archive importer against hostile archives built from the fuzz input: `..` and
//! absolute paths, absolute and dangling symlinks and writes through them, hard links out of
//! the tree, device nodes, huge sparse files, long names, truncated and gzip-bomb archives.
//!
//! Each run imports into a fresh temporary directory next to an "outside" directory holding a
//! sentinel file; whatever the importer answers, nothing outside the destination may appear,
//! change or gain a link, and a failed `TemplateStore::import` leaves the store empty.
#![no_main]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use arbitrary::{Result, Unstructured};
use berth_runtime::template::TemplateStore;
use libfuzzer_sys::fuzz_target;
use tar::{EntryType, Header};

/// What the extractor may expand an archive to in the runs with an explicit limit.
const BUDGET: u64 = 8 << 20;
const SENTINEL: &[u8] = b"outside the destination";

const COMPONENTS: &[&str] = &[
    "a", "b", "etc", "sbin", "init", "lib", "usr", "..", ".", "", "dev", "null", "x y", "\u{e9}",
];

fn path(u: &mut Unstructured<'_>, outside: &Path) -> Result<Vec<u8>> {
    let mut p = Vec::new();
    match u.int_in_range(0..=9)? {
        0 => p.push(b'/'),
        1 => p.extend_from_slice(b"./"),
        // The outside directory by absolute path, or climbing to it.
        2 => return Ok(outside.join("keep").as_os_str().as_encoded_bytes().to_vec()),
        3 => p.extend_from_slice(b"../outside/"),
        _ => {}
    }
    let n = u.int_in_range(1..=3)?;
    for i in 0..n {
        if i > 0 {
            p.push(b'/');
        }
        if u.ratio(1, 16)? {
            // Past the 100 bytes of a ustar name: a GNU long-name record.
            p.extend(std::iter::repeat_n(b'l', u.int_in_range(90..=300)?));
        } else {
            p.extend_from_slice(u.choose(COMPONENTS)?.as_bytes());
        }
    }
    if u.ratio(1, 8)? {
        p.push(b'/');
    }
    Ok(p)
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{v:0w$o}", w = field.len() - 1);
    let b = s.as_bytes();
    let n = b.len().min(field.len() - 1);
    field[..n].copy_from_slice(&b[b.len() - n..]);
    field[field.len() - 1] = 0;
}

/// Appends a GNU long-name/long-link record when `name` does not fit `field`.
fn long(ar: &mut Vec<u8>, kind: EntryType, name: &[u8]) {
    let mut h = Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(kind);
    h.set_size(name.len() as u64 + 1);
    h.set_mode(0o644);
    h.set_cksum();
    ar.extend_from_slice(h.as_bytes());
    let mut data = name.to_vec();
    data.push(0);
    data.resize(data.len().next_multiple_of(512), 0);
    ar.extend_from_slice(&data);
}

fn append(ar: &mut Vec<u8>, h: &mut Header, name: &[u8], link: Option<&[u8]>, data: &[u8]) {
    if name.len() > 100 {
        long(ar, EntryType::GNULongName, name);
    }
    let n = name.len().min(100);
    h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
    if let Some(l) = link {
        if l.len() > 100 {
            long(ar, EntryType::GNULongLink, l);
        }
        let n = l.len().min(100);
        h.as_old_mut().linkname[..n].copy_from_slice(&l[..n]);
    }
    h.set_cksum();
    ar.extend_from_slice(h.as_bytes());
    ar.extend_from_slice(data);
    ar.resize(ar.len().next_multiple_of(512), 0);
}

/// `<len><body>` where `<len>` counts its own digits too.
fn pax_record(body: &[u8]) -> Vec<u8> {
    let mut len = body.len() + 1;
    while len != body.len() + len.to_string().len() {
        len = body.len() + len.to_string().len();
    }
    let mut out = len.to_string().into_bytes();
    out.extend_from_slice(body);
    out
}

struct Built {
    bytes: Vec<u8>,
    /// Extracted with an explicit [`BUDGET`] (huge entries allowed) rather than through
    /// `TemplateStore::import`, whose limit is the free space of the disk.
    budgeted: bool,
    devices: bool,
    xattrs: bool,
    sparse: bool,
    shift: Option<(u32, u32)>,
}

fn build(u: &mut Unstructured<'_>, outside: &Path) -> Result<Built> {
    let budgeted = u.arbitrary()?;
    // Sizes past what the disk may take only where the explicit budget refuses them early.
    let max_size: u64 = if budgeted { 1 << 40 } else { 1 << 20 };
    let mut ar = Vec::new();
    let entries = u.int_in_range(0..=12)?;
    for _ in 0..entries {
        let name = path(u, outside)?;
        let mut h = Header::new_gnu();
        h.set_mode(u.int_in_range(0..=0o7777)?);
        h.set_uid(u.int_in_range(0..=70000)?);
        h.set_gid(u.int_in_range(0..=70000)?);
        h.set_mtime(u.arbitrary::<u32>()?.into());
        match u.int_in_range(0..=9)? {
            0 => {
                h.set_entry_type(EntryType::Directory);
                h.set_size(0);
                append(&mut ar, &mut h, &name, None, &[]);
            }
            1 | 2 => {
                h.set_entry_type(EntryType::Regular);
                let len = u.int_in_range(0..=64)?;
                let data = u.bytes(len)?.to_vec();
                // A lying size: more than the data (truncation) or the real one.
                let size = if u.ratio(1, 8)? {
                    len as u64 + 512
                } else {
                    len as u64
                };
                h.set_size(size);
                append(&mut ar, &mut h, &name, None, &data);
            }
            3 => {
                h.set_entry_type(EntryType::Symlink);
                h.set_size(0);
                let target = if u.arbitrary()? {
                    outside.as_os_str().as_encoded_bytes().to_vec()
                } else {
                    path(u, outside)?
                };
                append(&mut ar, &mut h, &name, Some(&target), &[]);
            }
            4 => {
                h.set_entry_type(EntryType::Link);
                h.set_size(0);
                let target = path(u, outside)?;
                append(&mut ar, &mut h, &name, Some(&target), &[]);
            }
            5 => {
                h.set_entry_type(*u.choose(&[
                    EntryType::Fifo,
                    EntryType::Char,
                    EntryType::Block,
                ])?);
                h.set_size(0);
                h.set_device_major(u.int_in_range(0..=300)?).ok();
                h.set_device_minor(u.int_in_range(0..=300)?).ok();
                append(&mut ar, &mut h, &name, None, &[]);
            }
            6 => {
                // GNU sparse: one data block after a hole of any size.
                let hole = u.int_in_range(0..=max_size)? / 512 * 512;
                let len: u64 = u.int_in_range(0..=2)? * 512;
                h.set_entry_type(EntryType::GNUSparse);
                h.set_size(len);
                let gnu = h.as_gnu_mut().expect("a GNU header");
                octal(&mut gnu.sparse[0].offset, hole);
                octal(&mut gnu.sparse[0].numbytes, len);
                octal(&mut gnu.realsize, hole + len);
                let data = vec![0xa5u8; len as usize];
                append(&mut ar, &mut h, &name, None, &data);
            }
            7 => {
                // A file of zeros, which gzip shrinks a thousandfold: a bomb in small.
                let size = u.int_in_range(0..=max_size.min(16 << 20))?;
                h.set_entry_type(EntryType::Regular);
                h.set_size(size);
                let data = vec![0u8; size as usize];
                append(&mut ar, &mut h, &name, None, &data);
            }
            _ => {
                // A PAX header with an xattr and a path record for the next entry.
                h.set_entry_type(EntryType::XHeader);
                let key = *u.choose(&["user.x", "system.posix_acl_access", "trusted.t"])?;
                let val_len = u.int_in_range(0..=40)?;
                let val = u.bytes(val_len)?;
                let mut body = format!(" SCHILY.xattr.{key}=").into_bytes();
                body.extend_from_slice(val);
                body.push(b'\n');
                let data = pax_record(&body);
                h.set_size(data.len() as u64);
                append(&mut ar, &mut h, b"pax", None, &data);
            }
        }
    }
    if !u.ratio(1, 8)? {
        ar.extend_from_slice(&[0u8; 1024]);
    }
    if u.ratio(1, 8)? {
        let cut = u.int_in_range(0..=ar.len())?;
        ar.truncate(cut);
    }
    if u.arbitrary()? {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&ar).expect("gzip into memory");
        ar = gz.finish().expect("gzip into memory");
        if u.ratio(1, 8)? {
            let cut = u.int_in_range(0..=ar.len())?;
            ar.truncate(cut);
        }
    }
    let shift = u.arbitrary::<bool>()?.then_some((100_000u32, 100_000u32));
    Ok(Built {
        bytes: ar,
        budgeted,
        devices: u.arbitrary()?,
        xattrs: u.arbitrary()?,
        sparse: u.arbitrary()?,
        shift,
    })
}

/// Every path under `dir` (not following symlinks).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        out.push(p.clone());
        if is_dir {
            walk(&p, out);
        }
    }
}

fn check(base: &Path, outside: &Path, dest: &Path, devices: bool) {
    let mut top: Vec<_> = fs::read_dir(base)
        .expect("read the temp dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    top.sort();
    assert_eq!(
        top,
        ["archive", "dest", "outside"],
        "something appeared next to the destination"
    );
    let mut out = Vec::new();
    walk(outside, &mut out);
    assert_eq!(
        out,
        [outside.join("keep")],
        "something appeared in the outside directory"
    );
    let keep = outside.join("keep");
    let m = fs::symlink_metadata(&keep).expect("the sentinel is still there");
    assert!(m.is_file(), "the sentinel was replaced");
    assert_eq!(m.nlink(), 1, "a hard link to the sentinel was made");
    assert_eq!(fs::read(&keep).expect("read the sentinel"), SENTINEL);
    let mut inside = Vec::new();
    walk(dest, &mut inside);
    for p in inside {
        let m = fs::symlink_metadata(&p).expect("stat an extracted path");
        let t = m.file_type();
        if !devices {
            assert!(
                !t.is_block_device() && !t.is_char_device(),
                "device node {} created",
                p.display()
            );
        }
        assert!(m.size() <= 1 << 31, "{} is {} bytes", p.display(), m.size());
    }
}

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::Builder::new()
        .prefix("berth-fuzz-tar-")
        .tempdir()
        .expect("temp dir");
    let base = tmp.path();
    let outside = base.join("outside");
    fs::create_dir(&outside).expect("create outside");
    fs::write(outside.join("keep"), SENTINEL).expect("write the sentinel");
    let mut u = Unstructured::new(data);
    let Ok(b) = build(&mut u, &outside) else {
        return;
    };
    let archive = base.join("archive");
    fs::write(&archive, &b.bytes).expect("write the archive");
    let dest = base.join("dest");
    fs::create_dir(&dest).expect("create dest");
    if b.budgeted {
        let r = berth_runtime::fuzzing::extract(
            &archive,
            &dest,
            b.devices,
            b.xattrs,
            b.sparse,
            b.shift,
            Some(BUDGET),
        );
        check(base, &outside, &dest, b.devices);
        let _ = r;
    } else {
        let store = TemplateStore::open(&dest).expect("open the store");
        let r = store.import(&archive, Some("t"));
        check(base, &outside, &dest, false);
        let left: Vec<_> = fs::read_dir(&dest)
            .expect("read the store")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        match r {
            Ok(_) => assert_eq!(left, ["t"], "the store after a successful import"),
            Err(e) => assert!(left.is_empty(), "failed import ({e}) left {left:?} behind"),
        }
    }
});
