//! Which queueing backend shapes traffic: HTB (eBPF classifies, HTB queues) or EDT (eBPF
//! stamps departure times, sch_fq paces). EDT is chosen wherever it can run — it needs sch_fq
//! in the kernel and the EDT program accepted by the verifier — because it costs no qdisc
//! lock per CT and paces instead of queueing in a shared class tree. `BERTH_SHAPER=htb|edt`
//! forces one (an unavailable forced choice is an error, never a silent fallback).

use std::{fs, io::Read, path::Path};

use serde::Serialize;

/// The queueing backend behind the shaper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// eBPF classification into HTB classes (host egress + per-CT IFB).
    Htb,
    /// Earliest departure time stamps set by eBPF, paced by sch_fq (host egress + per-CT IFB).
    Edt,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Htb => "htb",
            Self::Edt => "edt",
        }
    }
}

/// Whether the running kernel has sch_fq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FqSupport {
    /// Built in, or a module installed for the running kernel.
    Present,
    /// The kernel config says it is not built.
    Absent,
    /// No kernel config to tell (neither /proc/config.gz nor /boot/config-<release>) and no
    /// module installed.
    Unknown,
}

/// Reads the kernel config (and the module index for `=m`).
pub fn fq_support() -> FqSupport {
    match kernel_config() {
        Some(cfg) => fq_from_config(&cfg, || module_installed("sch_fq")),
        None if module_installed("sch_fq") => FqSupport::Present,
        None => FqSupport::Unknown,
    }
}

/// The running kernel's config text (`/proc/config.gz`, else `/boot/config-<release>`).
fn kernel_config() -> Option<String> {
    if let Ok(f) = fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(text);
        }
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
}

/// Whether a module for `name` (e.g. `sch_fq`) is installed for the running kernel.
fn module_installed(name: &str) -> bool {
    let Ok(release) = fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let dir = Path::new("/lib/modules").join(release.trim());
    let needle = format!("/{name}.ko");
    ["modules.dep", "modules.builtin"].iter().any(|f| {
        fs::read_to_string(dir.join(f))
            .map(|t| t.lines().any(|l| l.contains(&needle)))
            .unwrap_or(false)
    })
}

fn fq_from_config(cfg: &str, module_installed: impl FnOnce() -> bool) -> FqSupport {
    if cfg.lines().any(|l| l == "CONFIG_NET_SCH_FQ=y") {
        FqSupport::Present
    } else if cfg.lines().any(|l| l == "CONFIG_NET_SCH_FQ=m") {
        if module_installed() {
            FqSupport::Present
        } else {
            FqSupport::Absent
        }
    } else {
        FqSupport::Absent
    }
}

/// Which backend is in use and why (`berth shaper status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendStatus {
    pub backend: Backend,
    /// Whether EDT could run here: `available`, or `unavailable: <why>`.
    pub edt: String,
    pub reason: String,
}

/// A backend forced by the operator (`BERTH_SHAPER`), or `None` for the automatic choice.
pub fn requested_from_env() -> Result<Option<Backend>, String> {
    match std::env::var("BERTH_SHAPER") {
        Err(_) => Ok(None),
        Ok(v) => match v.as_str() {
            "" | "auto" => Ok(None),
            "htb" => Ok(Some(Backend::Htb)),
            "edt" | "fq" => Ok(Some(Backend::Edt)),
            other => Err(format!("BERTH_SHAPER={other:?}: expected htb, edt or auto")),
        },
    }
}

/// The decision. `edt_program` is `Err(why)` when the EDT program could not be loaded (an
/// old kernel's verifier); `None` when that is not known (no shaper opened yet).
pub fn decide(
    fq: FqSupport,
    edt_program: Option<Result<(), String>>,
    requested: Option<Backend>,
) -> Result<BackendStatus, String> {
    let edt_unavailable = match (fq, &edt_program) {
        (FqSupport::Absent, _) => Some("no sch_fq".to_owned()),
        (FqSupport::Unknown, _) => Some(
            "cannot tell whether the kernel has sch_fq (no kernel config, no sch_fq module)"
                .to_owned(),
        ),
        (FqSupport::Present, Some(Err(why))) => {
            Some(format!("the EDT program was rejected: {why}"))
        }
        (FqSupport::Present, _) => None,
    };
    let edt = match &edt_unavailable {
        None => "available".to_owned(),
        Some(why) => format!("unavailable: {why}"),
    };
    match (requested, edt_unavailable) {
        (Some(Backend::Edt), Some(why)) => Err(format!(
            "BERTH_SHAPER=edt: the EDT backend is unavailable here: {why}"
        )),
        (Some(Backend::Edt), None) => Ok(BackendStatus {
            backend: Backend::Edt,
            edt,
            reason: "EDT forced (BERTH_SHAPER=edt); sch_fq present".to_owned(),
        }),
        (Some(Backend::Htb), _) => Ok(BackendStatus {
            backend: Backend::Htb,
            edt,
            reason: "HTB forced (BERTH_SHAPER=htb)".to_owned(),
        }),
        (None, None) => Ok(BackendStatus {
            backend: Backend::Edt,
            edt,
            reason: "sch_fq present: eBPF stamps departure times, sch_fq paces (no qdisc \
                     lock shared by a CT's classes)"
                .to_owned(),
        }),
        (None, Some(why)) => Ok(BackendStatus {
            backend: Backend::Htb,
            edt,
            reason: format!(
                "EDT unavailable ({why}); eBPF classifies into HTB, which reaches the \
                 configured rates"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_decide_fq() {
        assert_eq!(
            fq_from_config("CONFIG_NET_SCH_FQ=y\n", || false),
            FqSupport::Present
        );
        assert_eq!(
            fq_from_config("CONFIG_NET_SCH_FQ=m\n", || true),
            FqSupport::Present
        );
        assert_eq!(
            fq_from_config("CONFIG_NET_SCH_FQ=m\n", || false),
            FqSupport::Absent
        );
        assert_eq!(
            fq_from_config(
                "# CONFIG_NET_SCH_FQ is not set\nCONFIG_NET_SCH_FQ_CODEL=y\n",
                || { true }
            ),
            FqSupport::Absent
        );
    }

    #[test]
    fn edt_is_automatic_where_fq_exists() {
        let s = decide(FqSupport::Present, Some(Ok(())), None).unwrap();
        assert_eq!(s.backend, Backend::Edt);
        assert_eq!(s.edt, "available");
        let s = decide(FqSupport::Present, None, None).unwrap();
        assert_eq!(s.backend, Backend::Edt);
    }

    #[test]
    fn htb_without_fq_says_why() {
        let s = decide(FqSupport::Absent, Some(Ok(())), None).unwrap();
        assert_eq!(s.backend, Backend::Htb);
        assert_eq!(s.edt, "unavailable: no sch_fq");
        assert!(s.reason.contains("no sch_fq"), "{}", s.reason);
        let s = decide(FqSupport::Unknown, None, None).unwrap();
        assert_eq!(s.backend, Backend::Htb);
        assert!(s.edt.starts_with("unavailable: cannot tell"), "{}", s.edt);
    }

    #[test]
    fn a_rejected_program_means_htb() {
        let s = decide(FqSupport::Present, Some(Err("invalid access".into())), None).unwrap();
        assert_eq!(s.backend, Backend::Htb);
        assert!(s.edt.contains("invalid access"));
    }

    #[test]
    fn forced_choices() {
        let s = decide(FqSupport::Present, Some(Ok(())), Some(Backend::Htb)).unwrap();
        assert_eq!(s.backend, Backend::Htb);
        assert_eq!(s.edt, "available");
        let e = decide(FqSupport::Absent, Some(Ok(())), Some(Backend::Edt)).unwrap_err();
        assert!(e.contains("no sch_fq"), "{e}");
        let s = decide(FqSupport::Present, Some(Ok(())), Some(Backend::Edt)).unwrap();
        assert_eq!(s.backend, Backend::Edt);
    }
}
