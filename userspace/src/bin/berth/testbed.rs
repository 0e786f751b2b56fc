//! `berth testbed`: a thin layer over the berth-testbed library. Exit codes: 0 pass, 1 a check
//! failed, 2 setup error (a broken topology file among them), 4 a check was skipped.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use berth_testbed::supervisor::{SuperviseArgs, supervise};
use berth_testbed::{Options, Results, Testbed, Topology, exit};
use clap::Subcommand;

mod impair;

#[derive(Subcommand, Debug)]
pub enum TestbedCmd {
    /// Check a topology file; nothing is created.
    Validate {
        /// The topology file (TOML).
        file: PathBuf,
    },
    /// Bring a topology up under a supervisor and print its handle (run id, node PIDs).
    Up {
        /// The topology file (TOML).
        file: PathBuf,
        /// As an unprivileged user, in a user namespace: CT nodes become plain namespaces and
        /// eBPF-based checks report skipped.
        #[arg(long)]
        rootless: bool,
    },
    /// Run a command in a node of a running testbed (a CT's namespaces, else the node's netns).
    Exec {
        /// The topology file (TOML).
        file: PathBuf,
        /// The run, when several of this file run.
        #[arg(long)]
        run: Option<String>,
        /// The node (CT or namespace) of the topology.
        node: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run the topology's checks on a running testbed.
    Check {
        /// The topology file (TOML).
        file: PathBuf,
        /// The run, when several of this file run.
        #[arg(long)]
        run: Option<String>,
        /// Also write the results as JUnit XML.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
    /// Up, checks and down under one supervisor.
    Run {
        /// The topology file (TOML).
        file: PathBuf,
        /// Also write the results as JUnit XML.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// As an unprivileged user (see `up --rootless`).
        #[arg(long)]
        rootless: bool,
    },
    /// Take a running testbed down.
    Down {
        /// The topology file (TOML).
        file: PathBuf,
        /// The run, when several of this file run.
        #[arg(long)]
        run: Option<String>,
    },
    /// List runs (alive or left by a dead supervisor).
    Ls,
    /// Remove what dead runs left behind (cgroups, run directories). Idempotent.
    Gc,
    /// Internal: the supervisor process `up` and `run` start.
    #[command(name = "__supervise", hide = true)]
    Supervise {
        /// The testbed's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The run's id.
        #[arg(long)]
        run_id: String,
        /// Run the checks, then take the testbed down.
        #[arg(long)]
        run: bool,
        /// In the user namespace the caller made.
        #[arg(long)]
        rootless: bool,
        /// The topology file (TOML).
        file: PathBuf,
    },
    /// Internal: attach the loss impairment to an interface of this network namespace, or
    /// print the counters of one attached (`--stats`).
    #[command(name = "__impair", hide = true)]
    Impair {
        /// Where the counters map is (to be) pinned.
        #[arg(long)]
        pin: PathBuf,
        /// Print the counters pinned at `--pin` as JSON.
        #[arg(long)]
        stats: bool,
        /// The interface whose egress is impaired.
        #[arg(long, required_unless_present = "stats")]
        dev: Option<String>,
        /// Drop every Nth IP packet (0: off).
        #[arg(long, default_value_t = 0)]
        every: u32,
        /// Drop a seeded fraction (threshold of 2^32; 0: off).
        #[arg(long, default_value_t = 0)]
        threshold: u32,
        /// Seed of the fraction's random sequence (the same seed drops the same packets).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// The exit code of `berth testbed ...`; errors are printed here and count as setup errors.
pub fn testbed(cmd: TestbedCmd, json: bool) -> u8 {
    match dispatch(cmd, json) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("berth testbed: error: {e:#}");
            exit::SETUP
        }
    }
}

fn options() -> Result<Options> {
    Ok(Options::new(
        std::env::current_exe().context("find the berth binary")?,
    ))
}

fn dispatch(cmd: TestbedCmd, json: bool) -> Result<u8> {
    let mut opts = options()?;
    match cmd {
        TestbedCmd::Validate { file } => {
            let t = Topology::from_file(&file)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"file": file, "hash": t.hash, "nodes": t.nodes.len(), "checks": t.checks.len()})
                );
            } else {
                println!(
                    "{}: ok ({} nodes, {} bridges, {} checks)",
                    file.display(),
                    t.nodes.len(),
                    t.bridges.len(),
                    t.checks.len()
                );
            }
            Ok(exit::PASS)
        }
        TestbedCmd::Up { file, rootless } => {
            opts.rootless = rootless;
            let tb = Testbed::up(&file, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&tb.handle)?);
            } else {
                println!(
                    "run {} up (supervisor PID {})",
                    tb.handle.run_id, tb.handle.supervisor_pid
                );
                for (name, n) in &tb.handle.nodes {
                    println!(
                        "  {name:12} {:6} pid {:8} {}",
                        n.kind,
                        n.pid,
                        n.addrs.join(" ")
                    );
                }
            }
            // The testbed outlives this command: `down` (or a SIGKILL, then `gc`) ends it.
            tb.detach();
            Ok(exit::PASS)
        }
        TestbedCmd::Exec {
            file,
            run,
            node,
            cmd,
        } => {
            let tb = attach(&opts, &file, run.as_deref())?;
            let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let st = tb.command(&node, &argv)?.status().context("run nsenter")?;
            Ok(st.code().map(|c| c as u8).unwrap_or(exit::SETUP))
        }
        TestbedCmd::Check { file, run, junit } => {
            let tb = attach(&opts, &file, run.as_deref())?;
            report(&tb.check()?, json, junit.as_deref())
        }
        TestbedCmd::Run {
            file,
            junit,
            rootless,
        } => {
            opts.rootless = rootless;
            let (r, _) = berth_testbed::run(&file, &opts)?;
            report(&r, json, junit.as_deref())
        }
        TestbedCmd::Down { file, run } => {
            let tb = attach(&opts, &file, run.as_deref())?;
            let id = tb.handle.run_id.clone();
            tb.down()?;
            if !json {
                println!("run {id} down");
            }
            Ok(exit::PASS)
        }
        TestbedCmd::Ls => {
            let runs = berth_testbed::list_runs(&opts);
            if json {
                println!("{}", serde_json::to_string(&runs)?);
            } else {
                for r in runs {
                    println!(
                        "{}  {}  pid {}  {}",
                        r.run_id,
                        if r.alive { "alive" } else { "dead " },
                        r.supervisor_pid
                            .map(|p| p.to_string())
                            .unwrap_or("-".into()),
                        r.topology
                            .map(|t| t.display().to_string())
                            .unwrap_or_default()
                    );
                }
            }
            Ok(exit::PASS)
        }
        TestbedCmd::Gc => {
            let rep = berth_testbed::gc(&opts)?;
            if json {
                println!("{}", serde_json::to_string(&rep)?);
            } else {
                println!(
                    "removed {} run(s), {} cgroup(s)",
                    rep.runs.len(),
                    rep.cgroups.len()
                );
            }
            Ok(exit::PASS)
        }
        TestbedCmd::Supervise {
            state_dir,
            run_id,
            run,
            rootless,
            file,
        } => Ok(supervise(SuperviseArgs {
            state_dir,
            run_id,
            file,
            run_mode: run,
            rootless,
            berth_bin: opts.berth_bin,
        })),
        TestbedCmd::Impair {
            pin,
            stats,
            dev,
            every,
            threshold,
            seed,
        } => {
            if stats {
                let s = impair::stats(&pin)?;
                println!(
                    "{}",
                    serde_json::json!({"seen": s.seen, "dropped": s.dropped})
                );
            } else {
                let dev = dev.context("--dev")?;
                let cfg = berth_common::impair::ImpairConfig {
                    every,
                    threshold,
                    seed,
                };
                impair::attach(&dev, &pin, cfg)?;
            }
            Ok(exit::PASS)
        }
    }
}

/// The running testbed of `file` (or run `run`).
fn attach(opts: &Options, file: &Path, run: Option<&str>) -> Result<Testbed> {
    if let Some(id) = run {
        return Ok(Testbed::attach(opts, id)?);
    }
    let want =
        std::fs::canonicalize(file).with_context(|| format!("resolve {}", file.display()))?;
    let runs: Vec<_> = berth_testbed::list_runs(opts)
        .into_iter()
        .filter(|r| r.alive && r.topology.as_deref() == Some(want.as_path()))
        .collect();
    match runs.as_slice() {
        [one] => Ok(Testbed::attach(opts, &one.run_id)?),
        [] => bail!("no running testbed of {}", file.display()),
        many => Err(anyhow!(
            "{} runs of {} are up ({}): pick one with --run",
            many.len(),
            file.display(),
            many.iter()
                .map(|r| r.run_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn report(r: &Results, json: bool, junit: Option<&Path>) -> Result<u8> {
    if let Some(j) = junit {
        std::fs::write(j, r.junit()).with_context(|| format!("write {}", j.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        print!("{}", r.table());
    }
    Ok(r.exit_code())
}
