//! Where berth keeps its state on the host, and the per-CT configuration file.
//!
//! Under the root (default `/var/lib/berth`, `--root` / `BERTH_ROOT`):
//! - `conf/<CTID>.toml`  — one human-editable config per CT (keys documented on [`CtConfig`])
//! - `private/<CTID>/`   — the CT's files (its root filesystem)
//! - `root/<CTID>/`      — mount point: `private` is bind-mounted here while the CT is mounted/running
//! - `template/<name>/`  — OS templates
//! - `retired/<UUID>.json` — what a destroyed CT had counted (traffic and drops), written by
//!   `destroy` before the live counters are cleared (see [`Host::retired_counters_path`])
//!
//! Run state lives in the run dir (default `/run/berth` for the default root, `<root>/run` otherwise,
//! `BERTH_RUN_DIR` overrides): `<CTID>.lock`, `<CTID>.state.json`, `<CTID>.console.log`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::billing::BillingConfig;
use crate::ctid::{Ctid, validate_name};
use crate::shaping::{DEFAULT_MTU, ShapingConfig};
use crate::size::Size;
use crate::transfer_quota::QuotaConfig;

pub const DEFAULT_ROOT: &str = "/var/lib/berth";
pub const DEFAULT_RUN: &str = "/run/berth";
pub const DEFAULT_CGROUP_PARENT: &str = "berth";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parse CT config {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("CT config {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("CT {0} does not exist")]
    NotFound(String),
    #[error("CT {0} already exists")]
    Exists(Ctid),
    #[error("name {name:?} is already used by CT {ctid}")]
    NameTaken { name: String, ctid: Ctid },
    #[error("invalid cgroup parent {0:?}: use [a-zA-Z0-9._-], no slashes")]
    BadCgroupParent(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ConfigError + 'a {
    move |source| ConfigError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Where one berth installation keeps its state. Tests use temporary roots and unique cgroup parents.
#[derive(Debug, Clone)]
pub struct Host {
    pub root: PathBuf,
    pub run: PathBuf,
    /// cgroup directory under each hierarchy that holds this installation's CTs.
    pub cgroup_parent: String,
    /// Where the host's users and groups are listed (`passwd`, `group`, `subuid`, `subgid`),
    /// which the id pool must stay clear of.
    pub etc: PathBuf,
}

impl Host {
    pub fn new(
        root: Option<PathBuf>,
        run: Option<PathBuf>,
        cgroup_parent: Option<String>,
    ) -> Result<Self, ConfigError> {
        let root = root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
        let run = run.unwrap_or_else(|| {
            if root == Path::new(DEFAULT_ROOT) {
                PathBuf::from(DEFAULT_RUN)
            } else {
                root.join("run")
            }
        });
        let cgroup_parent = cgroup_parent.unwrap_or_else(|| DEFAULT_CGROUP_PARENT.to_string());
        if cgroup_parent.is_empty()
            || !cgroup_parent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            || cgroup_parent.starts_with('.')
        {
            return Err(ConfigError::BadCgroupParent(cgroup_parent));
        }
        Ok(Self {
            root,
            run,
            cgroup_parent,
            etc: PathBuf::from("/etc"),
        })
    }

    /// Creates the directory skeleton (idempotent).
    pub fn ensure_dirs(&self) -> Result<(), ConfigError> {
        for d in [
            self.conf_dir(),
            self.root.join("private"),
            self.root.join("root"),
            self.template_dir(),
            self.run.clone(),
        ] {
            fs::create_dir_all(&d).map_err(io_err("create directory", &d))?;
        }
        Ok(())
    }

    /// Host-wide settings (`[userns]` id pool).
    pub fn host_conf_path(&self) -> PathBuf {
        self.root.join("host.toml")
    }
    pub fn conf_dir(&self) -> PathBuf {
        self.root.join("conf")
    }
    pub fn conf_path(&self, ctid: Ctid) -> PathBuf {
        self.conf_dir().join(format!("{ctid}.toml"))
    }
    /// `<conf>/<CTID>.creating`: a create in progress (or killed), which gc rolls back.
    pub fn creating_path(&self, ctid: Ctid) -> PathBuf {
        self.conf_dir().join(format!("{ctid}.creating"))
    }
    pub fn private_dir(&self, ctid: Ctid) -> PathBuf {
        self.root.join("private").join(ctid.to_string())
    }
    pub fn root_dir(&self, ctid: Ctid) -> PathBuf {
        self.root.join("root").join(ctid.to_string())
    }
    pub fn template_dir(&self) -> PathBuf {
        self.root.join("template")
    }
    pub fn lock_path(&self, ctid: Ctid) -> PathBuf {
        self.run.join(format!("{ctid}.lock"))
    }
    pub fn state_path(&self, ctid: Ctid) -> PathBuf {
        self.run.join(format!("{ctid}.state.json"))
    }
    pub fn console_log_path(&self, ctid: Ctid) -> PathBuf {
        self.run.join(format!("{ctid}.console.log"))
    }
    /// The final counters of the destroyed CT `uuid` (kept after its CTID is reused; the
    /// billing ledger books them).
    pub fn retired_counters_path(&self, uuid: Uuid) -> PathBuf {
        self.root.join("retired").join(format!("{uuid}.json"))
    }

    /// All CTIDs with a config file, sorted.
    pub fn list_ctids(&self) -> Result<Vec<Ctid>, ConfigError> {
        let dir = self.conf_dir();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read directory", &dir)(e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(io_err("read directory", &dir))?;
            let name = ent.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".toml")) else {
                continue;
            };
            if let Ok(c) = stem.parse::<Ctid>() {
                out.push(c);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Resolves a user-given CT reference: a CTID, or a name set with `--name`.
    pub fn resolve(&self, what: &str) -> Result<Ctid, ConfigError> {
        if what.bytes().all(|b| b.is_ascii_digit()) {
            return what
                .parse::<Ctid>()
                .map_err(|e| ConfigError::NotFound(format!("{what} ({e})")));
        }
        for c in self.list_ctids()? {
            if let Ok(cfg) = CtConfig::load(self, c)
                && cfg.name.as_deref() == Some(what)
            {
                return Ok(c);
            }
        }
        Err(ConfigError::NotFound(format!("named {what:?}")))
    }
}

/// User namespace mapping for a CT: CT uid/gid 0..size map to host base..base+size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserNs {
    pub uid_base: u32,
    pub gid_base: u32,
    pub size: u32,
}

/// Resource settings (see `berth set`). Absent = unlimited / kernel default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// Memory limit (`--memory`), e.g. "512M".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    /// Swap on top of memory (`--swap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<Size>,
    /// CPU weight, OpenVZ units (`--cpuunits`, default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuunits: Option<u64>,
    /// CPU limit in percent of one CPU (`--cpulimit`, 0 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpulimit: Option<u32>,
    /// Number of CPUs the CT may use (`--cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Maximum number of processes/threads (`--numproc`, 0 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numproc: Option<u64>,
    /// Block I/O weight 10..1000 (`--ioweight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ioweight: Option<u32>,
    /// Disk quota on the private area (`--diskspace`), needs project quotas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diskspace: Option<Size>,
}

/// How a CT's files are laid out in its private area.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivateLayout {
    /// `private/<CTID>` is a full copy of the template (vzctl's layout; needed with a user
    /// namespace, whose ids are shifted on disk).
    #[default]
    Copy,
    /// `private/<CTID>/upper` holds only the CT's changes over the template's rootfs, mounted with
    /// overlayfs: create copies nothing, and the template cannot be removed while CTs use it.
    Overlay,
}

/// `conf/<CTID>.toml`. Every key is documented in the README ("CT config").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtConfig {
    pub ctid: Ctid,
    /// The CT's identity (random, v4), set at create and never changed: a CTID can be reused
    /// after a destroy, the UUID cannot. `None` only in configs written before berth had it;
    /// the first `start` or `set` (under the CT's lock) assigns and saves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Template the private area was created from.
    pub template: String,
    /// `copy` or `overlay` (see [`PrivateLayout`]).
    #[serde(default)]
    pub layout: PrivateLayout,
    /// Program started as the CT's PID 1.
    #[serde(default = "default_init")]
    pub init: String,
    /// Signal that makes the CT's init power off (`SIGUSR2` for busybox, `SIGPWR` sysvinit,
    /// `SIGRTMIN+4` systemd).
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// Seconds `stop` waits for init to halt before killing everything in the CT's cgroup.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userns: Option<UserNs>,
    #[serde(default)]
    pub resources: ResourceConfig,
    /// Networking: `[[net.ifaces]]` (mode = "routed" | "bridged"), nameservers, searchdomains,
    /// neighbour_devs, arp_probe, gratuitous_arp (see the README).
    #[serde(default)]
    pub net: crate::net::NetConfig,
    /// Traffic shaping (`rate_in`, `rate_out`, `burst`, `[[shaping.class]]`, `pps_in`,
    /// `pps_out`), applied by the lifecycle hooks at start and by `set`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<ShapingConfig>,
    /// Billing settings (`billing_day`, `tz`, `commit`, `classes`), read by berthd's ledger
    /// (see [`crate::billing`]).
    #[serde(default, skip_serializing_if = "BillingConfig::is_empty")]
    pub billing: BillingConfig,
    /// Transfer quota (`transfer`, `count`, `classes`, `soft_action`, `throttle_rate_in/out`,
    /// `hard`, `hard_action`, `notify`, `webhook`), run by berthd at every ledger tick (see
    /// [`crate::transfer_quota`]).
    #[serde(default, skip_serializing_if = "QuotaConfig::is_empty")]
    pub quota: QuotaConfig,
    /// Started by `berth start --all-onboot` (the boot unit) when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub onboot: bool,
    /// Boot order among `onboot` CTs: higher starts first, unset last (OpenVZ's BOOTORDER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootorder: Option<u32>,
    /// Where an imported CT came from (`berth import vz`); absent for CTs made here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<ImportOrigin>,
}

/// The note `berth import` leaves in the config of a CT it made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportOrigin {
    /// The system it came from (`openvz`).
    pub from: String,
    /// Its CTID there.
    pub source_ctid: u32,
    /// The config file it was read from (for an archive: the archive and the path inside).
    pub config: String,
    /// The private area or archive its files were copied from.
    pub private: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ostemplate: Option<String>,
    /// Unix seconds.
    pub at: u64,
}

fn default_init() -> String {
    "/sbin/init".into()
}
fn default_stop_signal() -> String {
    "SIGTERM".into()
}
fn default_stop_timeout() -> u32 {
    30
}

impl CtConfig {
    pub fn new(ctid: Ctid, template: String) -> Self {
        Self {
            ctid,
            uuid: None,
            name: None,
            hostname: None,
            template,
            layout: PrivateLayout::default(),
            init: default_init(),
            stop_signal: default_stop_signal(),
            stop_timeout: default_stop_timeout(),
            userns: None,
            resources: ResourceConfig::default(),
            net: crate::net::NetConfig::default(),
            shaping: None,
            billing: BillingConfig::default(),
            quota: QuotaConfig::default(),
            onboot: false,
            bootorder: None,
            imported: None,
        }
    }

    pub fn load(host: &Host, ctid: Ctid) -> Result<Self, ConfigError> {
        let path = host.conf_path(ctid);
        let text = fs::read_to_string(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ConfigError::NotFound(ctid.to_string())
            } else {
                io_err("read", &path)(e)
            }
        })?;
        let cfg: CtConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            source: e,
        })?;
        if cfg.ctid != ctid {
            return Err(ConfigError::Invalid {
                path,
                msg: format!("ctid = {} but the file is named for CT {ctid}", cfg.ctid),
            });
        }
        cfg.validate(&path)?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |msg: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        if let Some(n) = &self.name {
            validate_name(n).map_err(|e| bad(e.to_string()))?;
        }
        if let Some(h) = &self.hostname {
            validate_hostname(h).map_err(bad)?;
        }
        if !self.init.starts_with('/') {
            return Err(bad(format!(
                "init {:?} must be an absolute path",
                self.init
            )));
        }
        crate::signal::parse_signal(&self.stop_signal).map_err(|e| bad(e.to_string()))?;
        self.net
            .validate(self.ctid)
            .map_err(|e| bad(e.to_string()))?;
        if let Some(u) = self.userns
            && (u.size == 0
                || u.uid_base.checked_add(u.size).is_none()
                || u.gid_base.checked_add(u.size).is_none())
        {
            return Err(bad(format!("userns range {u:?} is empty or overflows")));
        }
        if let Some(sh) = &self.shaping {
            sh.validate(DEFAULT_MTU)
                .map_err(|e| bad(format!("shaping.{} = {:?}: {}", e.key(), e.value, e.reason)))?;
        }
        self.billing.validate().map_err(|e| bad(e.to_string()))?;
        self.quota.validate().map_err(|e| bad(e.to_string()))?;
        Ok(())
    }

    /// The (uid, gid) its files are shifted by on disk: its user namespace's bases.
    pub fn id_shift(&self) -> Option<(u32, u32)> {
        self.userns.map(|u| (u.uid_base, u.gid_base))
    }

    /// The shaping the CT gets at start: its `[shaping]`, unless that shapes nothing.
    pub fn active_shaping(&self) -> Option<&ShapingConfig> {
        self.shaping.as_ref().filter(|s| !s.is_empty())
    }

    /// Writes the config atomically (temp file + rename), so a crash never leaves half a file.
    pub fn save(&self, host: &Host) -> Result<(), ConfigError> {
        self.save_with(host, || {})
    }

    /// `save`, calling `between` after the temporary file is written and before it is renamed
    /// into place (where the crash-point tests kill it: gc removes the `.toml.tmp`).
    pub fn save_with(&self, host: &Host, between: impl FnOnce()) -> Result<(), ConfigError> {
        let path = host.conf_path(self.ctid);
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let tmp = path.with_extension("toml.tmp");
        fs::write(&tmp, text).map_err(io_err("write", &tmp))?;
        between();
        fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        Ok(())
    }
}

/// RFC 1123 host name (labels of a-z0-9-, dots between, 253 max).
pub fn validate_hostname(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid hostname {h:?}: use labels of a-z, 0-9 and '-', separated by dots"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain::{ErrorChain, assert_causes_not_repeated};

    #[test]
    fn roundtrip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(Some(dir.path().to_path_buf()), None, None).unwrap();
        host.ensure_dirs().unwrap();
        assert_eq!(host.run, dir.path().join("run"));
        let ctid = Ctid::new(101).unwrap();
        let mut cfg = CtConfig::new(ctid, "busybox".into());
        cfg.name = Some("web".into());
        cfg.resources.memory = Some("256M".parse().unwrap());
        cfg.save(&host).unwrap();
        let back = CtConfig::load(&host, ctid).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(host.resolve("web").unwrap(), ctid);
        assert_eq!(host.resolve("101").unwrap(), ctid);
        assert!(host.resolve("nope").is_err());

        let path = host.conf_path(ctid);
        fs::write(&path, "ctid = 101\ntemplate = \"b\"\nbogus = 1\n").unwrap();
        let e = CtConfig::load(&host, ctid).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        assert_causes_not_repeated(&e);
        let text = ErrorChain(&e).to_string();
        assert!(
            text.starts_with(&format!("parse CT config {}: ", path.display()))
                && text.contains("bogus"),
            "{text}"
        );
        fs::write(&path, "ctid = 102\ntemplate = \"b\"\n").unwrap();
        assert!(CtConfig::load(&host, ctid).is_err());
        fs::write(&path, "ctid = 101\ntemplate = \"b\"\nhostname = \"-x\"\n").unwrap();
        assert!(CtConfig::load(&host, ctid).is_err());
    }

    /// A config with `[shaping]` as the code before the typed shaping wrote it (a TOML table,
    /// keys sorted) loads, and saving it again writes the same bytes.
    #[test]
    fn shaping_saved_by_the_old_code_loads_and_saves_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(Some(dir.path().to_path_buf()), None, None).unwrap();
        host.ensure_dirs().unwrap();
        let ctid = Ctid::new(101).unwrap();
        let old = r#"ctid = 101
template = "busybox"
layout = "copy"
init = "/sbin/init"
stop_signal = "SIGTERM"
stop_timeout = 30

[resources]
memory = "512M"

[net]
ifaces = []
nameservers = []
searchdomains = []
neighbour_devs = "detect"
arp_probe = false
gratuitous_arp = false

[shaping]
burst = "64kb"
pps_in = 1000
pps_out = 2000
rate_in = "10mbit"
rate_out = "1500kbit"

[[shaping.class]]
class = 1
rate_in = "1gbit"

[[shaping.class]]
class = 3
rate_out = "20mbit"
"#;
        fs::write(host.conf_path(ctid), old).unwrap();
        let cfg = CtConfig::load(&host, ctid).unwrap();
        let sh = cfg.active_shaping().expect("shaped");
        assert_eq!(sh.rate_in.unwrap().bits_per_sec(), 10_000_000);
        assert_eq!(sh.burst, Some(Size::Bytes(64 << 10)));
        assert_eq!(sh.pps_out, Some(2000));
        assert_eq!(sh.classes[0].rate_in.unwrap().to_string(), "1gbit");
        cfg.save(&host).unwrap();
        assert_eq!(fs::read_to_string(host.conf_path(ctid)).unwrap(), old);
    }

    #[test]
    fn bad_shaping_is_refused_on_load_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(Some(dir.path().to_path_buf()), None, None).unwrap();
        host.ensure_dirs().unwrap();
        let ctid = Ctid::new(101).unwrap();
        let path = host.conf_path(ctid);
        let head = "ctid = 101\ntemplate = \"b\"\n[shaping]\n";
        fs::write(&path, format!("{head}rate_in = \"10mbit\"\nburst = 100\n")).unwrap();
        let e = ErrorChain(&CtConfig::load(&host, ctid).unwrap_err()).to_string();
        assert!(
            e.contains("shaping.burst = \"100b\": burst must hold"),
            "{e}"
        );
        fs::write(&path, format!("{head}rate_in = \"0\"\n")).unwrap();
        let e = ErrorChain(&CtConfig::load(&host, ctid).unwrap_err()).to_string();
        assert!(
            e.contains("rate_in") && e.contains("greater than zero"),
            "{e}"
        );
        fs::write(&path, format!("{head}rate_inn = \"1mbit\"\n")).unwrap();
        let e = ErrorChain(&CtConfig::load(&host, ctid).unwrap_err()).to_string();
        assert!(e.contains("rate_inn"), "{e}");
        // Only a burst shapes nothing: loaded as written, but not handed to the shaper.
        fs::write(&path, format!("{head}burst = \"64kb\"\n")).unwrap();
        let cfg = CtConfig::load(&host, ctid).unwrap();
        assert!(cfg.shaping.is_some() && cfg.active_shaping().is_none());
    }

    #[test]
    fn billing_settings_round_trip_and_bad_ones_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(Some(dir.path().to_path_buf()), None, None).unwrap();
        host.ensure_dirs().unwrap();
        let ctid = Ctid::new(101).unwrap();
        let path = host.conf_path(ctid);
        let head = "ctid = 101\ntemplate = \"b\"\n\n[billing]\n";
        let good = format!(
            "{head}billing_day = 31\ntz = \"Europe/Berlin\"\ncommit = \"100mbit\"\nclasses = [0, 2]\n"
        );
        fs::write(&path, &good).unwrap();
        let cfg = CtConfig::load(&host, ctid).unwrap();
        assert_eq!(cfg.billing.day(), crate::billing::BillingDay::Day(31));
        assert_eq!(cfg.billing.tz(), "Europe/Berlin");
        cfg.save(&host).unwrap();
        let back = fs::read_to_string(&path).unwrap();
        assert!(
            back.contains(
                "[billing]\nbilling_day = 31\ntz = \"Europe/Berlin\"\ncommit = \"100mbit\"\n"
            ),
            "{back}"
        );
        assert_eq!(CtConfig::load(&host, ctid).unwrap(), cfg);
        // No [billing] at all: the defaults, and none is written.
        let plain = CtConfig::new(ctid, "b".into());
        plain.save(&host).unwrap();
        assert!(!fs::read_to_string(&path).unwrap().contains("billing"));
        for (bad, want) in [
            ("billing_day = 0\n", "billing day 0 is out of range"),
            ("billing_day = 32\n", "billing day 32 is out of range"),
            (
                "tz = \"Mars/Olympus\"\n",
                "billing.tz \"Mars/Olympus\": unknown time zone",
            ),
            ("commit = \"fast\"\n", "fast"),
            ("classes = [16]\n", "class 16 does not exist"),
        ] {
            fs::write(&path, format!("{head}{bad}")).unwrap();
            let e = ErrorChain(&CtConfig::load(&host, ctid).unwrap_err()).to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn uuid_round_trips_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(Some(dir.path().to_path_buf()), None, None).unwrap();
        host.ensure_dirs().unwrap();
        let ctid = Ctid::new(101).unwrap();
        let mut cfg = CtConfig::new(ctid, "busybox".into());
        let id = Uuid::new_v4();
        cfg.uuid = Some(id);
        cfg.save(&host).unwrap();
        let text = fs::read_to_string(host.conf_path(ctid)).unwrap();
        assert!(
            text.lines()
                .any(|l| l == format!("uuid = \"{}\"", id.hyphenated())),
            "{text}"
        );
        let back = CtConfig::load(&host, ctid).unwrap();
        assert_eq!(back.uuid, Some(id));
        assert_eq!(back, cfg);

        // A config from before the UUID: loads without one and saves without one.
        fs::write(host.conf_path(ctid), "ctid = 101\ntemplate = \"b\"\n").unwrap();
        let old = CtConfig::load(&host, ctid).unwrap();
        assert_eq!(old.uuid, None);
        old.save(&host).unwrap();
        assert!(
            !fs::read_to_string(host.conf_path(ctid))
                .unwrap()
                .contains("uuid")
        );

        fs::write(
            host.conf_path(ctid),
            "ctid = 101\nuuid = \"not-a-uuid\"\ntemplate = \"b\"\n",
        )
        .unwrap();
        let e = ErrorChain(&CtConfig::load(&host, ctid).unwrap_err()).to_string();
        assert!(e.contains("uuid") || e.contains("UUID"), "{e}");
    }

    #[test]
    fn io_error_prints_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the conf directory belongs: listing it fails with ENOTDIR.
        let host = Host::new(Some(dir.path().to_path_buf()), None, None).unwrap();
        fs::write(host.conf_dir(), "").unwrap();
        let e = host.list_ctids().unwrap_err();
        assert_causes_not_repeated(&e);
        assert_eq!(
            ErrorChain(&e).to_string(),
            format!(
                "read directory {}: Not a directory (os error 20)",
                host.conf_dir().display()
            )
        );
    }

    #[test]
    fn hostnames() {
        assert!(validate_hostname("web1.example.com").is_ok());
        assert!(validate_hostname("a_b").is_err());
        assert!(validate_hostname("").is_err());
        assert!(validate_hostname("a..b").is_err());
    }

    #[test]
    fn cgroup_parent_validated() {
        assert!(Host::new(None, None, Some("../x".into())).is_err());
        assert!(Host::new(None, None, Some("a/b".into())).is_err());
        assert_eq!(
            Host::new(None, None, None).unwrap().run,
            PathBuf::from(DEFAULT_RUN)
        );
    }
}
