//! `vzctl`: vzctl's command line over berth (see `berth::vzcompat`).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use berth::exit_codes::ErrorCode;
use berth::vzcompat::{self, Plan, VZCTL_USAGE};

fn main() -> ExitCode {
    let plan = vzcompat::args_of(std::env::args_os()).and_then(|a| vzcompat::vzctl(&a));
    match plan {
        Ok(Plan::Print(s)) => {
            print!("{s}");
            ExitCode::SUCCESS
        }
        Ok(Plan::Berth(args)) => {
            let bin = vzcompat::berth_binary();
            let e = Command::new(&bin).args(&args).exec();
            eprintln!("vzctl: running {}: {e}", bin.display());
            ExitCode::from(ErrorCode::System.exit())
        }
        Ok(Plan::Status(ct)) => status(&ct),
        Err(e) => {
            eprintln!("vzctl: {}\n{VZCTL_USAGE}", e.0);
            ExitCode::from(e.exit())
        }
    }
}

/// vzctl's `CTID 101 exist mounted running`; a CT that does not exist is `deleted`, exit 0.
fn status(ct: &str) -> ExitCode {
    let bin = vzcompat::berth_binary();
    let out = match Command::new(&bin).args(["--json", "status", ct]).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vzctl: running {}: {e}", bin.display());
            return ExitCode::from(ErrorCode::System.exit());
        }
    };
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if out.status.success() {
        let ctid = doc["ct"]["ctid"]
            .as_u64()
            .map_or_else(|| ct.to_owned(), |n| n.to_string());
        println!(
            "{}",
            vzcompat::status_line(&ctid, doc["ct"]["status"].as_str())
        );
        return ExitCode::SUCCESS;
    }
    if doc["code"] == ErrorCode::NotFound.as_str() {
        println!("{}", vzcompat::status_line(ct, None));
        return ExitCode::SUCCESS;
    }
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    ExitCode::from(out.status.code().map_or(1, |c| c as u8))
}
