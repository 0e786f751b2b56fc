//! The `vzctl` and `vzlist` entry points: argv-compatible wrappers that translate a vzctl
//! command line into berth's and run the `berth` binary, so a panel module driving vzctl over
//! SSH works unchanged. berth's exit codes are vzctl's where vzctl had one (`exit_codes`), so
//! they pass through as they are; only `vzctl status` prints a line of its own (vzctl's).
//!
//! The installation the wrappers act on comes from berth's environment (`BERTH_ROOT`, …): vzctl
//! has no flags for it.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::exit_codes::ErrorCode;

/// What a vzctl command line becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Run berth with these arguments; its exit code is the wrapper's.
    Berth(Vec<String>),
    /// `vzctl status CT`: read `berth --json status CT` and print vzctl's status line.
    Status(String),
    /// Print this on stdout and exit 0 (`--help`, `--version`).
    Print(String),
}

/// vzctl's usage, printed by `vzctl --help` and on a syntax error.
pub const VZCTL_USAGE: &str = "\
Usage: vzctl [--quiet | --verbose] COMMAND CTID [OPTIONS]
  vzctl create CTID [--ostemplate NAME] [--hostname NAME] [--ipadd ADDR] [--name NAME]
  vzctl start|stop|restart|status|mount|umount|suspend|resume|destroy|delete CTID
  vzctl stop CTID [--fast]
  vzctl set CTID [--ram SIZE] [--memory B:L] [--swap B:L] [--numproc B:L] [--diskspace B:L]
                 [--cpuunits N] [--cpulimit N] [--cpus N] [--ipadd ADDR] [--ipdel ADDR|all]
                 [--hostname NAME] [--nameserver ADDR] [--searchdomain NAME] [--onboot yes|no]
                 [--userpasswd USER:PASSWORD] [--name NAME] [--save]
  vzctl exec|exec2 CTID COMMAND [ARG ...]   (a single argument is run by sh -c)
  vzctl enter CTID
Every option of `berth set` and `berth create` is accepted; see berth-set(1), berth-create(1).
";

/// A vzctl command line that cannot be translated: the message, and vzctl's syntax-error exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syntax(pub String);

impl Syntax {
    pub fn exit(&self) -> u8 {
        ErrorCode::InvalidSyntax.exit()
    }
}

/// Translates `vzctl`'s arguments (without argv\[0\]).
pub fn vzctl(args: &[String]) -> Result<Plan, Syntax> {
    let mut global = Vec::new();
    let mut rest = args.iter();
    let verb = loop {
        match rest.next().map(String::as_str) {
            Some("--quiet" | "-q") => global.push("--quiet".to_owned()),
            Some("--verbose" | "-v") => global.push("--verbose".to_owned()),
            Some("--help" | "-h" | "help") => return Ok(Plan::Print(VZCTL_USAGE.to_owned())),
            Some("--version" | "-V") => {
                return Ok(Plan::Print(format!(
                    "vzctl (berth {}) compatibility entry point\n",
                    env!("CARGO_PKG_VERSION")
                )));
            }
            Some(v) => break v.to_owned(),
            None => return Err(Syntax("no command given".into())),
        }
    };
    let Some(ct) = rest.next().cloned() else {
        return Err(Syntax(format!("{verb}: no CTID given")));
    };
    let opts: Vec<String> = rest.cloned().collect();
    let berth = |verb: &str, extra: Vec<String>| {
        let mut v = global.clone();
        v.push(verb.to_owned());
        v.push(ct.clone());
        v.extend(extra);
        Ok(Plan::Berth(v))
    };
    match verb.as_str() {
        "create" => berth("create", create_opts(&opts)?),
        "start" => berth("start", drop_flags(&opts, &["--wait", "--force"])),
        "stop" => berth(
            "stop",
            drop_flags(&opts, &["--skip-umount", "--skip-unmount"]),
        ),
        "restart" => berth("restart", drop_flags(&opts, &["--wait", "--force"])),
        "destroy" | "delete" => berth("destroy", opts),
        v @ ("mount" | "umount" | "suspend" | "resume" | "set" | "enter") => berth(v, opts),
        // vzctl's dump is one file; berth's a directory of CRIU images named the same way.
        "chkpnt" => berth("checkpoint", dumpfile_opts(&opts)),
        "restore" => berth("restore", dumpfile_opts(&opts)),
        "status" => {
            if !opts.is_empty() {
                return Err(Syntax(format!("status: unexpected {:?}", opts[0])));
            }
            Ok(Plan::Status(ct))
        }
        "exec" | "exec2" => {
            if opts.is_empty() {
                return Err(Syntax(format!("{verb}: no command given")));
            }
            // vzctl hands its command to a shell: one argument may be a whole command line.
            let argv = if opts.len() == 1 {
                vec!["sh".to_owned(), "-c".to_owned(), opts[0].clone()]
            } else {
                opts
            };
            let mut extra = vec!["--".to_owned()];
            extra.extend(argv);
            berth("exec", extra)
        }
        other => Err(Syntax(format!("unknown command {other:?}"))),
    }
}

/// `--dumpfile F` is `--dir F`.
fn dumpfile_opts(opts: &[String]) -> Vec<String> {
    opts.iter()
        .map(|o| match o.strip_prefix("--dumpfile") {
            Some("") => "--dir".to_owned(),
            Some(v) if v.starts_with('=') => format!("--dir{v}"),
            _ => o.clone(),
        })
        .collect()
}

/// `create`'s options in berth's words: `--ostemplate` is `--template`; `--config` (vzctl's
/// sample config) has no berth equivalent and is refused rather than silently ignored.
fn create_opts(opts: &[String]) -> Result<Vec<String>, Syntax> {
    let mut out = Vec::with_capacity(opts.len());
    for o in opts {
        if o == "--ostemplate" {
            out.push("--template".to_owned());
        } else if let Some(v) = o.strip_prefix("--ostemplate=") {
            out.push(format!("--template={v}"));
        } else if o == "--config" || o.starts_with("--config=") {
            return Err(Syntax(
                "create --config: berth has no sample configs; give the settings to `vzctl set`"
                    .into(),
            ));
        } else {
            out.push(o.clone());
        }
    }
    Ok(out)
}

/// `opts` without vzctl flags berth has no use for (it always waits, never needs forcing).
fn drop_flags(opts: &[String], flags: &[&str]) -> Vec<String> {
    opts.iter()
        .filter(|o| !flags.contains(&o.as_str()))
        .cloned()
        .collect()
}

/// vzlist's arguments are berth list's (`berth list` is vzlist-shaped).
pub fn vzlist(args: &[String]) -> Vec<String> {
    let mut v = vec!["list".to_owned()];
    v.extend(args.iter().cloned());
    v
}

/// vzctl's status line for a CT in `status` (berth's state names), or for none.
pub fn status_line(ct: &str, status: Option<&str>) -> String {
    let words = match status {
        Some("running") => "exist mounted running",
        Some("suspended") => "exist mounted running suspended",
        Some("mounted") => "exist mounted down",
        Some(_) => "exist unmounted down",
        None => "deleted unmounted down",
    };
    format!("CTID {ct} {words}")
}

/// The berth binary the wrappers run: `BERTH_BIN`, else `berth` next to the wrapper, else
/// `berth` on PATH.
pub fn berth_binary() -> PathBuf {
    if let Some(b) = std::env::var_os("BERTH_BIN") {
        return PathBuf::from(b);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("berth")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("berth"))
}

/// argv without argv\[0\], as strings (a non-UTF-8 argument is a syntax error).
pub fn args_of(args: impl Iterator<Item = OsString>) -> Result<Vec<String>, Syntax> {
    args.skip(1)
        .map(|a| {
            a.into_string()
                .map_err(|a| Syntax(format!("argument {a:?} is not UTF-8")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn berth(s: &str) -> Plan {
        Plan::Berth(v(s))
    }

    #[test]
    fn verbs_translate() {
        assert_eq!(
            vzctl(&v("create 101 --ostemplate debian-12 --hostname a.test")).unwrap(),
            berth("create 101 --template debian-12 --hostname a.test")
        );
        assert_eq!(
            vzctl(&v("chkpnt 101 --dumpfile /d/101")).unwrap(),
            berth("checkpoint 101 --dir /d/101")
        );
        assert_eq!(
            vzctl(&v("restore 101 --dumpfile=/d/101")).unwrap(),
            berth("restore 101 --dir=/d/101")
        );
        assert_eq!(
            vzctl(&v("--quiet start 101 --wait")).unwrap(),
            berth("--quiet start 101")
        );
        assert_eq!(
            vzctl(&v("stop 101 --fast")).unwrap(),
            berth("stop 101 --fast")
        );
        assert_eq!(vzctl(&v("delete 101")).unwrap(), berth("destroy 101"));
        assert_eq!(
            vzctl(&v("set 101 --ram 256M --memory 256M:300M --save")).unwrap(),
            berth("set 101 --ram 256M --memory 256M:300M --save")
        );
        assert_eq!(vzctl(&v("status 101")).unwrap(), Plan::Status("101".into()));
    }

    #[test]
    fn exec_runs_one_argument_through_a_shell() {
        let one = vec!["exec".into(), "101".into(), "ls -l /; echo $HOME".into()];
        assert_eq!(
            vzctl(&one).unwrap(),
            Plan::Berth(vec![
                "exec".into(),
                "101".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                "ls -l /; echo $HOME".into()
            ])
        );
        assert_eq!(
            vzctl(&v("exec2 101 cat /etc/hostname")).unwrap(),
            berth("exec 101 -- cat /etc/hostname")
        );
    }

    #[test]
    fn bad_command_lines_are_syntax_errors() {
        for bad in [
            "",
            "start",
            "frobnicate 101",
            "exec 101",
            "status 101 extra",
            "create 101 --config basic",
        ] {
            let e = vzctl(&v(bad)).unwrap_err();
            assert_eq!(e.exit(), ErrorCode::InvalidSyntax.exit(), "{bad:?}");
        }
    }

    #[test]
    fn status_lines_are_vzctls() {
        assert_eq!(
            status_line("101", Some("running")),
            "CTID 101 exist mounted running"
        );
        assert_eq!(
            status_line("101", Some("stopped")),
            "CTID 101 exist unmounted down"
        );
        assert_eq!(
            status_line("101", Some("mounted")),
            "CTID 101 exist mounted down"
        );
        assert_eq!(status_line("7", None), "CTID 7 deleted unmounted down");
    }
}
