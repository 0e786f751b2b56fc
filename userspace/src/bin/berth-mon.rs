//! `berth-mon`: the per-CT monitor that `berth start` and `berth restore` exec once the CT's
//! init exists. It only logs the console, reports init's first moments and reaps it (see
//! berth_runtime's container::monitor), so it stays small: no async runtime, no datapath, no
//! argument parser, no logging subscriber (its stdio is /dev/null anyway).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match berth_runtime::container::berth_mon_main(&args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
