//! `berth`: the vzctl-style command line of berth. `main` parses and dispatches to one function
//! per verb; the verbs' modules call the library and print.

mod autostart;
mod billing;
mod checkpoint;
mod cli;
mod gc;
mod import;
mod lifecycle;
mod list;
mod migrate;
mod netclass;
mod netstat;
mod progress;
mod quota;
mod set;
mod shaper;
mod ship;
mod status;
mod table;
mod template;
mod testbed;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use berth::datapath::DEFAULT_PIN_DIR;
use berth::exit_codes::{ErrorCode, JsonError, SCHEMA_VERSION};
use berth::lifecycle_hooks::DatapathHooks;
use berth_runtime::Ctid;
use berth_runtime::config::Host;
use clap::Parser;
use serde_json::Value;

use cli::{Cli, Cmd};

fn main() -> ExitCode {
    // The fault-injection tests' crash points (a build with `--features failpoints`).
    if let Err(e) = berth_runtime::crashpoint::setup_from_env() {
        eprintln!("berth: error: {e}");
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return parse_error(e),
    };
    let levels: &[&str] = if cli.quiet {
        &["error"]
    } else {
        &["warn", "info", "debug"]
    };
    berth::logging::init(cli.verbose, levels);
    progress::init(cli.quiet);
    let json = cli.json || matches!(&cli.cmd, Cmd::List(a) if a.json);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = ErrorCode::of(e.as_ref());
            // `{:#}`: the message and each cause once — library errors leave their cause to
            // `source()`, never repeating it in their own text.
            fail(json, format!("{e:#}"), code)
        }
    }
}

/// A failed command: the error on stderr, and with --json also as JSON on stdout (where a
/// panel reads); the code's exit.
fn fail(json: bool, message: String, code: ErrorCode) -> ExitCode {
    eprintln!("berth: error: {message}");
    if json {
        let e = JsonError::new(message, code);
        println!("{}", serde_json::to_string(&e).expect("plain struct"));
    }
    ExitCode::from(code.exit())
}

/// clap's help and version exit 0 as usual; a command line that does not parse exits with
/// vzctl's syntax-error code (and answers in JSON when --json was among the arguments).
fn parse_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let json = std::env::args().skip(1).any(|a| a == "--json");
    if json {
        return fail(true, first_line(&e), ErrorCode::InvalidSyntax);
    }
    let _ = e.print();
    ExitCode::from(ErrorCode::InvalidSyntax.exit())
}

/// clap's message without its usage and hint lines.
fn first_line(e: &clap::Error) -> String {
    let s = e.render().to_string();
    s.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string()
}

/// What every verb works with: the host's directories, the output mode and the datapath.
pub struct Ctx {
    pub host: Host,
    pub json: bool,
    /// `-q`: no progress bars, no notices.
    pub quiet: bool,
    /// The bpffs directory of the datapath's pins (--bpffs, or the default).
    pub pin_dir: PathBuf,
    /// The lifecycle's network hooks; they open the datapath on first use only.
    pub hooks: DatapathHooks,
}

impl Ctx {
    /// The CT a command-line argument names (CTID or name).
    pub fn resolve(&self, ct: &str) -> Result<Ctid> {
        Ok(self.host.resolve(ct)?)
    }

    /// A notice on stderr (an idempotent no-op, a setting adjusted), unless `-q`.
    pub fn notice(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("berth: {msg}");
        }
    }

    /// `value` as one line of JSON with --json (with the `schema_version` of every JSON
    /// document), else whatever `human` prints.
    pub fn print(&self, mut value: Value, human: impl FnOnce()) {
        if self.json {
            if let Value::Object(m) = &mut value {
                m.insert("schema_version".into(), SCHEMA_VERSION.into());
            }
            println!("{value}");
        } else {
            human();
        }
    }
}

/// Runs the verb; the result is berth's exit code.
fn run(cli: Cli) -> Result<u8> {
    // Before any host state is opened: the testbed makes installations of its own.
    let cli = match cli.cmd {
        Cmd::Testbed(t) => return Ok(testbed::testbed(t, cli.json)),
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "berth", &mut script);
            // `| head` closing the pipe is no failure of ours.
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(anyhow::anyhow!("writing the completion script: {e}"));
                }
                _ => return Ok(0),
            }
        }
        Cmd::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
            clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir)
                .map_err(|e| anyhow::anyhow!("writing man pages into {}: {e}", dir.display()))?;
            return Ok(0);
        }
        _ => cli,
    };
    let mut ctx = Ctx {
        host: Host::new(cli.root, cli.run_dir, cli.cgroup_parent)?,
        json: cli.json,
        quiet: cli.quiet,
        pin_dir: cli
            .bpffs
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
        hooks: DatapathHooks::new(cli.bpffs),
    };
    let ctx = &mut ctx;
    match cli.cmd {
        Cmd::Create(a) => lifecycle::create(ctx, *a)?,
        Cmd::Start { ct: Some(ct), .. } => lifecycle::start(ctx, &ct)?,
        Cmd::Start { ct: None, .. } => return autostart::start_all_onboot(ctx),
        Cmd::Stop {
            ct: Some(ct), fast, ..
        } => lifecycle::stop(ctx, &ct, fast)?,
        Cmd::Stop { ct: None, fast, .. } => return autostart::stop_all(ctx, fast),
        Cmd::Restart { ct } => lifecycle::restart(ctx, &ct)?,
        Cmd::Destroy { ct } => lifecycle::destroy(ctx, &ct)?,
        Cmd::Mount { ct } => lifecycle::mount(ctx, &ct)?,
        Cmd::Umount { ct } => lifecycle::umount(ctx, &ct)?,
        Cmd::Suspend { ct, dump: false } => lifecycle::suspend(ctx, &ct)?,
        Cmd::Suspend { ct, dump: true } => checkpoint::suspend_dump(ctx, &ct)?,
        Cmd::Resume { ct } => checkpoint::resume(ctx, &ct)?,
        Cmd::Checkpoint {
            ct,
            dir,
            keep_running,
        } => checkpoint::checkpoint(ctx, &ct, dir, keep_running)?,
        Cmd::Restore { ct, dir } => checkpoint::restore(ctx, &ct, dir)?,
        Cmd::Migrate(a) => migrate::migrate(ctx, &a)?,
        Cmd::MigrateTarget(t) => migrate::target::run(ctx, t)?,
        Cmd::Exec { ct, cmd } => return lifecycle::exec(ctx, &ct, &cmd),
        Cmd::Enter { ct } => return lifecycle::enter(ctx, &ct),
        Cmd::Status { ct } => status::status(ctx, &ct)?,
        Cmd::Set(a) => set::set(ctx, *a)?,
        Cmd::List(a) => list::list(ctx, &a)?,
        Cmd::Template(t) => template::template(ctx, t)?,
        Cmd::Netstat(a) => netstat::netstat(ctx, &a)?,
        Cmd::Netclass(c) => netclass::netclass(ctx, c)?,
        Cmd::Shaper(c) => shaper::shaper(ctx, c)?,
        Cmd::Gc => gc::gc(ctx)?,
        Cmd::Billing(a) => billing::billing(ctx, a)?,
        Cmd::Quota(a) => quota::quota(ctx, a)?,
        Cmd::Import(cli::ImportCmd::Vz(a)) => import::vz(ctx, &a)?,
        Cmd::Testbed(_) | Cmd::Completion { .. } | Cmd::Man { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(0)
}
