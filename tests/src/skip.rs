//! Visible skips. A test (or a part of one) that cannot run on this machine calls [`skip`]:
//! the reason goes to stdout and, under `cargo xtask test`, to the file named by
//! `BERTH_SKIP_LOG`, which xtask prints as the run's list of skipped tests at the end — a skip
//! never passes silently.

use std::io::Write;

/// Environment variable naming the file skips are appended to (set by `cargo xtask test`).
pub const LOG_ENV: &str = "BERTH_SKIP_LOG";

/// Records that `what` (a test or a check inside one) did not run, and why.
pub fn skip(what: &str, why: &str) {
    println!("SKIPPED {what}: {why}");
    let Some(path) = std::env::var_os(LOG_ENV) else {
        return;
    };
    let line = format!("{what}\t{}\n", why.replace(['\n', '\t'], " "));
    // O_APPEND keeps lines of tests running in parallel whole.
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = res {
        eprintln!(
            "recording skip of {what} in {}: {e}",
            path.to_string_lossy()
        );
    }
}

/// Whether `tool` is on PATH.
pub fn have_tool(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether every tool is on PATH; the first one missing is recorded as `test`'s skip.
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    match tools.iter().find(|t| !have_tool(t)) {
        Some(t) => {
            skip(test, &format!("{t} is not installed"));
            false
        }
        None => true,
    }
}
