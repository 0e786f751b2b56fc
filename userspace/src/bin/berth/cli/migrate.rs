//! `berth migrate` and the hidden `berth migrate-target` the source runs on the target.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// CTID or name.
    pub ct: String,
    /// The target host as ssh reaches it: `[user@]HOST`.
    pub dest: String,
    /// Move the running processes (CRIU) instead of stopping the CT and starting it there.
    #[arg(long)]
    pub live: bool,
    /// Keep this host's copy as state `migrated` (the default).
    #[arg(long, conflicts_with = "remove_source")]
    pub keep_source: bool,
    /// Destroy this host's copy once the CT runs on the target.
    #[arg(long)]
    pub remove_source: bool,
    /// An ssh option (`KEY=VALUE`, as ssh's -o takes it), for ssh and for rsync's ssh alike.
    #[arg(long = "ssh-opt", value_name = "OPT")]
    pub ssh_opts: Vec<String>,
    /// The berth command on the target, run by its shell (may carry `env VAR=…` before it).
    #[arg(long, env = "BERTH_REMOTE", default_value = "berth")]
    pub remote_berth: String,
    /// At most this many copy passes while the CT runs (they stop early once the delta
    /// stops shrinking).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub max_passes: u32,
}

#[derive(Subcommand, Debug)]
pub enum MigrateTargetCmd {
    /// Check that this host can take the CT whose config comes on stdin; make room for it.
    Preflight {
        /// The CT's CTID (its config comes on stdin).
        ctid: String,
        /// Size of its files.
        #[arg(long)]
        bytes: u64,
        /// A live migration follows: CRIU must work here.
        #[arg(long)]
        live: bool,
    },
    /// Install the config on stdin and start the CT (or restore it, or leave it stopped).
    Activate {
        /// The CT's CTID (its config comes on stdin).
        ctid: String,
        /// Restore from the images received instead of starting.
        #[arg(long)]
        restore: bool,
        /// Leave the CT stopped (it was stopped on the source).
        #[arg(long, conflicts_with = "restore")]
        no_start: bool,
        /// Restore from this directory instead of the incoming one.
        #[arg(long, requires = "restore")]
        dir: Option<PathBuf>,
    },
    /// Remove a failed attempt's half-state (keeps the copied files unless --purge).
    Abort {
        /// The CT's CTID.
        ctid: String,
        /// Remove the copied files and the incoming mark too.
        #[arg(long)]
        purge: bool,
    },
}
