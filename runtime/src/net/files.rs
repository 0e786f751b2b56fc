//! The CT's name-service files: /etc/resolv.conf, /etc/hostname, /etc/hosts.
//!
//! The rootfs belongs to the CT, so its `/etc` entries may be symlinks planted to make a root
//! process on the host write elsewhere. Files are therefore written relative to a directory fd of
//! `<rootfs>/etc` opened with O_NOFOLLOW, into a temporary file created O_EXCL|O_NOFOLLOW, then
//! renamed over the target: rename replaces a symlink itself instead of following it.

use std::fs::File;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::Mode;
use nix::unistd::unlinkat;

use super::config::validate_hostname;
use super::error::NetError;

fn ferr(op: &'static str, path: &Path, e: impl Into<std::io::Error>) -> NetError {
    NetError::File {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

fn open_etc(rootfs: &Path) -> Result<OwnedFd, NetError> {
    let root = File::open(rootfs).map_err(|e| ferr("open rootfs", rootfs, e))?;
    let etc = rootfs.join("etc");
    openat(
        root.as_fd(),
        "etc",
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ferr("open (must be a real directory, not a symlink)", &etc, e))
}

/// Reads `<etc>/<name>` if it is a regular file (a symlink or absence gives "").
fn read_existing(etc: &OwnedFd, name: &str) -> String {
    let Ok(fd) = openat(
        etc.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) else {
        return String::new();
    };
    let mut f = File::from(fd);
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return String::new();
    }
    let mut s = String::new();
    let _ = Read::by_ref(&mut f)
        .take(MAX_ETC_FILE)
        .read_to_string(&mut s);
    s
}

/// The most berth reads of a CT's `/etc` file: the CT's root can make one as large as it likes
/// (sparse files cost no quota), and berth reads it as host root.
const MAX_ETC_FILE: u64 = 1 << 20;

/// A new file gets the owner of the CT's `/etc`: root inside the CT, which for an unprivileged
/// CT is its range's base on the host (a file owned by host root would be `nobody` to it).
fn replace_file(rootfs: &Path, etc: &OwnedFd, name: &str, content: &str) -> Result<(), NetError> {
    let st = nix::sys::stat::fstat(etc).map_err(|e| ferr("stat", &rootfs.join("etc"), e))?;
    replace_file_as(
        rootfs,
        etc,
        name,
        content.as_bytes(),
        Some((0o644, st.st_uid, st.st_gid)),
    )
}

/// [`replace_file`] with raw bytes, and with `owner` = (mode, uid, gid) given the new file
/// gets them before it replaces the old one.
fn replace_file_as(
    rootfs: &Path,
    etc: &OwnedFd,
    name: &str,
    content: &[u8],
    owner: Option<(u32, u32, u32)>,
) -> Result<(), NetError> {
    let path = rootfs.join("etc").join(name);
    let tmp = format!(".{name}.berth-tmp");
    let _ = unlinkat(
        etc.as_fd(),
        tmp.as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    let fd = openat(
        etc.as_fd(),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(|e| ferr("create temporary file for", &path, e))?;
    let mut f = File::from(fd);
    let res = f
        .write_all(content)
        .map_err(|e| ferr("write", &path, e))
        .and_then(|()| match owner {
            None => Ok(()),
            Some((mode, uid, gid)) => {
                use std::os::unix::fs::PermissionsExt;
                // Owner first: chown clears setuid/setgid, and a host-root-owned file must
                // never carry mode bits the CT chose. Those two bits are not restored at all:
                // berth writes plain configuration files.
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                    .and_then(|()| {
                        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o1777))
                    })
                    .map_err(|e| ferr("set owner and mode of", &path, e))
            }
        })
        .and_then(|()| {
            renameat(etc.as_fd(), tmp.as_str(), etc.as_fd(), name)
                .map_err(|e| ferr("replace", &path, e))
        });
    if res.is_err() {
        let _ = unlinkat(
            etc.as_fd(),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    res
}

/// What one of the CT's `/etc` files was before berth rewrote it ([`save_etc_file`]), to put
/// it back with [`restore_etc_file`] when a later step of the same change fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcFile {
    /// Not there (or no `/etc` at all).
    Absent,
    File {
        content: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// The CT's own symlink (berth's rename replaced the link, not its target).
    Symlink(std::path::PathBuf),
    /// Something berth does not write over (a directory, a device): left alone.
    Other,
}

/// Reads `<rootfs>/etc/<name>` without following symlinks.
pub fn save_etc_file(rootfs: &Path, name: &str) -> Result<EtcFile, NetError> {
    use nix::sys::stat::{FileStat, SFlag, fstatat};
    let path = rootfs.join("etc").join(name);
    if std::fs::symlink_metadata(rootfs.join("etc")).is_err() {
        return Ok(EtcFile::Absent);
    }
    let etc = open_etc(rootfs)?;
    let st: FileStat = match fstatat(etc.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(EtcFile::Absent),
        Err(e) => return Err(ferr("stat", &path, e)),
    };
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFLNK {
        let target =
            nix::fcntl::readlinkat(etc.as_fd(), name).map_err(|e| ferr("read link", &path, e))?;
        return Ok(EtcFile::Symlink(target.into()));
    }
    if kind != SFlag::S_IFREG {
        return Ok(EtcFile::Other);
    }
    let fd = openat(
        etc.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| ferr("open", &path, e))?;
    let mut f = File::from(fd);
    // What was opened, not what the stat saw: the CT may have swapped the name in between.
    let opened = nix::sys::stat::fstat(&f).map_err(|e| ferr("stat", &path, e))?;
    if SFlag::from_bits_truncate(opened.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG
        || (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino)
    {
        return Err(ferr(
            "read",
            &path,
            std::io::Error::other("replaced while berth was reading it"),
        ));
    }
    let too_big = || {
        ferr(
            "read",
            &path,
            std::io::Error::other(format!("larger than {MAX_ETC_FILE} bytes")),
        )
    };
    if opened.st_size as u64 > MAX_ETC_FILE {
        return Err(too_big());
    }
    let mut content = Vec::new();
    Read::by_ref(&mut f)
        .take(MAX_ETC_FILE + 1)
        .read_to_end(&mut content)
        .map_err(|e| ferr("read", &path, e))?;
    if content.len() as u64 > MAX_ETC_FILE {
        return Err(too_big());
    }
    Ok(EtcFile::File {
        content,
        mode: opened.st_mode,
        uid: opened.st_uid,
        gid: opened.st_gid,
    })
}

/// Puts `<rootfs>/etc/<name>` back as [`save_etc_file`] found it (written like every file
/// here: never through a symlink).
pub fn restore_etc_file(rootfs: &Path, name: &str, saved: &EtcFile) -> Result<(), NetError> {
    let path = rootfs.join("etc").join(name);
    if matches!(saved, EtcFile::Other) {
        return Ok(());
    }
    let etc = match open_etc(rootfs) {
        Ok(etc) => etc,
        // No /etc now: nothing was written that needs removing.
        Err(_)
            if saved == &EtcFile::Absent
                && std::fs::symlink_metadata(rootfs.join("etc")).is_err() =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let unlink = || match unlinkat(etc.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(ferr("remove", &path, e)),
    };
    match saved {
        EtcFile::Absent => unlink(),
        EtcFile::Symlink(target) => {
            unlink()?;
            nix::unistd::symlinkat(target.as_path(), etc.as_fd(), name)
                .map_err(|e| ferr("restore link", &path, e))
        }
        EtcFile::File {
            content,
            mode,
            uid,
            gid,
        } => replace_file_as(rootfs, &etc, name, content, Some((*mode, *uid, *gid))),
        EtcFile::Other => Ok(()),
    }
}

/// Writes the CT's `/etc/resolv.conf`: `nameserver` lines replaced when `nameservers` is not
/// empty, `search`/`domain` lines replaced when `searchdomains` is not empty, other lines kept
/// (vzctl's behaviour). With both empty the file is left alone (the CT manages it).
pub fn write_resolv_conf(
    rootfs: &Path,
    nameservers: &[IpAddr],
    searchdomains: &[String],
) -> Result<(), NetError> {
    if nameservers.is_empty() && searchdomains.is_empty() {
        return Ok(());
    }
    for d in searchdomains {
        validate_hostname(d).map_err(|_| {
            NetError::Invalid(format!("search domain {d:?} is not a valid domain name"))
        })?;
    }
    let etc = open_etc(rootfs)?;
    let old = read_existing(&etc, "resolv.conf");
    let mut out = String::new();
    if !searchdomains.is_empty() {
        out += &format!("search {}\n", searchdomains.join(" "));
    }
    for ns in nameservers {
        out += &format!("nameserver {ns}\n");
    }
    for line in old.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        let replaced = (key == "nameserver" && !nameservers.is_empty())
            || ((key == "search" || key == "domain") && !searchdomains.is_empty());
        if !replaced {
            out += line;
            out.push('\n');
        }
    }
    replace_file(rootfs, &etc, "resolv.conf", &out)
}

/// Writes `/etc/hostname` and maps the name in `/etc/hosts` (Debian's `127.0.1.1 fqdn short`
/// convention; other lines are kept, localhost entries added if missing).
pub fn write_hostname_files(rootfs: &Path, hostname: &str) -> Result<(), NetError> {
    validate_hostname(hostname)?;
    let hostname = hostname.trim_end_matches('.');
    let etc = open_etc(rootfs)?;
    replace_file(rootfs, &etc, "hostname", &format!("{hostname}\n"))?;

    let short = hostname.split('.').next().unwrap_or(hostname);
    let old = read_existing(&etc, "hosts");
    let mut out = String::new();
    let mut has_v4_localhost = false;
    let mut has_v6_localhost = false;
    for line in old.lines() {
        let mut fields = line.split_whitespace();
        let ip = fields.next().unwrap_or("");
        let names: Vec<&str> = fields.take_while(|f| !f.starts_with('#')).collect();
        if ip == "127.0.1.1" {
            continue;
        }
        if ip == "127.0.0.1" && names.contains(&"localhost") {
            has_v4_localhost = true;
        }
        if ip == "::1" && names.contains(&"localhost") {
            has_v6_localhost = true;
        }
        out += line;
        out.push('\n');
    }
    let mut head = String::new();
    if !has_v4_localhost {
        head += "127.0.0.1\tlocalhost\n";
    }
    if !has_v6_localhost {
        head += "::1\tlocalhost ip6-localhost ip6-loopback\n";
    }
    let own = if short != hostname {
        format!("127.0.1.1\t{hostname} {short}\n")
    } else {
        format!("127.0.1.1\t{hostname}\n")
    };
    replace_file(rootfs, &etc, "hosts", &format!("{head}{own}{out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_merges_and_replaces_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "secret\n").unwrap();
        std::os::unix::fs::symlink(&outside, etc.join("resolv.conf")).unwrap();
        write_resolv_conf(
            dir.path(),
            &["192.0.2.53".parse().unwrap()],
            &["example.com".into()],
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret\n");
        let got = std::fs::read_to_string(etc.join("resolv.conf")).unwrap();
        assert_eq!(got, "search example.com\nnameserver 192.0.2.53\n");

        std::fs::write(
            etc.join("resolv.conf"),
            "options edns0\nnameserver 198.51.100.1\nsearch a.b\n",
        )
        .unwrap();
        write_resolv_conf(dir.path(), &["2001:db8::53".parse().unwrap()], &[]).unwrap();
        let got = std::fs::read_to_string(etc.join("resolv.conf")).unwrap();
        assert_eq!(got, "nameserver 2001:db8::53\noptions edns0\nsearch a.b\n");
    }

    #[test]
    fn hostname_and_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(
            etc.join("hosts"),
            "127.0.0.1 localhost\n127.0.1.1 old.example old\n192.0.2.9 db\n",
        )
        .unwrap();
        write_hostname_files(dir.path(), "web1.example.com").unwrap();
        assert_eq!(
            std::fs::read_to_string(etc.join("hostname")).unwrap(),
            "web1.example.com\n"
        );
        let hosts = std::fs::read_to_string(etc.join("hosts")).unwrap();
        assert_eq!(
            hosts,
            "::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tweb1.example.com web1\n127.0.0.1 localhost\n192.0.2.9 db\n"
        );
        assert!(write_hostname_files(dir.path(), "bad name").is_err());
    }

    /// A saved file, link or absence comes back exactly, without writing through a link the
    /// CT planted meanwhile.
    #[test]
    fn saved_etc_files_are_restored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(etc.join("hosts"), b"127.0.0.1 localhost\n\xff\n").unwrap();
        std::fs::set_permissions(etc.join("hosts"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::symlink("../run/resolv.conf", etc.join("resolv.conf")).unwrap();
        let saved: Vec<(&str, EtcFile)> = ["hosts", "resolv.conf", "hostname"]
            .into_iter()
            .map(|n| (n, save_etc_file(dir.path(), n).unwrap()))
            .collect();
        assert_eq!(saved[2].1, EtcFile::Absent);
        assert_eq!(saved[1].1, EtcFile::Symlink("../run/resolv.conf".into()));
        write_hostname_files(dir.path(), "web1.example.com").unwrap();
        write_resolv_conf(dir.path(), &["192.0.2.53".parse().unwrap()], &[]).unwrap();
        // The CT swaps /etc/hosts for a link to a host file before the rollback.
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "host file\n").unwrap();
        std::fs::remove_file(etc.join("hosts")).unwrap();
        std::os::unix::fs::symlink(&outside, etc.join("hosts")).unwrap();
        for (name, s) in &saved {
            restore_etc_file(dir.path(), name, s).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "host file\n");
        assert_eq!(
            std::fs::read(etc.join("hosts")).unwrap(),
            b"127.0.0.1 localhost\n\xff\n"
        );
        let mode = std::fs::metadata(etc.join("hosts"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_link(etc.join("resolv.conf")).unwrap(),
            Path::new("../run/resolv.conf")
        );
        assert!(std::fs::symlink_metadata(etc.join("hostname")).is_err());
        // No /etc before and after: nothing to do.
        let bare = tempfile::tempdir().unwrap();
        let s = save_etc_file(bare.path(), "hosts").unwrap();
        restore_etc_file(bare.path(), "hosts", &s).unwrap();
    }

    #[test]
    fn a_huge_etc_file_is_refused_and_setuid_never_restored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        // Sparse: costs the CT nothing, would cost berth 4 GiB of memory.
        let f = std::fs::File::create(etc.join("hosts")).unwrap();
        f.set_len(4 << 30).unwrap();
        let e = save_etc_file(dir.path(), "hosts").unwrap_err();
        assert!(
            crate::error_chain::ErrorChain(&e)
                .to_string()
                .contains("larger than"),
            "{e:?}"
        );
        f.set_len(0).unwrap();
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::set_permissions(etc.join("hosts"), std::fs::Permissions::from_mode(0o6755))
            .unwrap();
        let saved = save_etc_file(dir.path(), "hosts").unwrap();
        write_hostname_files(dir.path(), "web1").unwrap();
        restore_etc_file(dir.path(), "hosts", &saved).unwrap();
        let mode = std::fs::metadata(etc.join("hosts"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755, "setuid/setgid came back: {mode:o}");
    }

    #[test]
    fn etc_symlink_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(target.path(), dir.path().join("etc")).unwrap();
        let e = write_hostname_files(dir.path(), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("symlink"), "{e}");
        assert!(!target.path().join("hostname").exists());
    }
}
