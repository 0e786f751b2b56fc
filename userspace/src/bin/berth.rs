//! `berth`: the vzctl-style command line of berth.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use berth::ctnet::{DatapathHooks, shaping_of};
use berth::datapath::{DEFAULT_PIN_DIR, Datapath, Direction, Family, parse_networks_classes};
use berth::netstat::{self, Baseline, CtShapingSummary, Filter, aggregate};
use berth::shaper::report::{ShapingReader, ShapingReport};
use berth::shaper::{ClassRate, DEFAULT_MTU, ShapingConfig, parse_optional_rate};
use berth_runtime::cgroups::Stats;
use berth_runtime::config::{CtConfig, Host, ResourceConfig};
use berth_runtime::container::state::RunState;
use berth_runtime::container::{self, CreateOpts, SetOpts, State};
use berth_runtime::net::{AddrSelection, BridgedIface};
use berth_runtime::template::TemplateStore;
use berth_runtime::{Ctid, Size};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(
    name = "berth",
    version,
    about = "OpenVZ-style system containers on a mainline kernel"
)]
struct Cli {
    /// State directory (configs, private areas, templates).
    #[arg(long, global = true, env = "BERTH_ROOT")]
    root: Option<PathBuf>,
    /// Run-state directory (locks, init PIDs, console logs). Default: /run/berth, or <root>/run.
    #[arg(long, global = true, env = "BERTH_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// cgroup directory holding this installation's CTs, under every hierarchy.
    #[arg(long, global = true, env = "BERTH_CGROUP_PARENT")]
    cgroup_parent: Option<String>,
    /// bpffs directory of the eBPF datapath's pinned programs, maps and links.
    #[arg(long, global = true, env = "BERTH_BPFFS")]
    bpffs: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More logging on stderr (-v info, -vv debug). BERTH_LOG takes tracing filter syntax.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a CT from a template.
    Create {
        ctid: String,
        #[arg(long, default_value = "busybox")]
        template: String,
        #[arg(long)]
        hostname: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Run the CT in a user namespace with its own 65536-id range (implies --copy).
        #[arg(long)]
        userns: bool,
        /// Give the CT a full copy of the template instead of an overlay over it.
        #[arg(long)]
        copy: bool,
        /// Routed (venet) address, IPv4 or IPv6; repeatable.
        #[arg(long = "ipadd")]
        ipadd: Vec<IpAddr>,
    },
    /// Boot a CT.
    Start {
        ct: String,
    },
    /// Halt a CT (the distro's halt signal, then kill what is left after stop_timeout).
    Stop {
        ct: String,
        /// Kill everything at once instead of asking init to halt.
        #[arg(long)]
        fast: bool,
    },
    Restart {
        ct: String,
    },
    /// Remove a stopped CT: its files, config and cgroups.
    Destroy {
        ct: String,
    },
    Status {
        ct: String,
    },
    /// Bind-mount the CT's private area on its root directory.
    Mount {
        ct: String,
    },
    Umount {
        ct: String,
    },
    /// Freeze every process of the CT.
    Suspend {
        ct: String,
    },
    Resume {
        ct: String,
    },
    /// Run a command in a running CT; its exit code becomes berth's.
    Exec {
        ct: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Interactive shell in a running CT.
    Enter {
        ct: String,
    },
    /// Change a CT's settings, live when it runs; --save persists them.
    Set(Box<SetArgs>),
    /// List CTs (running ones; -a for all).
    List {
        #[arg(short, long)]
        all: bool,
        /// Comma-separated fields (see `berth list -L`).
        #[arg(short, long)]
        output: Option<String>,
        /// No header line.
        #[arg(short = 'H', long)]
        no_header: bool,
        /// List the available fields.
        #[arg(short = 'L', long)]
        list_fields: bool,
    },
    /// OS templates.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Clean what a killed berth left behind (stale state, cgroups, mounts, half-made CTs).
    Gc,
    /// Per-CT traffic by network class (vznetstat-like), from the eBPF counters.
    Netstat {
        /// Only this CT.
        ct: Option<String>,
        /// Only this network class.
        #[arg(short = 'c', long)]
        class: Option<u8>,
        /// IPv4 only.
        #[arg(short = '4', conflicts_with = "v6")]
        v4: bool,
        /// IPv6 only.
        #[arg(short = '6')]
        v6: bool,
        /// Start this view from zero (billing totals and the kernel counters are untouched).
        #[arg(long)]
        reset: bool,
    },
    /// Network classes (OpenVZ networks_classes: `CLASS CIDR` per line).
    #[command(subcommand)]
    Netclass(NetclassCmd),
    /// Traffic shaping.
    #[command(subcommand)]
    Shaper(ShaperCmd),
}

#[derive(Subcommand, Debug)]
enum ShaperCmd {
    /// Which backend shapes on this host and why; with a CT, its rates, drops and overlimits.
    Status { ct: Option<String> },
}

#[derive(Subcommand, Debug)]
enum NetclassCmd {
    /// Replace the class table live from a networks_classes file.
    Load { file: PathBuf },
    /// Show the class table.
    List,
}

#[derive(Args, Debug)]
struct SetArgs {
    ct: String,
    #[arg(long)]
    hostname: Option<String>,
    #[arg(long)]
    name: Option<String>,
    /// Memory limit, e.g. 512M (unlimited to remove).
    #[arg(long)]
    memory: Option<Size>,
    /// Swap allowed on top of --memory.
    #[arg(long)]
    swap: Option<Size>,
    /// CPU weight (OpenVZ units, default 1000).
    #[arg(long)]
    cpuunits: Option<u64>,
    /// CPU limit in percent of one CPU (100 = one CPU, 0 = none).
    #[arg(long)]
    cpulimit: Option<u32>,
    /// Number of CPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// Maximum number of processes (0 = none).
    #[arg(long)]
    numproc: Option<u64>,
    /// Block I/O weight 10..1000.
    #[arg(long)]
    ioweight: Option<u32>,
    /// Disk quota (needs project quotas on the filesystem).
    #[arg(long)]
    diskspace: Option<Size>,
    /// Add a routed (venet) address, IPv4 or IPv6; repeatable.
    #[arg(long = "ipadd", value_name = "ADDR")]
    ipadd: Vec<IpAddr>,
    /// Remove a routed address, or `all`; repeatable.
    #[arg(long = "ipdel", value_name = "ADDR|all")]
    ipdel: Vec<String>,
    /// Add a bridged interface: eth<N>[,mac,host_ifname,host_mac,bridge] (vzctl syntax).
    #[arg(long = "netif_add", value_name = "SPEC")]
    netif_add: Vec<String>,
    /// Remove a bridged interface eth<N>, or `all`.
    #[arg(long = "netif_del", value_name = "eth<N>|all")]
    netif_del: Option<String>,
    /// DNS server for the CT's resolv.conf; repeatable (replaces the list).
    #[arg(long = "nameserver", value_name = "ADDR")]
    nameserver: Vec<IpAddr>,
    /// Search domain for the CT's resolv.conf; repeatable (replaces the list).
    #[arg(long = "searchdomain", value_name = "DOMAIN")]
    searchdomain: Vec<String>,
    /// Rate of traffic to the CT (tc units: kbit, mbit, gbit, bps, ...; `none` removes it).
    #[arg(long = "rate-in", value_name = "RATE")]
    rate_in: Option<String>,
    /// Rate of traffic from the CT.
    #[arg(long = "rate-out", value_name = "RATE")]
    rate_out: Option<String>,
    /// HTB burst of every class (at least one frame).
    #[arg(long = "burst", value_name = "SIZE")]
    burst: Option<String>,
    /// Per-network-class rates CLASS:IN:OUT (e.g. 1:100mbit:none); repeatable.
    #[arg(long = "class-rate", value_name = "CLASS:IN:OUT")]
    class_rate: Vec<String>,
    /// Packet-rate limit of traffic to the CT, packets/s (`none` removes it).
    #[arg(long = "pps-in", value_name = "N")]
    pps_in: Option<String>,
    /// Packet-rate limit of traffic from the CT.
    #[arg(long = "pps-out", value_name = "N")]
    pps_out: Option<String>,
    /// Persist in the CT's config.
    #[arg(long)]
    save: bool,
}

#[derive(Subcommand, Debug)]
enum TemplateCmd {
    List,
    /// Import a rootfs tarball (.tar, .tar.gz, .tar.xz, .tar.zst).
    Import {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    #[command(subcommand)]
    Build(BuildCmd),
    Remove {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum BuildCmd {
    /// Offline, from Debian's busybox-static.
    Busybox {
        #[arg(long, default_value = "busybox")]
        name: String,
    },
    /// A real distribution with debootstrap (needs the Debian mirror).
    Debian {
        #[arg(long, default_value = "bookworm")]
        suite: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        mirror: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("BERTH_LOG").unwrap_or_else(|_| {
        match cli.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
        .into()
    });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_target(false)
        .init();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("berth: error: {}", error_text(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, each cause only if the text so far does not already carry it
/// (the library errors name their source in their own message as well as chaining it).
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if out.contains(&c) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&c);
    }
    out
}

fn print(json: bool, value: Value, human: impl FnOnce()) {
    if json {
        println!("{value}");
    } else {
        human();
    }
}

fn run(cli: Cli) -> Result<u8> {
    let host = Host::new(
        cli.root.clone(),
        cli.run_dir.clone(),
        cli.cgroup_parent.clone(),
    )?;
    let json = cli.json;
    let mut hooks = DatapathHooks::new(cli.bpffs.clone());
    let resolve = |s: &str| host.resolve(s).map_err(anyhow::Error::from);
    let pin_dir = cli
        .bpffs
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
    match cli.cmd {
        Cmd::Create {
            ctid,
            template,
            hostname,
            name,
            userns,
            copy,
            ipadd,
        } => {
            let ctid: Ctid = ctid.parse()?;
            container::create(
                &host,
                ctid,
                &CreateOpts {
                    template,
                    hostname,
                    name,
                    userns,
                    copy,
                },
            )?;
            if !ipadd.is_empty() {
                let opts = SetOpts {
                    ipadd,
                    ..Default::default()
                };
                if let Err(e) = container::set(&host, ctid, &opts, true, &mut hooks) {
                    // create is all or nothing: no CT with half its settings.
                    let _ = container::destroy(&host, ctid);
                    return Err(e.into());
                }
            }
            print(json, json!({"ctid": ctid, "created": true}), || {
                println!("CT {ctid} created")
            });
        }
        Cmd::Start { ct } => {
            let ctid = resolve(&ct)?;
            hooks.shaping = shaping_of(CtConfig::load(&host, ctid)?.shaping.as_ref())
                .map_err(anyhow::Error::msg)?;
            let st = container::start(&host, ctid, &mut hooks)?;
            print(json, json!({"ctid": ctid, "init_pid": st.init_pid}), || {
                println!("CT {ctid} started (init PID {})", st.init_pid)
            });
        }
        Cmd::Stop { ct, fast } => {
            let ctid = resolve(&ct)?;
            container::stop(&host, ctid, fast, &mut hooks)?;
            print(json, json!({"ctid": ctid, "stopped": true}), || {
                println!("CT {ctid} stopped")
            });
        }
        Cmd::Restart { ct } => {
            let ctid = resolve(&ct)?;
            hooks.shaping = shaping_of(CtConfig::load(&host, ctid)?.shaping.as_ref())
                .map_err(anyhow::Error::msg)?;
            let st = container::restart(&host, ctid, &mut hooks)?;
            print(json, json!({"ctid": ctid, "init_pid": st.init_pid}), || {
                println!("CT {ctid} restarted (init PID {})", st.init_pid)
            });
        }
        Cmd::Destroy { ct } => {
            let ctid = resolve(&ct)?;
            container::destroy(&host, ctid)?;
            print(json, json!({"ctid": ctid, "destroyed": true}), || {
                println!("CT {ctid} destroyed")
            });
        }
        Cmd::Status { ct } => {
            let ctid = resolve(&ct)?;
            let st = container::status(&host, ctid)?;
            let mut v = serde_json::to_value(&st)?;
            // Only a running CT has live shaping; reading it needs the bpffs pins (root), and
            // a failure there must not hide the rest of the status.
            let shaping = if matches!(st.state, State::Running | State::Suspended) {
                match ct_shaping(&pin_dir, ctid.get()) {
                    Ok(s) => s,
                    Err(e) => {
                        let msg = format!("reading CT {ctid}'s shaping: {e}");
                        tracing::warn!("{msg}");
                        v["shaping_error"] = json!(msg);
                        None
                    }
                }
            } else {
                None
            };
            v["shaping"] = serde_json::to_value(&shaping)?;
            print(json, v, || {
                println!(
                    "CT {ctid} {}{}",
                    st.state,
                    st.init_pid
                        .map(|p| format!(" (init PID {p})"))
                        .unwrap_or_default()
                );
                if let Some(s) = &shaping {
                    println!("{}", s.human());
                }
            });
        }
        Cmd::Mount { ct } => {
            let ctid = resolve(&ct)?;
            container::mount_ct(&host, ctid)?;
            print(json, json!({"ctid": ctid, "mounted": true}), || {
                println!("CT {ctid} mounted at {}", host.root_dir(ctid).display())
            });
        }
        Cmd::Umount { ct } => {
            let ctid = resolve(&ct)?;
            container::umount_ct(&host, ctid)?;
            print(json, json!({"ctid": ctid, "mounted": false}), || {
                println!("CT {ctid} unmounted")
            });
        }
        Cmd::Suspend { ct } => {
            let ctid = resolve(&ct)?;
            container::suspend(&host, ctid)?;
            print(json, json!({"ctid": ctid, "state": "suspended"}), || {
                println!("CT {ctid} suspended")
            });
        }
        Cmd::Resume { ct } => {
            let ctid = resolve(&ct)?;
            container::resume(&host, ctid)?;
            print(json, json!({"ctid": ctid, "state": "running"}), || {
                println!("CT {ctid} resumed")
            });
        }
        Cmd::Exec { ct, cmd } => {
            let ctid = resolve(&ct)?;
            let code = container::exec::exec(&host, ctid, &cmd)?;
            return Ok(code.clamp(0, 255) as u8);
        }
        Cmd::Enter { ct } => {
            let ctid = resolve(&ct)?;
            let code = container::exec::enter(&host, ctid)?;
            return Ok(code.clamp(0, 255) as u8);
        }
        Cmd::Set(a) => {
            let ctid = resolve(&a.ct)?;
            let ipdel = if a.ipdel.is_empty() {
                None
            } else if a.ipdel.iter().any(|x| x == "all") {
                Some(AddrSelection::All)
            } else {
                Some(AddrSelection::Some(
                    a.ipdel
                        .iter()
                        .map(|x| {
                            x.parse::<IpAddr>().with_context(|| {
                                format!("--ipdel {x:?}: not an IP address or `all`")
                            })
                        })
                        .collect::<Result<_>>()?,
                ))
            };
            let netif_add = a
                .netif_add
                .iter()
                .map(|s| BridgedIface::parse_vzctl(s))
                .collect::<Result<Vec<_>, _>>()?;
            let netif_del = a
                .netif_del
                .as_ref()
                .map(|n| if n == "all" { None } else { Some(n.clone()) });
            let shaping = shaping_change(&host, ctid, &a)?;
            let opts = SetOpts {
                shaping: shaping
                    .as_ref()
                    .map(|c| toml::Table::try_from(c.clone().unwrap_or_default()))
                    .transpose()?,
                ipadd: a.ipadd,
                ipdel,
                netif_add,
                netif_del,
                nameservers: a.nameserver,
                searchdomains: a.searchdomain,
                hostname: a.hostname,
                name: a.name,
                resources: ResourceConfig {
                    memory: a.memory,
                    swap: a.swap,
                    cpuunits: a.cpuunits,
                    cpulimit: a.cpulimit,
                    cpus: a.cpus,
                    numproc: a.numproc,
                    ioweight: a.ioweight,
                    diskspace: a.diskspace,
                },
            };
            container::set(&host, ctid, &opts, a.save, &mut hooks)?;
            if let Some(new) = &shaping {
                let st = container::status(&host, ctid)?;
                if matches!(st.state, State::Running | State::Suspended) {
                    hooks
                        .apply_shaping(ctid, &st.net, new.as_ref())
                        .map_err(anyhow::Error::msg)?;
                    record_live_shaping(&host, ctid, opts.shaping.clone())?;
                }
            }
            print(json, json!({"ctid": ctid, "saved": a.save}), || {
                println!(
                    "CT {ctid} updated{}",
                    if a.save { " and saved" } else { "" }
                )
            });
        }
        Cmd::List {
            all,
            output,
            no_header,
            list_fields,
        } => {
            if list_fields {
                for (f, doc) in FIELDS {
                    println!("{f:<16} {doc}");
                }
                return Ok(0);
            }
            list(
                &host,
                all,
                output.as_deref(),
                no_header,
                json,
                cli.bpffs.as_deref(),
            )?;
        }
        Cmd::Template(t) => template(&host, t, json)?,
        Cmd::Netstat {
            ct,
            class,
            v4,
            v6,
            reset,
        } => {
            let dp = Datapath::open_or_load(&pin_dir)?;
            let rows = dp.counters()?;
            let only = ct.as_deref().map(resolve).transpose()?.map(|c| c.get());
            let shaping = shaping_summaries(&pin_dir, only)?;
            let base_path = host.run.join("netstat.baseline.json");
            if reset {
                std::fs::create_dir_all(&host.run)?;
                Baseline::save(&rows, &shaping, &base_path)
                    .with_context(|| format!("write {}", base_path.display()))?;
            }
            let filter = Filter {
                ctid: only,
                class,
                family: if v4 {
                    Some(Family::V4)
                } else if v6 {
                    Some(Family::V6)
                } else {
                    None
                },
            };
            let out = aggregate(&rows, &shaping, &filter, &Baseline::load(&base_path));
            print(json, serde_json::to_value(&out)?, || {
                print!("{}", netstat::table(&out))
            });
        }
        Cmd::Shaper(ShaperCmd::Status { ct }) => {
            let backend = berth::shaper::backend_status()?;
            let mut v = json!({ "backend": backend });
            if let Some(ct) = ct {
                let ctid = resolve(&ct)?;
                let cfg = CtConfig::load(&host, ctid)?;
                v["ctid"] = json!(ctid);
                v["configured"] =
                    json!(shaping_of(cfg.shaping.as_ref()).map_err(anyhow::Error::msg)?);
                if container::running(&host, ctid).is_some() {
                    let live = hooks.shaper().map_err(anyhow::Error::msg)?.status(ctid)?;
                    v["live"] = serde_json::to_value(&live)?;
                }
            }
            print(json, v.clone(), || {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
            });
        }
        Cmd::Netclass(c) => {
            let mut dp =
                Datapath::open_or_load(cli.bpffs.as_deref().unwrap_or(Path::new(DEFAULT_PIN_DIR)))?;
            match c {
                NetclassCmd::Load { file } => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("read {}", file.display()))?;
                    let entries = parse_networks_classes(&text)
                        .with_context(|| format!("{}", file.display()))?;
                    dp.load_classes(&entries)?;
                    print(json, json!({"loaded": entries.len()}), || {
                        println!("{} class entries loaded", entries.len())
                    });
                }
                NetclassCmd::List => {
                    let entries = dp.classes()?;
                    let v: Vec<Value> = entries
                        .iter()
                        .map(|e| json!({"class": e.class, "net": e.net.to_string()}))
                        .collect();
                    print(json, Value::Array(v), || {
                        for e in &entries {
                            println!("{} {}", e.class, e.net);
                        }
                    });
                }
            }
        }
        Cmd::Gc => {
            let rep = container::gc(&host, &mut hooks)?;
            print(json, serde_json::to_value(&rep)?, || {
                println!(
                    "cleaned {} CT(s), {} orphan cgroup(s), {} partial create(s)",
                    rep.cleaned.len(),
                    rep.orphan_cgroups.len(),
                    rep.partial_creates.len()
                );
                for e in &rep.errors {
                    eprintln!("berth: gc: {e}");
                }
            });
            if !rep.errors.is_empty() {
                bail!("gc finished with {} error(s)", rep.errors.len());
            }
        }
    }
    Ok(0)
}

/// CT `ctid`'s live shaping, read without loading anything; `None` when it is not shaped.
fn ct_shaping(pin_dir: &Path, ctid: u32) -> Result<Option<ShapingReport>> {
    Ok(match ShapingReader::open(pin_dir)? {
        Some(mut r) => r.read(ctid)?,
        None => None,
    })
}

/// Each shaped CT's rates and drops (only `only` when given), read without loading anything.
fn shaping_summaries(pin_dir: &Path, only: Option<u32>) -> Result<BTreeMap<u32, CtShapingSummary>> {
    let mut out = BTreeMap::new();
    let Some(mut reader) = ShapingReader::open(pin_dir)? else {
        return Ok(out);
    };
    for ctid in reader.shaped_cts() {
        if only.is_some_and(|c| c != ctid) {
            continue;
        }
        if let Some(r) = reader.read(ctid)? {
            out.insert(ctid, CtShapingSummary::from(&r));
        }
    }
    Ok(out)
}

/// Keeps what `set` applied live in the CT's run state (see [`RunState::shaping`]).
fn record_live_shaping(host: &Host, ctid: Ctid, table: Option<toml::Table>) -> Result<()> {
    let path = host.state_path(ctid);
    if let Some(mut st) = RunState::read(&path)
        .with_context(|| format!("read {}", path.display()))?
        .filter(RunState::alive)
    {
        st.shaping = table;
        st.write(&path)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// The CT's shaping after `set`'s shaping flags (None: no shaping flag given), validated
/// before anything changes. `Some(None)` removes all shaping.
fn shaping_change(host: &Host, ctid: Ctid, a: &SetArgs) -> Result<Option<Option<ShapingConfig>>> {
    if a.rate_in.is_none()
        && a.rate_out.is_none()
        && a.burst.is_none()
        && a.class_rate.is_empty()
        && a.pps_in.is_none()
        && a.pps_out.is_none()
    {
        return Ok(None);
    }
    let cfg = CtConfig::load(host, ctid)?;
    // A running CT's unsaved shaping is the base, like its unsaved addresses.
    let live = RunState::read(&host.state_path(ctid))
        .ok()
        .flatten()
        .filter(RunState::alive)
        .and_then(|st| st.shaping);
    let mut sc = shaping_of(live.as_ref().or(cfg.shaping.as_ref()))
        .map_err(anyhow::Error::msg)?
        .unwrap_or_default();
    if let Some(r) = &a.rate_in {
        sc.rate_in = parse_optional_rate("--rate-in", r)?;
    }
    if let Some(r) = &a.rate_out {
        sc.rate_out = parse_optional_rate("--rate-out", r)?;
    }
    if let Some(b) = &a.burst {
        sc.burst = if b.trim().eq_ignore_ascii_case("none") {
            None
        } else {
            Some(berth::shaper::Size::parse("--burst", b)?)
        };
    }
    for c in &a.class_rate {
        sc.set_class(ClassRate::parse(c)?);
    }
    if let Some(p) = &a.pps_in {
        sc.pps_in = ShapingConfig::parse_pps("--pps-in", p)?;
    }
    if let Some(p) = &a.pps_out {
        sc.pps_out = ShapingConfig::parse_pps("--pps-out", p)?;
    }
    sc.validate(DEFAULT_MTU)?;
    Ok(Some((!sc.is_empty()).then_some(sc)))
}

const FIELDS: &[(&str, &str)] = &[
    ("ctid", "container ID"),
    ("name", "name set with --name"),
    ("hostname", "host name"),
    ("status", "running, suspended, mounted or stopped"),
    ("template", "template the CT was created from"),
    ("init_pid", "host PID of the CT's init"),
    ("numproc", "processes and threads in the CT"),
    ("numproc.l", "process limit (--numproc)"),
    ("memory.usage", "memory in use, bytes"),
    ("memory.limit", "memory limit, bytes"),
    ("memory.failcnt", "times the memory limit was hit"),
    ("oom_kills", "processes killed by the OOM killer"),
    ("cpu.usage", "CPU time used, seconds"),
    ("cpu.throttled", "periods the CPU limit throttled the CT"),
    ("cpulimit", "CPU limit, percent of one CPU"),
    ("cpuunits", "CPU weight"),
    ("diskspace", "disk quota"),
    ("ip", "routed and static addresses"),
    (
        "traffic.in",
        "bytes delivered to the CT, all classes (eBPF counters, never reset)",
    ),
    ("traffic.out", "bytes sent by the CT, all classes"),
    ("packets.in", "packets delivered to the CT"),
    ("packets.out", "packets sent by the CT"),
    ("drops", "packets dropped by anti-spoofing, all reasons"),
];

/// Per-CT traffic totals for `list -o traffic.*` (read once per listing).
#[derive(Default, Clone, Copy)]
struct Traffic {
    in_bytes: u64,
    out_bytes: u64,
    in_packets: u64,
    out_packets: u64,
    drops: u64,
}

fn traffic_by_ct(bpffs: Option<&Path>) -> Result<std::collections::HashMap<u32, Traffic>> {
    let dp = Datapath::open_or_load(bpffs.unwrap_or(Path::new(DEFAULT_PIN_DIR)))?;
    let mut m: std::collections::HashMap<u32, Traffic> = Default::default();
    for r in dp.counters()? {
        let t = m.entry(r.ctid).or_default();
        match r.dir {
            Direction::In => {
                t.in_bytes += r.bytes;
                t.in_packets += r.packets;
            }
            Direction::Out => {
                t.out_bytes += r.bytes;
                t.out_packets += r.packets;
            }
        }
    }
    for d in dp.drops()? {
        m.entry(d.ctid).or_default().drops += d.packets;
    }
    Ok(m)
}

fn field(
    f: &str,
    st: &container::Status,
    cfg: &CtConfig,
    stats: Option<&Stats>,
    traffic: Option<Traffic>,
) -> Result<Value> {
    let r = &cfg.resources;
    let t = traffic.unwrap_or_default();
    Ok(match f {
        "traffic.in" => json!(t.in_bytes),
        "traffic.out" => json!(t.out_bytes),
        "packets.in" => json!(t.in_packets),
        "packets.out" => json!(t.out_packets),
        "drops" => json!(t.drops),
        "ctid" => json!(st.ctid),
        "name" => json!(st.name),
        "hostname" => json!(st.hostname),
        "status" => json!(st.state),
        "template" => json!(st.template),
        "init_pid" => json!(st.init_pid),
        "numproc" => json!(stats.map(|s| s.numproc)),
        "numproc.l" => json!(r.numproc),
        "memory.usage" => json!(stats.map(|s| s.memory_usage)),
        "memory.limit" => json!(stats.and_then(|s| s.memory_limit)),
        "memory.failcnt" => json!(stats.map(|s| s.memory_failcnt)),
        "oom_kills" => json!(stats.map(|s| s.oom_kills)),
        "cpu.usage" => json!(stats.map(|s| s.cpu_usage_ns as f64 / 1e9)),
        "cpu.throttled" => json!(stats.map(|s| s.nr_throttled)),
        "cpulimit" => json!(r.cpulimit),
        "cpuunits" => json!(r.cpuunits),
        "diskspace" => json!(r.diskspace.map(|d| d.to_string())),
        "ip" => json!(
            cfg.net
                .all_addrs()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => bail!("unknown field {other:?} (see `berth list -L`)"),
    })
}

fn list(
    host: &Host,
    all: bool,
    output: Option<&str>,
    no_header: bool,
    json: bool,
    bpffs: Option<&Path>,
) -> Result<()> {
    let fields: Vec<&str> = output
        .unwrap_or("ctid,numproc,status,ip,hostname")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for f in &fields {
        if !FIELDS.iter().any(|(n, _)| n == f) {
            bail!("unknown field {f:?} (see `berth list -L`)");
        }
    }
    let traffic = if fields
        .iter()
        .any(|f| f.starts_with("traffic.") || f.starts_with("packets.") || *f == "drops")
    {
        Some(traffic_by_ct(bpffs)?)
    } else {
        None
    };
    let mut rows: Vec<Vec<Value>> = Vec::new();
    for ctid in host.list_ctids()? {
        let st = match container::status(host, ctid) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%ctid, error = %e, "skipping CT");
                continue;
            }
        };
        if !all && !matches!(st.state, State::Running | State::Suspended) {
            continue;
        }
        let cfg = CtConfig::load(host, ctid)?;
        let stats = container::stats(host, ctid).ok().flatten();
        rows.push(
            fields
                .iter()
                .map(|f| {
                    field(
                        f,
                        &st,
                        &cfg,
                        stats.as_ref(),
                        traffic.as_ref().and_then(|t| t.get(&ctid.get()).copied()),
                    )
                })
                .collect::<Result<_>>()?,
        );
    }
    if json {
        let arr: Vec<Value> = rows
            .iter()
            .map(|r| {
                Value::Object(
                    fields
                        .iter()
                        .zip(r)
                        .map(|(f, v)| (f.to_string(), v.clone()))
                        .collect(),
                )
            })
            .collect();
        println!("{}", Value::Array(arr));
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|v| match v {
                    Value::Null => "-".into(),
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n
                        .as_f64()
                        .filter(|_| n.is_f64())
                        .map(|f| format!("{f:.2}"))
                        .unwrap_or_else(|| n.to_string()),
                    v => v.to_string(),
                })
                .collect()
        })
        .collect();
    let header: Vec<String> = fields.iter().map(|f| f.to_uppercase()).collect();
    let mut width: Vec<usize> = header.iter().map(String::len).collect();
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.len());
        }
    }
    let line = |r: &[String]| {
        r.iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>w$}", w = width[i]))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if !no_header {
        println!("{}", line(&header));
    }
    for r in &cells {
        println!("{}", line(r));
    }
    Ok(())
}

fn template(host: &Host, t: TemplateCmd, json: bool) -> Result<()> {
    host.ensure_dirs()?;
    let store = TemplateStore::open(host.template_dir())?;
    match t {
        TemplateCmd::List => {
            let list = store.list()?;
            print(json, serde_json::to_value(&list)?, || {
                println!("{:<20} {:<10} {:>10}", "NAME", "KIND", "SIZE");
                for t in &list {
                    println!(
                        "{:<20} {:<10} {:>10}",
                        t.name,
                        format!("{:?}", t.kind).to_lowercase(),
                        Size::Bytes(t.size).to_string()
                    );
                }
            });
        }
        TemplateCmd::Import { file, name } => {
            let info = store
                .import(&file, name.as_deref())
                .with_context(|| format!("import template {}", file.display()))?;
            print(json, serde_json::to_value(&info)?, || {
                println!("template {} imported", info.name)
            });
        }
        TemplateCmd::Build(BuildCmd::Busybox { name }) => {
            let info = store.build_busybox(&name)?;
            print(json, serde_json::to_value(&info)?, || {
                println!("template {} built", info.name)
            });
        }
        TemplateCmd::Build(BuildCmd::Debian {
            suite,
            name,
            mirror,
        }) => {
            let name = name.unwrap_or_else(|| format!("debian-{suite}"));
            let info = store.build_debian(&suite, &name, mirror.as_deref())?;
            print(json, serde_json::to_value(&info)?, || {
                println!("template {} built", info.name)
            });
        }
        TemplateCmd::Remove { name } => {
            let users = container::template_users(host, &name)?;
            if !users.is_empty() {
                bail!(
                    "template {name} is in use by CT(s) {}: their files are an overlay over it",
                    users
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            store.remove(&name)?;
            print(json, json!({"removed": name}), || {
                println!("template {name} removed")
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod error_text_tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("CT 7: open /x: {source}")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Outer { source: io }).context("start CT 7");
        assert_eq!(error_text(&e), "start CT 7: CT 7: open /x: no such file");
    }
}
