//! The host's pool of subordinate ids and which CT holds which range of it.
//!
//! Each allocation is a file `<root>/userns/<index>` holding the CTID, created with O_EXCL:
//! two concurrent creates can never get the same range, the record survives reboots, and
//! destroy releases it by removing the file. Range `index` is ids
//! `pool_start + index * 65536 ..+ 65536`, in the host's user namespace.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{RANGE, Result, UsernsError, io_err};
use crate::config::{CtConfig, Host, UserNs};
use crate::ctid::Ctid;

/// Default pool: 60000 ranges above one million, clear of every id a distribution hands out
/// to its users (Debian's /etc/subuid starts at 100000 and grows by 65536 per user).
pub const DEFAULT_START: u32 = 1_000_000;
pub const DEFAULT_RANGES: u32 = 60_000;

/// The pool (`[userns]` in `<root>/host.toml`): `pool_start`, and `pool_size` in ids (a
/// multiple of 65536).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdPool {
    pub start: u32,
    pub ranges: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostToml {
    #[serde(default)]
    userns: Option<PoolToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolToml {
    pool_start: u64,
    pool_size: u64,
}

impl Default for IdPool {
    fn default() -> Self {
        Self {
            start: DEFAULT_START,
            ranges: DEFAULT_RANGES,
        }
    }
}

impl IdPool {
    /// Reads the pool from `<root>/host.toml` (absent file or section: the default).
    pub fn load(host: &Host) -> Result<Self> {
        let path = host.host_conf_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        Self::parse(&text).map_err(|msg| UsernsError::BadPool { path, msg })
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let t: HostToml = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let Some(p) = t.userns else {
            return Ok(Self::default());
        };
        if p.pool_size < u64::from(RANGE) || p.pool_size % u64::from(RANGE) != 0 {
            return Err(format!(
                "[userns] pool_size = {} must be a positive multiple of {RANGE} (one range per CT)",
                p.pool_size
            ));
        }
        // u32::MAX is chown(2)'s "no change" and the kernel's invalid id: the pool ends below it.
        if p.pool_start + p.pool_size > u64::from(u32::MAX) {
            return Err(format!(
                "[userns] pool_start + pool_size = {} passes the largest id {}",
                p.pool_start + p.pool_size,
                u32::MAX - 1
            ));
        }
        if p.pool_start == 0 {
            return Err("[userns] pool_start = 0 would map a CT's root to the host's root".into());
        }
        Ok(Self {
            start: p.pool_start as u32,
            ranges: (p.pool_size / u64::from(RANGE)) as u32,
        })
    }

    pub fn range(&self, index: u32) -> UserNs {
        let base = self.start + index * RANGE;
        UserNs {
            uid_base: base,
            gid_base: base,
            size: RANGE,
        }
    }

    /// The pool index of a range, if it is one of the pool's.
    fn index_of(&self, u: &UserNs) -> Option<u32> {
        let off = u.uid_base.checked_sub(self.start)?;
        (off % RANGE == 0 && u.gid_base == u.uid_base && off / RANGE < self.ranges)
            .then_some(off / RANGE)
    }

    fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.ranges) * u64::from(RANGE)
    }
}

/// Ids the host itself uses, which no CT range may contain: users and groups, and other
/// users' subordinate ranges (/etc/subuid, /etc/subgid; root's own entries are the pool a
/// hoster may have reserved for berth, so they are not a conflict).
#[derive(Debug, Default, Clone)]
pub struct HostIds {
    users: Vec<(u32, String)>,
    groups: Vec<(u32, String)>,
    sub: Vec<(u64, u64, String)>,
}

impl HostIds {
    pub fn read(etc: &Path) -> Self {
        let ids = |file: &str| -> Vec<(u32, String)> {
            fs::read_to_string(etc.join(file))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((id, format!("{file} {name}")))
                })
                .collect()
        };
        let mut sub = Vec::new();
        for file in ["subuid", "subgid"] {
            for l in fs::read_to_string(etc.join(file))
                .unwrap_or_default()
                .lines()
            {
                let mut f = l.split(':');
                let (Some(owner), Some(start), Some(count)) = (f.next(), f.next(), f.next()) else {
                    continue;
                };
                if owner == "root" || owner == "0" {
                    continue;
                }
                if let (Ok(s), Ok(c)) = (start.parse::<u64>(), count.parse::<u64>()) {
                    sub.push((s, s + c, format!("{file} range of {owner}")));
                }
            }
        }
        Self {
            users: ids("passwd"),
            groups: ids("group"),
            sub,
        }
    }

    /// The first host id (and where it comes from) in `[base, end)`.
    fn conflict(&self, base: u64, end: u64) -> Option<String> {
        let inside = |id: u32| (base..end).contains(&u64::from(id));
        if let Some((id, src)) = self.users.iter().find(|(id, _)| inside(*id)) {
            return Some(format!("uid {id} ({src})"));
        }
        if let Some((id, src)) = self.groups.iter().find(|(id, _)| inside(*id)) {
            return Some(format!("gid {id} ({src})"));
        }
        self.sub
            .iter()
            .find(|(s, e, _)| *s < end && base < *e)
            .map(|(s, e, src)| format!("ids {s}..{e} ({src})"))
    }
}

fn dir(host: &Host) -> PathBuf {
    host.root.join("userns")
}

/// The ranges already held: the allocation files, seeded on first use from the configs of
/// CTs made before allocations were recorded (their ranges were derived from the CTID).
fn held(host: &Host, pool: &IdPool) -> Result<HashSet<u32>> {
    let d = dir(host);
    if !d.is_dir() {
        seed(host, pool, &d)?;
    }
    let mut out = HashSet::new();
    for e in fs::read_dir(&d).map_err(io_err("read", &d))? {
        let e = e.map_err(io_err("read", &d))?;
        if let Some(i) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
            out.insert(i);
        }
    }
    Ok(out)
}

fn seed(host: &Host, pool: &IdPool, d: &Path) -> Result<()> {
    let tmp = host
        .root
        .join(format!(".userns.{}.tmp", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err("create directory", &tmp))?;
    let ctids = host.list_ctids().map_err(|e| UsernsError::Io {
        op: "list CT configs in",
        path: host.conf_dir(),
        source: io::Error::other(e.to_string()),
    })?;
    for ctid in ctids {
        let Ok(cfg) = CtConfig::load(host, ctid) else {
            continue;
        };
        let Some(u) = cfg.userns else { continue };
        // Every pool range the old range touches is taken, aligned or not.
        let (lo, hi) = (
            u64::from(u.uid_base.min(u.gid_base)),
            u64::from(u.uid_base.max(u.gid_base)) + u64::from(u.size),
        );
        for i in 0..pool.ranges {
            let r = pool.range(i);
            let (s, e) = (
                u64::from(r.uid_base),
                u64::from(r.uid_base) + u64::from(RANGE),
            );
            if s < hi && lo < e {
                write_claim(&tmp.join(i.to_string()), ctid)?;
            }
        }
    }
    match fs::rename(&tmp, d) {
        Ok(()) => Ok(()),
        // Another berth seeded it first.
        Err(_) if d.is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(io_err("rename into place", d)(e)),
    }
}

fn write_claim(path: &Path, ctid: Ctid) -> Result<bool> {
    let mut f = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_err("create", path)(e)),
    };
    f.write_all(format!("{ctid}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", path))?;
    Ok(true)
}

/// Gives CT `ctid` the lowest free range of the pool, recorded before it returns.
pub fn allocate(host: &Host, ctid: Ctid) -> Result<UserNs> {
    let pool = IdPool::load(host)?;
    let host_ids = HostIds::read(&host.etc);
    allocate_in(host, &pool, &host_ids, ctid)
}

fn allocate_in(host: &Host, pool: &IdPool, host_ids: &HostIds, ctid: Ctid) -> Result<UserNs> {
    let held = held(host, pool)?;
    let d = dir(host);
    for i in 0..pool.ranges {
        if held.contains(&i) {
            continue;
        }
        let r = pool.range(i);
        let (base, end) = (
            u64::from(r.uid_base),
            u64::from(r.uid_base) + u64::from(RANGE),
        );
        if let Some(what) = host_ids.conflict(base, end) {
            return Err(UsernsError::OverlapsHost {
                ctid,
                base,
                end,
                what,
                conf: host.host_conf_path(),
            });
        }
        if write_claim(&d.join(i.to_string()), ctid)? {
            return Ok(r);
        }
    }
    Err(UsernsError::Exhausted {
        ctid,
        start: u64::from(pool.start),
        end: pool.end(),
        ranges: u64::from(pool.ranges),
        conf: host.host_conf_path(),
    })
}

/// Who holds exactly range `u` here: `Ok(Some(ctid))`, `Ok(None)` when it is free, and the
/// reason as `Err` when `u` is not a range of this host's pool (a CT moving between hosts keeps
/// its ids on disk, so it needs the same range on the target).
pub fn holder_of(host: &Host, u: &UserNs) -> Result<std::result::Result<Option<Ctid>, String>> {
    let pool = IdPool::load(host)?;
    let Some(i) = pool.index_of(u) else {
        return Ok(Err(format!(
            "ids {}..{} are not a range of this host's pool ({}..{}, {})",
            u.uid_base,
            u64::from(u.uid_base) + u64::from(u.size),
            pool.start,
            pool.end(),
            host.host_conf_path().display()
        )));
    };
    if !held(host, &pool)?.contains(&i) {
        return Ok(Ok(None));
    }
    let p = dir(host).join(i.to_string());
    let text = fs::read_to_string(&p).map_err(io_err("read", &p))?;
    Ok(Ok(text.trim().parse().ok()))
}

/// Claims exactly range `u` for `ctid` (true: claimed now or already its own).
pub fn claim(host: &Host, ctid: Ctid, u: &UserNs) -> Result<bool> {
    let pool = IdPool::load(host)?;
    let Some(i) = pool.index_of(u) else {
        return Ok(false);
    };
    held(host, &pool)?;
    let p = dir(host).join(i.to_string());
    if write_claim(&p, ctid)? {
        return Ok(true);
    }
    Ok(fs::read_to_string(&p)
        .map(|t| t.trim() == ctid.to_string())
        .unwrap_or(false))
}

/// Releases CT `ctid`'s range (a range recorded for another CT is left alone).
pub fn release(host: &Host, ctid: Ctid, u: &UserNs) -> Result<()> {
    let pool = IdPool::load(host)?;
    let Some(i) = pool.index_of(u) else {
        return Ok(());
    };
    let p = dir(host).join(i.to_string());
    match fs::read_to_string(&p) {
        Ok(s) if s.trim() == ctid.to_string() => fs::remove_file(&p).map_err(io_err("remove", &p)),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("read", &p)(e)),
    }
}

/// Who holds a range, as [`gc_allocations`] asks for each allocation's CT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// No config: the CT is gone (or its create was killed before it saved one).
    Gone,
    /// The config's range (None: the CT is privileged now).
    Holds(Option<UserNs>),
    /// The config cannot be read: keep the allocation (fail safe).
    Unknown,
}

/// Removes allocations whose CT is gone or no longer uses that range (a create or a
/// conversion killed between claiming a range and saving the config). The caller's `holder`
/// must hold the CT's lock while it looks, so a create in progress keeps its claim.
pub fn gc_allocations(host: &Host, mut holder: impl FnMut(Ctid) -> Holder) -> Result<Vec<PathBuf>> {
    let pool = IdPool::load(host)?;
    let d = dir(host);
    let mut removed = Vec::new();
    let Ok(rd) = fs::read_dir(&d) else {
        return Ok(removed);
    };
    for e in rd.flatten() {
        let p = e.path();
        let Some(i) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Some(ctid) = fs::read_to_string(&p)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .and_then(|n| Ctid::new(n).ok())
        else {
            continue;
        };
        let keep = match holder(ctid) {
            Holder::Gone | Holder::Holds(None) => false,
            // Configs made before the pool recorded ranges: keep whatever their range touches.
            Holder::Holds(Some(u)) => pool.index_of(&u).is_none_or(|j| j == i),
            Holder::Unknown => true,
        };
        if !keep {
            fs::remove_file(&p).map_err(io_err("remove", &p))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> (tempfile::TempDir, Host) {
        let d = tempfile::tempdir().unwrap();
        let mut h = Host::new(Some(d.path().join("root")), None, None).unwrap();
        h.etc = d.path().join("etc");
        fs::create_dir_all(&h.etc).unwrap();
        h.ensure_dirs().unwrap();
        (d, h)
    }

    fn ct(n: u32) -> Ctid {
        Ctid::new(n).unwrap()
    }

    #[test]
    fn parse_pool() {
        assert_eq!(IdPool::parse("").unwrap(), IdPool::default());
        let p = IdPool::parse("[userns]\npool_start = 2000000\npool_size = 655360\n").unwrap();
        assert_eq!((p.start, p.ranges), (2_000_000, 10));
        for bad in [
            "[userns]\npool_start = 2000000\npool_size = 1000\n",
            "[userns]\npool_start = 2000000\npool_size = 0\n",
            "[userns]\npool_start = 0\npool_size = 65536\n",
            "[userns]\npool_start = 4294901760\npool_size = 65536\n",
            "[userns]\npool_start = 1\n",
            "[userns]\npool_start = 1\npool_size = 65536\nextra = 1\n",
            "[usrens]\n",
        ] {
            assert!(IdPool::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_never_overlap_and_are_released() {
        let (_d, h) = host();
        let pool = IdPool {
            start: 1_000_000,
            ranges: 3,
        };
        let ids = HostIds::default();
        let a = allocate_in(&h, &pool, &ids, ct(1)).unwrap();
        let b = allocate_in(&h, &pool, &ids, ct(2)).unwrap();
        let c = allocate_in(&h, &pool, &ids, ct(3)).unwrap();
        assert_eq!(a.uid_base, 1_000_000);
        assert_eq!(b.uid_base, 1_000_000 + RANGE);
        assert_eq!(c.uid_base, 1_000_000 + 2 * RANGE);
        let e = allocate_in(&h, &pool, &ids, ct(4)).unwrap_err();
        assert!(matches!(e, UsernsError::Exhausted { .. }), "{e}");
        assert!(e.to_string().contains("CT 4"), "{e}");
        // Releasing with the wrong CTID keeps the record.
        fs::write(
            h.host_conf_path(),
            "[userns]\npool_start = 1000000\npool_size = 196608\n",
        )
        .unwrap();
        release(&h, ct(9), &b).unwrap();
        assert!(allocate_in(&h, &pool, &ids, ct(4)).is_err());
        release(&h, ct(2), &b).unwrap();
        assert_eq!(allocate_in(&h, &pool, &ids, ct(4)).unwrap(), b);
    }

    #[test]
    fn a_pool_over_host_ids_is_refused() {
        let (_d, h) = host();
        fs::write(
            h.etc.join("passwd"),
            "root:x:0:0::/root:/bin/sh\nodd:x:1070000:1:::\n",
        )
        .unwrap();
        fs::write(
            h.etc.join("subuid"),
            "root:1000000:65536000\nalice:1200000:65536\n",
        )
        .unwrap();
        let ids = HostIds::read(&h.etc);
        let pool = IdPool {
            start: 1_000_000,
            ranges: 10,
        };
        // Range 0 is clear (root's own subuid entry is not a conflict), range 1 holds uid 1070000.
        allocate_in(&h, &pool, &ids, ct(1)).unwrap();
        let e = allocate_in(&h, &pool, &ids, ct(2)).unwrap_err().to_string();
        assert!(e.contains("uid 1070000 (passwd odd)"), "{e}");
        let e2 = HostIds::read(&h.etc)
            .conflict(1_200_000, 1_200_001)
            .unwrap();
        assert!(e2.contains("alice"), "{e2}");
        // Nothing was claimed by the refused allocation.
        assert_eq!(held(&h, &pool).unwrap().len(), 1);
    }

    #[test]
    fn seeded_from_old_configs() {
        let (_d, h) = host();
        let mut cfg = CtConfig::new(ct(5), "busybox".into());
        cfg.userns = Some(UserNs {
            uid_base: 1_000_000 + RANGE + 10,
            gid_base: 1_000_000 + RANGE + 10,
            size: RANGE,
        });
        cfg.save(&h).unwrap();
        let pool = IdPool {
            start: 1_000_000,
            ranges: 4,
        };
        let got = allocate_in(&h, &pool, &HostIds::default(), ct(6)).unwrap();
        assert_eq!(got.uid_base, 1_000_000);
        // The unaligned old range touches ranges 1 and 2.
        let next = allocate_in(&h, &pool, &HostIds::default(), ct(7)).unwrap();
        assert_eq!(next.uid_base, 1_000_000 + 3 * RANGE);
    }

    #[test]
    fn gc_drops_orphans_only() {
        let (_d, h) = host();
        let pool = IdPool::default();
        let a = allocate_in(&h, &pool, &HostIds::default(), ct(1)).unwrap();
        let _b = allocate_in(&h, &pool, &HostIds::default(), ct(2)).unwrap();
        let removed = gc_allocations(&h, |c| {
            if c == ct(1) {
                Holder::Holds(Some(a))
            } else {
                Holder::Gone
            }
        })
        .unwrap();
        assert_eq!(removed.len(), 1);
        assert!(removed[0].ends_with("1"));
        assert_eq!(held(&h, &pool).unwrap(), HashSet::from([0]));
    }
}
