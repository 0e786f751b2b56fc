//! Request bodies of the API: `berth create`'s and `berth set`'s options as JSON, each parsed
//! by the library function the CLI's flag goes through (same syntax, same messages with the
//! flag's name), so a value the CLI refuses is refused here too.

use std::net::IpAddr;

use berth_runtime::billing::{BillingChange, BillingDay, parse_classes, parse_commit, parse_tz};
use berth_runtime::config::ResourceConfig;
use berth_runtime::container::passwd::UserPassword;
use berth_runtime::container::{CreateOpts, SetOpts};
use berth_runtime::net::{AddrSelection, BridgedIface};
use berth_runtime::{Ctid, Size};
use serde::{Deserialize, Serialize};

use crate::shaper::{
    ClassRate, ShapingChange, ShapingConfig, parse_optional_burst, parse_optional_rate,
};

/// `POST /v1/cts`: the fields of `berth create`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub ctid: u32,
    #[serde(default = "default_template")]
    pub template: String,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub copy: bool,
    #[serde(default)]
    pub ipadd: Vec<IpAddr>,
    /// Billing settings as `--billing-day`, `--tz`, `--commit`, `--classes`.
    #[serde(default)]
    pub billing_day: Option<String>,
    #[serde(default)]
    pub tz: Option<String>,
    #[serde(default)]
    pub commit: Option<String>,
    #[serde(default)]
    pub classes: Option<String>,
}

fn default_template() -> String {
    "busybox".into()
}

/// The billing fields of create and set (serde cannot flatten a struct into a body that
/// refuses unknown fields, so each body repeats them).
struct BillingBody<'a> {
    billing_day: Option<&'a str>,
    tz: Option<&'a str>,
    commit: Option<&'a str>,
    classes: Option<&'a str>,
}

/// `PATCH /v1/cts/{ct}`: the settings of `berth set`, applied live to a running CT and
/// saved unless `save` is false.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// SIZE or vzctl's BARRIER:LIMIT (the limit applies), `unlimited` removes it.
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub swap: Option<String>,
    #[serde(default)]
    pub cpuunits: Option<u64>,
    #[serde(default)]
    pub cpulimit: Option<u32>,
    #[serde(default)]
    pub cpus: Option<u32>,
    /// N or BARRIER:LIMIT.
    #[serde(default)]
    pub numproc: Option<String>,
    #[serde(default)]
    pub ioweight: Option<u32>,
    #[serde(default)]
    pub diskspace: Option<String>,
    #[serde(default)]
    pub ipadd: Vec<IpAddr>,
    /// Addresses, or `["all"]`.
    #[serde(default)]
    pub ipdel: Vec<String>,
    #[serde(default)]
    pub netif_add: Vec<String>,
    #[serde(default)]
    pub netif_del: Option<String>,
    #[serde(default)]
    pub nameserver: Vec<IpAddr>,
    #[serde(default)]
    pub searchdomain: Vec<String>,
    #[serde(default)]
    pub rate_in: Option<String>,
    #[serde(default)]
    pub rate_out: Option<String>,
    #[serde(default)]
    pub burst: Option<String>,
    #[serde(default)]
    pub class_rate: Vec<String>,
    #[serde(default)]
    pub pps_in: Option<String>,
    #[serde(default)]
    pub pps_out: Option<String>,
    #[serde(default)]
    pub onboot: Option<bool>,
    /// USER:PASSWORD, written into the CT's /etc/shadow.
    #[serde(default)]
    pub userpasswd: Vec<String>,
    /// Billing settings as `--billing-day`, `--tz`, `--commit`, `--classes`.
    #[serde(default)]
    pub billing_day: Option<String>,
    #[serde(default)]
    pub tz: Option<String>,
    #[serde(default)]
    pub commit: Option<String>,
    #[serde(default)]
    pub classes: Option<String>,
    /// Persist in the CT's config (`--save`); default true.
    #[serde(default)]
    pub save: Option<bool>,
}

/// A body value the library refused: the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

fn bad(e: impl std::fmt::Display) -> BodyError {
    BodyError(e.to_string())
}

impl BillingBody<'_> {
    fn change(&self) -> Result<BillingChange, BodyError> {
        Ok(BillingChange {
            billing_day: self
                .billing_day
                .map(|d| BillingDay::parse("billing_day", d))
                .transpose()
                .map_err(bad)?,
            tz: self
                .tz
                .map(|t| parse_tz("tz", t))
                .transpose()
                .map_err(bad)?,
            commit: self
                .commit
                .map(|c| parse_commit("commit", c))
                .transpose()
                .map_err(bad)?,
            classes: self
                .classes
                .map(|c| parse_classes("classes", c))
                .transpose()
                .map_err(bad)?,
        })
    }
}

macro_rules! billing_of {
    ($t:ty) => {
        impl $t {
            fn billing(&self) -> BillingBody<'_> {
                BillingBody {
                    billing_day: self.billing_day.as_deref(),
                    tz: self.tz.as_deref(),
                    commit: self.commit.as_deref(),
                    classes: self.classes.as_deref(),
                }
            }
        }
    };
}
billing_of!(CreateBody);
billing_of!(PatchBody);

impl CreateBody {
    pub fn ctid(&self) -> Result<Ctid, BodyError> {
        Ctid::new(self.ctid).map_err(|e| BodyError(format!("ctid: {e}")))
    }

    pub fn opts(&self) -> Result<CreateOpts, BodyError> {
        Ok(CreateOpts {
            template: self.template.clone(),
            hostname: self.hostname.clone(),
            name: self.name.clone(),
            privileged: self.privileged,
            copy: self.copy,
            ipadd: self.ipadd.clone(),
            billing: self
                .billing()
                .change()?
                .merge(&Default::default())
                .map_err(bad)?,
            ..Default::default()
        })
    }
}

/// The limit of SIZE or BARRIER:LIMIT (berth's cgroup limits are one number).
fn size_limit(field: &str, v: &Option<String>) -> Result<Option<Size>, BodyError> {
    let Some(s) = v else { return Ok(None) };
    let limit = s.rsplit_once(':').map_or(s.as_str(), |(_, l)| l);
    limit
        .parse::<Size>()
        .map(Some)
        .map_err(|e| BodyError(format!("{field} {s:?}: {e}")))
}

fn count_limit(field: &str, v: &Option<String>) -> Result<Option<u64>, BodyError> {
    let Some(s) = v else { return Ok(None) };
    let limit = s.rsplit_once(':').map_or(s.as_str(), |(_, l)| l);
    limit
        .trim()
        .parse::<u64>()
        .map(Some)
        .map_err(|e| BodyError(format!("{field} {s:?}: {e}")))
}

impl PatchBody {
    pub fn save(&self) -> bool {
        self.save.unwrap_or(true)
    }

    pub fn opts(&self, ctid: Ctid) -> Result<SetOpts, BodyError> {
        let ipdel = if self.ipdel.is_empty() {
            None
        } else if self.ipdel.iter().any(|x| x == "all") {
            Some(AddrSelection::All)
        } else {
            Some(AddrSelection::Some(
                self.ipdel
                    .iter()
                    .map(|x| {
                        x.parse::<IpAddr>().map_err(|_| {
                            BodyError(format!("ipdel {x:?}: not an IP address or `all`"))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ))
        };
        let shaping = ShapingChange {
            rate_in: self
                .rate_in
                .as_deref()
                .map(|r| parse_optional_rate("rate_in", r))
                .transpose()
                .map_err(bad)?,
            rate_out: self
                .rate_out
                .as_deref()
                .map(|r| parse_optional_rate("rate_out", r))
                .transpose()
                .map_err(bad)?,
            burst: self
                .burst
                .as_deref()
                .map(|b| parse_optional_burst("burst", b))
                .transpose()
                .map_err(bad)?,
            class_rates: self
                .class_rate
                .iter()
                .map(|c| ClassRate::parse(c))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            pps_in: self
                .pps_in
                .as_deref()
                .map(|p| ShapingConfig::parse_pps("pps_in", p))
                .transpose()
                .map_err(bad)?,
            pps_out: self
                .pps_out
                .as_deref()
                .map(|p| ShapingConfig::parse_pps("pps_out", p))
                .transpose()
                .map_err(bad)?,
        };
        Ok(SetOpts {
            hostname: self.hostname.clone(),
            name: self.name.clone(),
            resources: ResourceConfig {
                memory: size_limit("memory", &self.memory)?,
                swap: size_limit("swap", &self.swap)?,
                cpuunits: self.cpuunits,
                cpulimit: self.cpulimit,
                cpus: self.cpus,
                numproc: count_limit("numproc", &self.numproc)?,
                ioweight: self.ioweight,
                diskspace: size_limit("diskspace", &self.diskspace)?,
            },
            ipadd: self.ipadd.clone(),
            ipdel,
            netif_add: self
                .netif_add
                .iter()
                .map(|s| BridgedIface::parse_vzctl(s))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            netif_del: self
                .netif_del
                .as_ref()
                .map(|n| if n == "all" { None } else { Some(n.clone()) }),
            nameservers: self.nameserver.clone(),
            searchdomains: self.searchdomain.clone(),
            shaping,
            billing: self.billing().change()?,
            quota: Default::default(),
            onboot: self.onboot,
            passwords: self
                .userpasswd
                .iter()
                .map(|u| {
                    UserPassword::parse(u)
                        .map_err(|m| BodyError(format!("userpasswd: {m} (CT {ctid})")))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether the body changes nothing (an empty PATCH is refused: it is a client's mistake).
    pub fn is_empty(&self) -> bool {
        let mut probe = self.clone();
        probe.save = None;
        probe == PatchBody::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<CreateBody>(r#"{"ctid": 101, "tempalte": "x"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tempalte"), "{e}");
        let e = serde_json::from_str::<PatchBody>(r#"{"cpulimt": 5}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cpulimt"), "{e}");
    }

    #[test]
    fn values_go_through_the_cli_parsers() {
        let p: PatchBody = serde_json::from_str(
            r#"{"memory": "256M:300M", "numproc": "64", "rate_in": "10mbit"}"#,
        )
        .unwrap();
        let o = p.opts(Ctid::new(101).unwrap()).unwrap();
        assert_eq!(o.resources.memory, Some("300M".parse().unwrap()));
        assert_eq!(o.resources.numproc, Some(64));
        assert!(o.shaping.rate_in.is_some());
        let p: PatchBody = serde_json::from_str(r#"{"rate_in": "fast"}"#).unwrap();
        let e = p.opts(Ctid::new(101).unwrap()).unwrap_err().to_string();
        assert!(e.contains("rate_in"), "{e}");
        assert!(PatchBody::default().is_empty());
        assert!(
            serde_json::from_str::<PatchBody>(r#"{"save": false}"#)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn create_defaults_like_the_cli() {
        let c: CreateBody = serde_json::from_str(r#"{"ctid": 101}"#).unwrap();
        assert_eq!(c.template, "busybox");
        assert!(c.opts().is_ok());
        let c: CreateBody = serde_json::from_str(r#"{"ctid": 0}"#).unwrap();
        assert!(c.ctid().is_err());
    }
}
