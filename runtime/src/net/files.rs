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
    let _ = Read::by_ref(&mut f).take(1 << 20).read_to_string(&mut s);
    s
}

fn replace_file(rootfs: &Path, etc: &OwnedFd, name: &str, content: &str) -> Result<(), NetError> {
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
        .write_all(content.as_bytes())
        .map_err(|e| ferr("write", &path, e))
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
