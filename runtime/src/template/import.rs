//! Importing a rootfs tarball as a template.
//!
//! The `tar` crate's `unpack_in` is not used: it silently skips entries with `..` and strips a
//! leading `/` (a tarball that tries either should be rejected, not half-imported), and it
//! follows symlinks that stay inside the destination when writing (`lib -> usr/lib` then
//! `lib/x`), which makes the result depend on entry order. This extractor instead rejects, naming
//! the entry: absolute paths, `..`, hard links leaving the archive, any write through a symlink.
//! Device nodes are skipped (berth mounts its own /dev). Ownership is kept when running as root,
//! as GNU tar does.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::UtimensatFlags;
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use tar::EntryType;

use super::{
    Result, Scratch, TemplateError, TemplateInfo, TemplateKind, TemplateStore, io_err, nix_err,
    now_unix, tree_size, validate_name,
};
use crate::error_chain::ErrorChain;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
    /// vzdump's `.tar.lzo`.
    Lzo,
}

/// Recognises the compression from the first bytes, not the file name, so a mislabelled file is
/// still read correctly and an unsupported one (bzip2, zip, ...) gets a clear error.
pub(crate) fn sniff(head: &[u8]) -> std::result::Result<Compression, String> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Compression::Gzip)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Ok(Compression::Xz)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Compression::Zstd)
    } else if head.starts_with(crate::vzimport::lzop::MAGIC) {
        Ok(Compression::Lzo)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Ok(Compression::None)
    } else if head.starts_with(b"BZh") {
        Err("bzip2".into())
    } else if head.starts_with(b"PK\x03\x04") {
        Err("zip".into())
    } else if head.starts_with(b"7z\xbc\xaf") {
        Err("7z".into())
    } else if head.is_empty() {
        Err("(empty file)".into())
    } else {
        Err("(not a tar archive or a known compressed one)".into())
    }
}

/// The template name a file name suggests: `debian-12.tar.xz` → `debian-12`.
pub(crate) fn name_from_file(file: &Path) -> Option<String> {
    let base = file.file_name()?.to_str()?;
    for ext in [
        ".tar.gz",
        ".tar.xz",
        ".tar.zst",
        ".tar.zstd",
        ".tgz",
        ".txz",
        ".tzst",
        ".tar",
    ] {
        if let Some(stem) = base.strip_suffix(ext) {
            return Some(stem.to_string());
        }
    }
    Path::new(base).file_stem()?.to_str().map(str::to_string)
}

/// Turns an archive path into a relative path of normal components. `Ok(None)` is the archive
/// root (`./`).
pub(crate) fn sanitize(raw: &[u8]) -> std::result::Result<Option<PathBuf>, &'static str> {
    if raw.is_empty() {
        return Err("empty path");
    }
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    if raw.starts_with(b"/") {
        return Err("absolute path");
    }
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' component"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Counts what the tar reader consumed and whether the input ended under it, so a tarball cut
/// at a 512-byte boundary (which the tar crate takes as a normal end) is caught.
struct EofWatch<R> {
    inner: R,
    hit_eof: bool,
}

impl<R: Read> Read for EofWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit_eof = true;
        }
        Ok(n)
    }
}

/// How [`extract_with`] treats what a template import does not keep.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ExtractOpts {
    /// Added to every owner (an unprivileged CT's id range); ids at or above
    /// [`crate::userns::RANGE`] are refused when set.
    pub shift: Option<(u32, u32)>,
    /// Create device nodes instead of skipping them.
    pub devices: bool,
    /// Apply `SCHILY.xattr.*` and `SCHILY.acl.*` PAX records (GNU tar's --xattrs/--acls), ACL
    /// ids shifted.
    pub xattrs: bool,
    /// Leave runs of zeros as holes (what `tar --sparse` archived as holes reads back as zeros).
    pub sparse: bool,
}

struct Extractor<'a> {
    archive: &'a Path,
    root: PathBuf,
    same_owner: bool,
    opts: ExtractOpts,
    /// Directories known to be real directories (never replaced later: see `place`).
    dirs: HashSet<PathBuf>,
    /// Directory modes and times, applied last (writing children changes a directory's mtime,
    /// and a read-only mode would block them for a non-root importer).
    dir_meta: Vec<(PathBuf, u32, TimeSpec)>,
    files: u64,
    skipped_devices: u64,
    /// Bytes the file entries expand to so far (holes included), and the most they may: a
    /// gzip bomb or a terabyte sparse file is refused before it fills the disk.
    expanded: u64,
    max_bytes: u64,
}

impl Extractor<'_> {
    fn unsafe_entry(&self, entry: &str, why: impl Into<String>) -> TemplateError {
        TemplateError::UnsafeEntry {
            archive: self.archive.to_path_buf(),
            entry: entry.to_string(),
            why: why.into(),
        }
    }

    fn corrupt(&self, why: impl Into<String>) -> TemplateError {
        TemplateError::Corrupt {
            archive: self.archive.to_path_buf(),
            why: why.into(),
        }
    }

    /// Makes sure every parent of `rel` is a real directory inside the root, creating missing
    /// ones; a symlink or a non-directory on the way is an unsafe entry.
    fn parents(&mut self, rel: &Path, entry: &str) -> Result<()> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        if parent.as_os_str().is_empty() || self.dirs.contains(parent) {
            return Ok(());
        }
        let mut prefix = PathBuf::new();
        for c in parent.components() {
            prefix.push(c);
            if self.dirs.contains(&prefix) {
                continue;
            }
            let abs = self.root.join(&prefix);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.unsafe_entry(
                        entry,
                        format!("would be written through the symlink {}", prefix.display()),
                    ));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(self.unsafe_entry(
                        entry,
                        format!("its parent {} is not a directory", prefix.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&abs)
                        .map_err(io_err("create directory", &abs))?;
                }
                Err(e) => return Err(io_err("stat", &abs)(e)),
            }
            self.dirs.insert(prefix.clone());
        }
        Ok(())
    }

    /// Clears the way for a non-directory at `abs`: a later entry for the same path replaces an
    /// earlier file or link (as tar does), but never a directory, so directories stay trustworthy.
    fn clear_for(&self, abs: &Path, rel: &Path, entry: &str) -> Result<()> {
        match fs::symlink_metadata(abs) {
            Ok(m) if m.is_dir() => Err(self.unsafe_entry(
                entry,
                format!(
                    "replaces the directory {} with a non-directory",
                    rel.display()
                ),
            )),
            Ok(_) => fs::remove_file(abs).map_err(io_err("replace", abs)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("stat", abs)(e)),
        }
    }

    /// Owner, mode and times of a fifo or device node just made (created 0600: nothing can open
    /// it with the archive's mode before its owner is set).
    fn finish_special(
        &mut self,
        abs: &Path,
        uid: u64,
        gid: u64,
        mode: u32,
        mtime: &TimeSpec,
    ) -> Result<()> {
        self.chown(abs, uid, gid, false)?;
        fs::set_permissions(abs, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", abs))?;
        nix::sys::stat::utimensat(AT_FDCWD, abs, mtime, mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(nix_err("set times", abs))?;
        self.files += 1;
        Ok(())
    }

    fn chown(&self, abs: &Path, uid: u64, gid: u64, follow: bool) -> Result<()> {
        if !self.same_owner {
            return Ok(());
        }
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(self.corrupt(format!("{}: owner {uid}:{gid} out of range", abs.display())));
        };
        let (uid, gid) = match self.opts.shift {
            None => (uid, gid),
            Some((ub, gb)) => {
                let shifted = |id: u32, base: u32| {
                    (id < crate::userns::RANGE).then_some(base + id).ok_or_else(|| {
                        TemplateError::Refused {
                            op: "import",
                            path: abs.to_path_buf(),
                            why: format!(
                                "owned by id {id}, which an unprivileged CT's {} ids cannot map; import with --privileged",
                                crate::userns::RANGE
                            ),
                        }
                    })
                };
                (shifted(uid, ub)?, shifted(gid, gb)?)
            }
        };
        let flag = if follow {
            nix::fcntl::AtFlags::empty()
        } else {
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW
        };
        nix::unistd::fchownat(
            AT_FDCWD,
            abs,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            flag,
        )
        .map_err(nix_err("chown", abs))
    }

    fn entry<R: Read>(&mut self, mut e: tar::Entry<'_, R>) -> Result<()> {
        let raw = e.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let kind = e.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let rel = sanitize(&raw).map_err(|why| self.unsafe_entry(&name, why))?;
        let hdr = e.header();
        let mode = hdr
            .mode()
            .map_err(|err| self.corrupt(format!("entry {name:?}: bad mode: {err}")))?
            & 0o7777;
        let uid = hdr
            .uid()
            .map_err(|err| self.corrupt(format!("entry {name:?}: bad uid: {err}")))?;
        let gid = hdr
            .gid()
            .map_err(|err| self.corrupt(format!("entry {name:?}: bad gid: {err}")))?;
        let mtime = hdr
            .mtime()
            .map_err(|err| self.corrupt(format!("entry {name:?}: bad mtime: {err}")))?;
        let mtime = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);

        let Some(rel) = rel else {
            // The archive root ("./"): its metadata becomes the rootfs directory's.
            if kind.is_dir() {
                self.chown(&self.root.clone(), uid, gid, true)?;
                self.dir_meta.push((self.root.clone(), mode, mtime));
                return Ok(());
            }
            return Err(self.unsafe_entry(&name, "a non-directory entry for the archive root"));
        };
        self.parents(&rel, &name)?;
        let abs = self.root.join(&rel);

        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&abs) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(self.unsafe_entry(
                            &name,
                            "a directory entry over an earlier file or symlink",
                        ));
                    }
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        fs::DirBuilder::new()
                            .mode(0o700)
                            .create(&abs)
                            .map_err(io_err("create directory", &abs))?;
                    }
                    Err(err) => return Err(io_err("stat", &abs)(err)),
                }
                self.dirs.insert(rel);
                let xattrs = self.pax_xattrs(&mut e, &name)?;
                self.chown(&abs, uid, gid, true)?;
                self.set_xattrs(&abs, &xattrs)?;
                self.dir_meta.push((abs, mode, mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let want = e.size();
                self.expanded = self.expanded.saturating_add(want);
                if self.expanded > self.max_bytes {
                    return Err(TemplateError::TooLarge {
                        archive: self.archive.to_path_buf(),
                        entry: name,
                        limit: self.max_bytes,
                        dest: self.root.clone(),
                    });
                }
                self.clear_for(&abs, &rel, &name)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&abs)
                    .map_err(io_err("create", &abs))?;
                let xattrs = self.pax_xattrs(&mut e, &name)?;
                let got = if self.opts.sparse {
                    copy_sparse(&mut e, &mut f)
                } else {
                    io::copy(&mut e, &mut f)
                }
                .map_err(|err| self.corrupt(format!("entry {name:?}: {}", ErrorChain(&err))))?;
                if kind != EntryType::GNUSparse && got != want {
                    return Err(self.corrupt(format!("entry {name:?}: got {got} of {want} bytes")));
                }
                self.chown(&abs, uid, gid, true)?;
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err("chmod", &abs))?;
                self.set_xattrs(&abs, &xattrs)?;
                nix::sys::stat::futimens(&f, &mtime, &mtime).map_err(nix_err("set times", &abs))?;
                self.files += 1;
            }
            EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| self.unsafe_entry(&name, "symlink without a target"))?
                    .into_owned();
                self.clear_for(&abs, &rel, &name)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &abs)
                    .map_err(io_err("create symlink", &abs))?;
                self.chown(&abs, uid, gid, false)?;
                nix::sys::stat::utimensat(
                    AT_FDCWD,
                    &abs,
                    &mtime,
                    &mtime,
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(nix_err("set times", &abs))?;
                self.files += 1;
            }
            EntryType::Link => {
                let target_raw = e
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_entry(&name, "hard link without a target"))?
                    .into_owned();
                let target_name = String::from_utf8_lossy(&target_raw).into_owned();
                let target = sanitize(&target_raw)
                    .map_err(|why| {
                        self.unsafe_entry(
                            &name,
                            format!(
                                "hard link to {target_name:?} points outside the archive ({why})"
                            ),
                        )
                    })?
                    .ok_or_else(|| self.unsafe_entry(&name, "hard link to the archive root"))?;
                self.parents(&target, &name)?;
                let target_abs = self.root.join(&target);
                match fs::symlink_metadata(&target_abs) {
                    Ok(m) if m.is_dir() => {
                        return Err(self.unsafe_entry(&name, "hard link to a directory"));
                    }
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        return Err(self.unsafe_entry(
                            &name,
                            format!(
                                "hard link to {target_name:?}, which is not (yet) in the archive"
                            ),
                        ));
                    }
                    Err(err) => return Err(io_err("stat", &target_abs)(err)),
                }
                if target_abs == abs {
                    return Ok(());
                }
                self.clear_for(&abs, &rel, &name)?;
                // link(2) does not follow a symlink given as the old path, so linking to a
                // symlink links the symlink itself and cannot reach outside the root.
                fs::hard_link(&target_abs, &abs).map_err(io_err("create hard link", &abs))?;
                self.files += 1;
            }
            EntryType::Fifo => {
                self.clear_for(&abs, &rel, &name)?;
                nix::unistd::mkfifo(&abs, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(nix_err("create fifo", &abs))?;
                self.finish_special(&abs, uid, gid, mode, &mtime)?;
            }
            EntryType::Char | EntryType::Block if self.opts.devices => {
                let dev = |v: io::Result<Option<u32>>| v.ok().flatten().unwrap_or(0);
                let (maj, min) = (
                    dev(e.header().device_major()),
                    dev(e.header().device_minor()),
                );
                self.clear_for(&abs, &rel, &name)?;
                let kind = if kind == EntryType::Char {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                nix::sys::stat::mknod(
                    &abs,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    nix::sys::stat::makedev(maj.into(), min.into()),
                )
                .map_err(nix_err("create device node", &abs))?;
                self.finish_special(&abs, uid, gid, mode, &mtime)?;
            }
            EntryType::Char | EntryType::Block => {
                tracing::debug!(entry = %name, "skipping device node: berth provides /dev");
                self.skipped_devices += 1;
            }
            other => {
                tracing::debug!(entry = %name, kind = ?other, "skipping unsupported tar entry type");
            }
        }
        Ok(())
    }

    /// The xattrs of the entry's PAX records, when asked for, ACL ids shifted.
    fn pax_xattrs<R: Read>(
        &self,
        e: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        if !self.opts.xattrs {
            return Ok(Vec::new());
        }
        let Some(exts) = e
            .pax_extensions()
            .map_err(|err| self.corrupt(format!("entry {name:?}: {err}")))?
        else {
            return Ok(Vec::new());
        };
        let mut recs = Vec::new();
        for x in exts {
            let x = x.map_err(|err| self.corrupt(format!("entry {name:?}: {err}")))?;
            if let Ok(k) = x.key() {
                recs.push((k, x.value_bytes()));
            }
        }
        crate::vzimport::pax::entry_xattrs(recs, self.opts.shift, Path::new(name))
            .map_err(|err| self.unsafe_entry(name, ErrorChain(&err).to_string()))
    }

    fn set_xattrs(&self, abs: &Path, xattrs: &[(String, Vec<u8>)]) -> Result<()> {
        for (k, v) in xattrs {
            xattr::set(abs, k, v).map_err(io_err("set xattr on", abs))?;
        }
        Ok(())
    }

    fn finish_dirs(&mut self) -> Result<()> {
        for (abs, mode, mtime) in self.dir_meta.drain(..).rev() {
            fs::set_permissions(&abs, fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &abs))?;
            nix::sys::stat::utimensat(
                AT_FDCWD,
                &abs,
                &mtime,
                &mtime,
                UtimensatFlags::FollowSymlink,
            )
            .map_err(nix_err("set times", &abs))?;
        }
        Ok(())
    }
}

/// Extracts `archive` into the (empty, existing) directory `root`. Public within the crate for
/// tests that want to look at the result of a rejected archive.
pub(crate) fn extract(archive: &Path, root: &Path) -> Result<()> {
    extract_with(archive, root, ExtractOpts::default())
}

/// Opens `archive` for reading, decompressed by what its first bytes say it is.
fn open_archive(archive: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(archive).map_err(io_err("open archive", archive))?;
    // The compressed bytes read are the progress of an extraction (its total: the file size).
    let mut buf = BufReader::with_capacity(1 << 20, crate::progress::Counted(file));
    let head = {
        use std::io::BufRead;
        buf.fill_buf()
            .map_err(io_err("read archive", archive))?
            .to_vec()
    };
    let comp = sniff(&head).map_err(|what| TemplateError::UnknownCompression {
        archive: archive.to_path_buf(),
        what,
    })?;
    let reader: Box<dyn Read> = match comp {
        Compression::None => Box::new(buf),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buf)),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(buf)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buf)
                .map_err(io_err("start zstd decoder for", archive))?,
        ),
        Compression::Lzo => Box::new(
            crate::vzimport::lzop::Lzop::open(archive).map_err(io_err("decompress", archive))?,
        ),
    };
    Ok(reader)
}

/// The contents of the regular file `member` (a clean relative path) in `archive`, without
/// extracting anything; `None` if the archive has no such regular file.
pub(crate) fn read_member(archive: &Path, member: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    let mut ar = tar::Archive::new(open_archive(archive)?);
    let corrupt = |why: String| TemplateError::Corrupt {
        archive: archive.to_path_buf(),
        why,
    };
    let entries = ar
        .entries()
        .map_err(|err| corrupt(ErrorChain(&err).to_string()))?;
    for e in entries {
        let mut e = e.map_err(|err| corrupt(ErrorChain(&err).to_string()))?;
        let raw = e.path_bytes().into_owned();
        if sanitize(&raw).ok().flatten().as_deref() != Some(member) {
            continue;
        }
        if !matches!(
            e.header().entry_type(),
            EntryType::Regular | EntryType::Continuous
        ) {
            return Err(TemplateError::UnsafeEntry {
                archive: archive.to_path_buf(),
                entry: member.display().to_string(),
                why: "is not a regular file".into(),
            });
        }
        if e.size() > max {
            return Err(corrupt(format!(
                "{} is larger than {max} bytes",
                member.display()
            )));
        }
        let mut buf = Vec::new();
        e.read_to_end(&mut buf)
            .map_err(|err| corrupt(ErrorChain(&err).to_string()))?;
        return Ok(Some(buf));
    }
    Ok(None)
}

/// [`extract`] with the options an OpenVZ archive import needs.
pub(crate) fn extract_with(archive: &Path, root: &Path, opts: ExtractOpts) -> Result<()> {
    extract_limited(archive, root, opts, None)
}

/// The space an unprivileged writer may still use on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(nix_err("statfs", dir))?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// [`extract_with`], refusing an archive whose files expand to more than `max_bytes` (by
/// default the space free where `root` is).
pub(crate) fn extract_limited(
    archive: &Path,
    root: &Path,
    opts: ExtractOpts,
    max_bytes: Option<u64>,
) -> Result<()> {
    let max_bytes = match max_bytes {
        Some(m) => m,
        None => free_bytes(root)?,
    };
    let size = fs::metadata(archive).ok().map(|m| m.len());
    let _task = crate::progress::Task::start(&format!("unpacking {}", archive.display()), size);
    let mut reader = open_archive(archive)?;
    if opts.xattrs {
        // GNU tar's multi-line ACL records, made readable for the tar crate.
        reader = Box::new(crate::vzimport::pax::Normalize::new(reader));
    }
    let mut watch = EofWatch {
        inner: reader,
        hit_eof: false,
    };
    let mut x = Extractor {
        archive,
        root: root.to_path_buf(),
        same_owner: nix::unistd::geteuid().is_root(),
        opts,
        dirs: HashSet::new(),
        dir_meta: Vec::new(),
        files: 0,
        skipped_devices: 0,
        expanded: 0,
        max_bytes,
    };
    {
        let mut ar = tar::Archive::new(&mut watch);
        // An io::Error from tar or a decoder may wrap an error with a source of its own.
        let entries = ar
            .entries()
            .map_err(|err| x.corrupt(ErrorChain(&err).to_string()))?;
        for e in entries {
            let e = e.map_err(|err| x.corrupt(ErrorChain(&err).to_string()))?;
            x.entry(e)?;
        }
    }
    if watch.hit_eof {
        return Err(x.corrupt("ends without the end-of-archive marker"));
    }
    // Read to the end so the decompressor verifies its checksum (gzip CRC, xz check, zstd).
    io::copy(&mut watch.inner, &mut io::sink())
        .map_err(|err| x.corrupt(format!("after the last entry: {}", ErrorChain(&err))))?;
    if x.files == 0 {
        return Err(TemplateError::EmptyArchive {
            archive: archive.to_path_buf(),
        });
    }
    x.finish_dirs()?;
    if x.skipped_devices > 0 {
        tracing::info!(archive = %archive.display(), count = x.skipped_devices, "skipped device nodes");
    }
    Ok(())
}

/// Writes `r` into `f`, seeking over 4 KiB blocks of zeros so they stay holes; returns the
/// bytes read.
fn copy_sparse(r: &mut impl Read, f: &mut File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom, Write};
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for chunk in buf[..n].chunks(4096) {
            if chunk.iter().all(|&b| b == 0) {
                f.seek(SeekFrom::Current(chunk.len() as i64))?;
            } else {
                f.write_all(chunk)?;
            }
        }
        total += n as u64;
    }
    f.set_len(total)?;
    Ok(total)
}

/// Which init the tree boots and which signal powers it off. sysvinit only halts on SIGPWR with a
/// `powerfail` inittab entry that runs `init 0`, so one is added if missing.
pub(crate) fn detect_init(rootfs: &Path, archive: &Path) -> Result<(String, String)> {
    let init = rootfs.join("sbin/init");
    let meta = match fs::symlink_metadata(&init) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TemplateError::NoInit {
                archive: archive.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err("stat", &init)(e)),
    };
    if meta.file_type().is_symlink() {
        let target = fs::read_link(&init).map_err(io_err("read symlink", &init))?;
        let last = target.file_name().and_then(OsStr::to_str).unwrap_or("");
        if last == "systemd" {
            return Ok(("/sbin/init".into(), "SIGRTMIN+4".into()));
        }
        if last == "busybox" {
            return Ok(("/sbin/init".into(), "SIGUSR2".into()));
        }
    }
    let inittab = rootfs.join("etc/inittab");
    if fs::symlink_metadata(&inittab).is_ok_and(|m| m.is_file()) {
        super::build::ensure_powerfail(&inittab)?;
        return Ok(("/sbin/init".into(), "SIGPWR".into()));
    }
    // A regular /sbin/init without an inittab: most likely systemd installed as /sbin/init, or an
    // unknown init. SIGRTMIN+4 is systemd's poweroff; SIGTERM is the generic ask-to-exit.
    tracing::warn!(archive = %archive.display(), "unknown init in imported template; stop_signal SIGTERM");
    Ok(("/sbin/init".into(), "SIGTERM".into()))
}

impl TemplateStore {
    /// Imports a rootfs tarball (.tar, .tar.gz/.tgz, .tar.xz, .tar.zst) as template `name`
    /// (default: the file name without its extensions). Nothing changes in the store on failure.
    pub fn import(&self, file: &Path, name: Option<&str>) -> Result<TemplateInfo> {
        let name = match name {
            Some(n) => n.to_string(),
            None => name_from_file(file).ok_or_else(|| TemplateError::InvalidName {
                name: file.display().to_string(),
                why: "cannot derive a name from this file name; pass one",
            })?,
        };
        validate_name(&name)?;
        fs::metadata(file).map_err(io_err("open archive", file))?;
        self.ensure_absent(&name)?;
        let scratch: Scratch = self.scratch("import", &name)?;
        let rootfs = scratch.rootfs();
        crate::crash_point!("template.import.staged");
        extract(file, &rootfs)?;
        crate::crash_point!("template.import.unpacked");
        let (init, stop_signal) = detect_init(&rootfs, file)?;
        let info = TemplateInfo {
            name: name.clone(),
            kind: TemplateKind::Imported,
            created: now_unix(),
            source: fs::canonicalize(file)
                .unwrap_or_else(|_| file.to_path_buf())
                .display()
                .to_string(),
            init,
            stop_signal,
            size: tree_size(&rootfs)?,
        };
        scratch.commit(self, &info)?;
        crate::crash_point!("template.import.committed");
        tracing::info!(template = %name, archive = %file.display(), size = info.size, "imported template");
        Ok(info)
    }
}
