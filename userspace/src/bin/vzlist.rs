//! `vzlist`: `berth list` under vzlist's name (its options are vzlist's; see `berth::vzcompat`).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use berth::exit_codes::ErrorCode;
use berth::vzcompat;

fn main() -> ExitCode {
    let args = match vzcompat::args_of(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vzlist: {}", e.0);
            return ExitCode::from(e.exit());
        }
    };
    let bin = vzcompat::berth_binary();
    let e = Command::new(&bin).args(vzcompat::vzlist(&args)).exec();
    eprintln!("vzlist: running {}: {e}", bin.display());
    ExitCode::from(ErrorCode::System.exit())
}
