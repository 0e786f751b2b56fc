//! berth's exit codes and the JSON shape of an error: one table for the CLI, the vzctl/vzlist
//! entry points and the panel API. Where vzctl had an equivalent failure its number is used
//! (include/vzerror.h of vzctl 4), so a panel module written against vzctl reads berth's codes
//! unchanged; failures vzctl never had get numbers from 200 up, clear of vzctl's.

use std::error::Error as StdError;

use berth_runtime::config::ConfigError;
use berth_runtime::container::CtError;
use berth_runtime::ctid::CtidError;
use berth_runtime::lock::LockError;
use berth_runtime::net::NetError;
use berth_runtime::template::TemplateError;
use serde::Serialize;

use crate::inventory::InventoryError;

/// Version of every JSON document berth prints (`schema_version`); bumped when a key changes
/// meaning or disappears (added keys do not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// What went wrong, as a panel tells failures apart. [`ErrorCode::exit`] is the process's exit
/// code, [`ErrorCode::as_str`] the `code` of the JSON error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Anything without a code of its own.
    Failed,
    /// A system call or file operation failed.
    System,
    /// Another berth command holds the CT's lock.
    Locked,
    /// No CT of that CTID or name.
    NotFound,
    /// The command line does not parse (unknown flag, missing argument).
    InvalidSyntax,
    /// A value is out of range or malformed (CTID, field name, address, setting).
    InvalidValue,
    NotRunning,
    /// The CT runs and the command needs it stopped.
    Running,
    AlreadyRunning,
    /// The CT (its CTID) already exists.
    Exists,
    /// An address is already assigned, to another CT or on the host.
    AddressInUse,
    /// The template is not installed.
    NoTemplate,
    /// The name is used by another CT.
    NameTaken,
    /// The CT is frozen and the command needs it running.
    Suspended,
    /// The CT is stopped and the change needs --save.
    NeedSave,
    /// The template is in use by CTs (overlay) and cannot be removed.
    TemplateInUse,
    /// A template of that name is already installed.
    TemplateExists,
    /// The CT's start failed (its init died, a setup step failed).
    StartFailed,
}

/// Every code with its exit status and meaning: the table the README documents.
pub const TABLE: &[(ErrorCode, u8, &str)] = &[
    (ErrorCode::Failed, 1, "any other failure"),
    (
        ErrorCode::System,
        3,
        "a system call or file operation failed (vzctl: VZ_SYSTEM_ERROR)",
    ),
    (
        ErrorCode::Locked,
        9,
        "another berth command holds the CT's lock (vzctl: VZ_LOCKED)",
    ),
    (
        ErrorCode::NotFound,
        14,
        "no such CT (vzctl: VZ_NOVE_CONFIG)",
    ),
    (
        ErrorCode::InvalidSyntax,
        20,
        "the command line does not parse (vzctl: VZ_INVALID_PARAMETER_SYNTAX)",
    ),
    (
        ErrorCode::InvalidValue,
        21,
        "a malformed or out-of-range value (vzctl: VZ_INVALID_PARAMETER_VALUE)",
    ),
    (
        ErrorCode::NotRunning,
        31,
        "the CT is not running (vzctl: VZ_VE_NOT_RUNNING)",
    ),
    (
        ErrorCode::Running,
        32,
        "the CT is running: stop it first (vzctl: VZ_VE_RUNNING)",
    ),
    (
        ErrorCode::AlreadyRunning,
        32,
        "the CT is already running (vzctl: VZ_VE_RUNNING)",
    ),
    (
        ErrorCode::Exists,
        44,
        "the CT already exists (vzctl: VZ_FS_PRVT_AREA_EXIST)",
    ),
    (
        ErrorCode::AddressInUse,
        78,
        "an address is already in use (vzctl: VZ_IP_INUSE)",
    ),
    (
        ErrorCode::NoTemplate,
        91,
        "the OS template is not installed (vzctl: VZ_PKGSET_NOT_FOUND)",
    ),
    (
        ErrorCode::NameTaken,
        137,
        "the name is used by another CT (vzctl: VZ_SET_NAME_ERROR)",
    ),
    (
        ErrorCode::Suspended,
        200,
        "the CT is suspended: resume it first",
    ),
    (
        ErrorCode::NeedSave,
        201,
        "the CT is stopped: the change needs --save",
    ),
    (
        ErrorCode::TemplateInUse,
        202,
        "the template is in use by CTs",
    ),
    (
        ErrorCode::TemplateExists,
        203,
        "a template of that name already exists",
    ),
    (ErrorCode::StartFailed, 204, "the CT failed to start"),
];

impl ErrorCode {
    pub fn exit(self) -> u8 {
        TABLE
            .iter()
            .find(|(c, ..)| *c == self)
            .map_or(1, |(_, n, _)| *n)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::System => "system",
            Self::Locked => "locked",
            Self::NotFound => "not_found",
            Self::InvalidSyntax => "invalid_syntax",
            Self::InvalidValue => "invalid_value",
            Self::NotRunning => "not_running",
            Self::Running => "running",
            Self::AlreadyRunning => "already_running",
            Self::Exists => "exists",
            Self::AddressInUse => "address_in_use",
            Self::NoTemplate => "no_template",
            Self::NameTaken => "name_taken",
            Self::Suspended => "suspended",
            Self::NeedSave => "need_save",
            Self::TemplateInUse => "template_in_use",
            Self::TemplateExists => "template_exists",
            Self::StartFailed => "start_failed",
        }
    }

    /// The code of an error: the first link of its source chain berth knows a code for
    /// (so context added on top, e.g. by anyhow, does not hide it).
    pub fn of(e: &(dyn StdError + 'static)) -> Self {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if let Some(c) = known(e) {
                return c;
            }
            cur = e.source();
        }
        Self::Failed
    }
}

/// The code of one error value, looking through `#[error(transparent)]` wrappers (whose
/// inner error is not a link of the source chain).
fn known(e: &(dyn StdError + 'static)) -> Option<ErrorCode> {
    if let Some(e) = e.downcast_ref::<CtError>() {
        return ct(e);
    }
    if let Some(berth_runtime::container::checkpoint::CheckpointError::Ct(e)) = e.downcast_ref() {
        return ct(e);
    }
    if let Some(e) = e.downcast_ref::<ConfigError>() {
        return config(e);
    }
    if let Some(e) = e.downcast_ref::<TemplateError>() {
        return template(e);
    }
    if let Some(e) = e.downcast_ref::<NetError>() {
        return net(e);
    }
    if let Some(e) = e.downcast_ref::<LockError>() {
        return Some(lock(e));
    }
    if e.downcast_ref::<CtidError>().is_some() {
        return Some(ErrorCode::InvalidValue);
    }
    if let Some(e) = e.downcast_ref::<InventoryError>() {
        return match e {
            InventoryError::UnknownField(_) | InventoryError::BadPattern { .. } => {
                Some(ErrorCode::InvalidValue)
            }
            InventoryError::Config(c) => config(c),
            InventoryError::Ct(c) => ct(c),
            _ => None,
        };
    }
    None
}

fn ct(e: &CtError) -> Option<ErrorCode> {
    Some(match e {
        CtError::Config(c) => return config(c),
        CtError::Lock(l) => lock(l),
        CtError::Template(t) => return template(t),
        CtError::Net { source, .. } => return net(source),
        CtError::TemplateInUse { .. } => ErrorCode::TemplateInUse,
        CtError::NotRunning(_) => ErrorCode::NotRunning,
        CtError::AlreadyRunning(_) => ErrorCode::AlreadyRunning,
        CtError::Running(_) => ErrorCode::Running,
        CtError::Suspended(_) => ErrorCode::Suspended,
        CtError::NeedSave(_) => ErrorCode::NeedSave,
        CtError::Invalid { .. } => ErrorCode::InvalidValue,
        CtError::StartFailed { .. } | CtError::InitDied { .. } | CtError::StartReport { .. } => {
            ErrorCode::StartFailed
        }
        CtError::Io { .. } | CtError::Sys { .. } => ErrorCode::System,
        _ => return None,
    })
}

fn config(e: &ConfigError) -> Option<ErrorCode> {
    Some(match e {
        ConfigError::NotFound(_) => ErrorCode::NotFound,
        ConfigError::Exists(_) => ErrorCode::Exists,
        ConfigError::NameTaken { .. } => ErrorCode::NameTaken,
        ConfigError::BadCgroupParent(_) => ErrorCode::InvalidValue,
        ConfigError::Io { .. } => ErrorCode::System,
        _ => return None,
    })
}

fn template(e: &TemplateError) -> Option<ErrorCode> {
    Some(match e {
        TemplateError::NotFound { .. } => ErrorCode::NoTemplate,
        TemplateError::Exists { .. } => ErrorCode::TemplateExists,
        TemplateError::InvalidName { .. } => ErrorCode::InvalidValue,
        _ => return None,
    })
}

fn net(e: &NetError) -> Option<ErrorCode> {
    Some(match e {
        NetError::AddressInUse { .. } | NetError::DuplicateOnLink { .. } => ErrorCode::AddressInUse,
        NetError::Invalid(_) => ErrorCode::InvalidValue,
        _ => return None,
    })
}

fn lock(e: &LockError) -> ErrorCode {
    match e {
        LockError::Busy { .. } => ErrorCode::Locked,
        LockError::Open { .. } => ErrorCode::System,
    }
}

/// What `--json` prints on stdout for a failed command.
#[derive(Debug, Clone, Serialize)]
pub struct JsonError {
    pub schema_version: u32,
    /// The message with each cause, as the human error line shows it.
    pub error: String,
    pub code: &'static str,
    pub exit_code: u8,
}

impl JsonError {
    pub fn new(message: String, code: ErrorCode) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            error: message,
            code: code.as_str(),
            exit_code: code.exit(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_runtime::Ctid;

    #[test]
    fn every_code_is_in_the_table_once() {
        for (c, n, _) in TABLE {
            assert_eq!(c.exit(), *n);
            assert_eq!(TABLE.iter().filter(|(d, ..)| d == c).count(), 1, "{c:?}");
            let json = serde_json::to_value(c).unwrap();
            assert_eq!(json, c.as_str(), "serde and as_str agree");
        }
    }

    #[test]
    fn codes_look_through_wrappers_and_context() {
        let ctid = Ctid::new(101).unwrap();
        let e = CtError::Config(ConfigError::NotFound("101".into()));
        assert_eq!(ErrorCode::of(&e), ErrorCode::NotFound);
        assert_eq!(ErrorCode::of(&e).exit(), 14);
        let e = CtError::NotRunning(ctid);
        assert_eq!(ErrorCode::of(&e).exit(), 31);
        let e = anyhow::Error::new(CtError::AlreadyRunning(ctid)).context("start CT 101");
        assert_eq!(ErrorCode::of(e.as_ref()), ErrorCode::AlreadyRunning);
        let e = std::io::Error::other("x");
        assert_eq!(ErrorCode::of(&e), ErrorCode::Failed);
    }

    #[test]
    fn json_error_names_code_and_exit() {
        let j = JsonError::new("CT 5 does not exist".into(), ErrorCode::NotFound);
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["code"], "not_found");
        assert_eq!(v["exit_code"], 14);
        assert_eq!(v["schema_version"], SCHEMA_VERSION);
    }
}
