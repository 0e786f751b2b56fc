//! `set --userpasswd user:password`: a SHA-512-crypt hash written into the CT's /etc/shadow
//! from the host, the same way for a running and a stopped CT.
//!
//! The CT's root owns its files, so /etc and /etc/shadow may be symlinks planted to make a
//! root process on the host write elsewhere. Every read and write goes through the O_NOFOLLOW
//! helpers of `net::files` (a directory fd of `<root>/etc`, a temporary file renamed over the
//! target), and a shadow file that is a symlink is refused rather than replaced: replacing it
//! would silently drop the accounts the link pointed at.

use std::fmt;
use std::path::Path;

use sha_crypt::{PasswordHasher, ShaCrypt};

use super::create::copy_up_attrs;
use super::{CtError, Result, net_err};
use crate::ctid::Ctid;
use crate::net::files::{EtcFile, restore_etc_file, save_etc_file};

/// One `--userpasswd`: the account and its new password (kept out of Debug output).
#[derive(Clone, PartialEq, Eq)]
pub struct UserPassword {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for UserPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserPassword({}:<hidden>)", self.user)
    }
}

impl UserPassword {
    /// vzctl's `user:password` (split at the first colon; the password may hold more).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let Some((user, password)) = s.split_once(':') else {
            return Err("--userpasswd: expected USER:PASSWORD".into());
        };
        let user_ok = !user.is_empty()
            && user.len() <= 32
            && user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            && !user.starts_with('-');
        if !user_ok {
            return Err(format!(
                "--userpasswd: {user:?} is not a user name (letters, digits, `_`, `.`, `-`)"
            ));
        }
        if password.is_empty() {
            return Err(format!("--userpasswd {user}: the password is empty"));
        }
        if password.contains(['\n', '\0']) {
            return Err(format!(
                "--userpasswd {user}: the password holds a newline or NUL byte"
            ));
        }
        Ok(Self {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }
}

/// A `$6$` hash of `password` with a fresh random salt of 12 bytes: 16 characters once
/// encoded, the most SHA-crypt uses (a longer salt would be stored but cut by every verifier).
pub fn hash_password(ctid: Ctid, password: &str) -> Result<String> {
    let mut salt = [0u8; 12];
    // SAFETY: the kernel writes at most salt.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(salt.as_mut_ptr().cast(), salt.len(), 0) };
    if n != salt.len() as isize {
        return Err(CtError::Invalid {
            ctid,
            msg: format!(
                "--userpasswd: no random salt: {}",
                std::io::Error::last_os_error()
            ),
        });
    }
    ShaCrypt::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| CtError::Invalid {
            ctid,
            msg: format!("--userpasswd: hashing the password failed: {e}"),
        })
}

/// The shadow text with `user`'s hash replaced (last change: `today`, days since 1970), or
/// appended when the account is in passwd but not yet in shadow.
fn updated_shadow(
    ctid: Ctid,
    shadow: &str,
    passwd: &str,
    user: &str,
    hash: &str,
    today: u64,
) -> Result<String> {
    let mut out = String::with_capacity(shadow.len() + hash.len());
    let mut found = false;
    for line in shadow.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&user) && !found {
            found = true;
            fields.resize(fields.len().max(9), "");
            let day = today.to_string();
            fields[1] = hash;
            fields[2] = &day;
            out.push_str(&fields.join(":"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !found {
        let in_passwd = passwd.lines().any(|l| l.split(':').next() == Some(user));
        if !in_passwd {
            return Err(CtError::Invalid {
                ctid,
                msg: format!("--userpasswd: the CT has no user {user:?} in /etc/passwd"),
            });
        }
        out.push_str(&format!("{user}:{hash}:{today}:0:99999:7:::\n"));
    }
    Ok(out)
}

/// A regular file of the CT's /etc as text; absent is `None`, a symlink or other kind refused.
fn read_etc(ctid: Ctid, root: &Path, name: &str) -> Result<Option<(String, EtcFile)>> {
    match save_etc_file(root, name).map_err(net_err(ctid))? {
        EtcFile::Absent => Ok(None),
        f @ EtcFile::File { .. } => {
            let EtcFile::File { content, .. } = &f else {
                unreachable!()
            };
            let text = String::from_utf8(content.clone()).map_err(|_| CtError::Invalid {
                ctid,
                msg: format!("--userpasswd: the CT's /etc/{name} is not UTF-8 text"),
            })?;
            Ok(Some((text, f)))
        }
        EtcFile::Symlink(t) => Err(CtError::Invalid {
            ctid,
            msg: format!(
                "--userpasswd: the CT's /etc/{name} is a symlink (to {}): berth does not write through links of a CT",
                t.display()
            ),
        }),
        EtcFile::Other => Err(CtError::Invalid {
            ctid,
            msg: format!("--userpasswd: the CT's /etc/{name} is not a regular file"),
        }),
    }
}

/// Sets every password in the CT's files: `read_root` is where they are read (for a stopped
/// overlay CT, the template), `write_root` where they are written (its upper layer; the same
/// directory otherwise). `shift` is the CT's id shift, for a copy-up's owner.
pub fn set_passwords(
    ctid: Ctid,
    read_root: &Path,
    write_root: &Path,
    shift: Option<(u32, u32)>,
    users: &[UserPassword],
) -> Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    let no_shadow = || CtError::Invalid {
        ctid,
        msg: "--userpasswd: the CT has no /etc/shadow".into(),
    };
    // The upper layer's copy wins; without one the template's is copied up, as overlayfs would.
    let (mut text, template) = match read_etc(ctid, write_root, "shadow")? {
        Some((t, f)) => (t, Some(f)),
        None if read_root != write_root => {
            let (t, _) = read_etc(ctid, read_root, "shadow")?.ok_or_else(no_shadow)?;
            (t, None)
        }
        None => return Err(no_shadow()),
    };
    let passwd = match read_etc(ctid, write_root, "passwd")? {
        Some((p, _)) => p,
        None => read_etc(ctid, read_root, "passwd")?
            .map(|(p, _)| p)
            .unwrap_or_default(),
    };
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    for u in users {
        let hash = hash_password(ctid, &u.password)?;
        text = updated_shadow(ctid, &text, &passwd, &u.user, &hash, today)?;
    }
    match template {
        Some(EtcFile::File { mode, uid, gid, .. }) => {
            let new = EtcFile::File {
                content: text.into_bytes(),
                mode,
                uid,
                gid,
            };
            restore_etc_file(write_root, "shadow", &new).map_err(net_err(ctid))
        }
        _ => {
            // Copy-up: /etc first (owner and mode from the template), then the file, written
            // root-only and given the template file's owner and mode, shifted.
            let etc = write_root.join("etc");
            if etc.symlink_metadata().is_err() {
                std::fs::create_dir_all(&etc).map_err(super::io_err(
                    ctid,
                    "create directory",
                    &etc,
                ))?;
                copy_up_attrs(ctid, &read_root.join("etc"), &etc, shift)?;
            }
            let new = EtcFile::File {
                content: text.into_bytes(),
                mode: 0o600,
                uid: 0,
                gid: 0,
            };
            restore_etc_file(write_root, "shadow", &new).map_err(net_err(ctid))?;
            copy_up_attrs(
                ctid,
                &read_root.join("etc/shadow"),
                &etc.join("shadow"),
                shift,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha_crypt::PasswordVerifier;

    fn ctid() -> Ctid {
        Ctid::new(101).unwrap()
    }

    #[test]
    fn parse_splits_at_the_first_colon() {
        let u = UserPassword::parse("root:a:b c").unwrap();
        assert_eq!((u.user.as_str(), u.password.as_str()), ("root", "a:b c"));
        assert!(
            !format!("{u:?}").contains("a:b"),
            "the password stays hidden"
        );
        for bad in [
            "root",
            ":pw",
            "root:",
            "ro ot:pw",
            "a/b:pw",
            "-x:pw",
            "root:a\nb",
        ] {
            assert!(UserPassword::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shadow_line_is_replaced_or_added() {
        let shadow = "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n";
        let passwd = "root:x:0:0::/root:/bin/sh\nweb:x:1000:1000::/home/web:/bin/sh\n";
        let out = updated_shadow(ctid(), shadow, passwd, "root", "$6$s$h", 20000).unwrap();
        assert_eq!(
            out,
            "root:$6$s$h:20000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
        );
        let out = updated_shadow(ctid(), shadow, passwd, "web", "$6$s$h", 20000).unwrap();
        assert!(out.ends_with("web:$6$s$h:20000:0:99999:7:::\n"), "{out}");
        assert!(updated_shadow(ctid(), shadow, passwd, "nosuch", "h", 1).is_err());
        // A short line gets its missing fields.
        let out = updated_shadow(ctid(), "root:*\n", passwd, "root", "H", 5).unwrap();
        assert_eq!(out, "root:H:5::::::\n");
    }

    #[test]
    fn hashes_verify_and_are_salted() {
        let a = hash_password(ctid(), "s3cret").unwrap();
        let b = hash_password(ctid(), "s3cret").unwrap();
        assert!(a.starts_with("$6$"), "{a}");
        // $6$rounds=5000$SALT$HASH with SHA-crypt's full 16-character salt.
        let salt = a.rsplit('$').nth(1).unwrap();
        assert_eq!(salt.len(), 16, "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        ShaCrypt::default()
            .verify_password(b"s3cret", a.as_str())
            .unwrap();
        assert!(
            ShaCrypt::default()
                .verify_password(b"wrong", a.as_str())
                .is_err()
        );
    }
}
