//! The command line: clap's types for every verb and flag.

use std::net::IpAddr;
use std::path::PathBuf;

use berth_runtime::Size;
use clap::{Args, Parser, Subcommand};

mod migrate;
mod quota;
pub use migrate::{MigrateArgs, MigrateTargetCmd};
pub use quota::{QuotaArgs, QuotaCmd, QuotaFlags};

/// The help heading of the options every command takes.
const GLOBAL: &str = "Global options";

#[derive(Parser, Debug)]
#[command(
    name = "berth",
    version,
    about = "OpenVZ-style system containers on a mainline kernel"
)]
pub struct Cli {
    /// State directory (configs, private areas, templates).
    #[arg(long, global = true, env = "BERTH_ROOT", help_heading = GLOBAL)]
    pub root: Option<PathBuf>,
    /// Run-state directory (locks, init PIDs, console logs). Default: /run/berth, or <root>/run.
    #[arg(long, global = true, env = "BERTH_RUN_DIR", help_heading = GLOBAL)]
    pub run_dir: Option<PathBuf>,
    /// cgroup directory holding this installation's CTs, under every hierarchy.
    #[arg(long, global = true, env = "BERTH_CGROUP_PARENT", help_heading = GLOBAL)]
    pub cgroup_parent: Option<String>,
    /// bpffs directory of the eBPF datapath's pinned programs, maps and links.
    #[arg(long, global = true, env = "BERTH_BPFFS", help_heading = GLOBAL)]
    pub bpffs: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,
    /// More logging on stderr (-v info, -vv debug). BERTH_LOG takes tracing filter syntax.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = GLOBAL)]
    pub verbose: u8,
    /// No progress bars and no notices on stderr (errors are still printed).
    #[arg(short, long, global = true, help_heading = GLOBAL)]
    pub quiet: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a CT from a template.
    Create(Box<CreateArgs>),
    /// Boot a CT, or with --all-onboot every CT with `onboot` in boot order.
    Start {
        /// CTID or name.
        #[arg(required_unless_present = "all_onboot", conflicts_with = "all_onboot")]
        ct: Option<String>,
        /// Every CT with `onboot = true`, by `bootorder` (higher first, unset last), the CTs
        /// of one level in parallel (what the boot unit runs).
        #[arg(long)]
        all_onboot: bool,
    },
    /// Halt a CT (the distro's halt signal, then kill what is left after stop_timeout).
    Stop {
        /// CTID or name.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ct: Option<String>,
        /// Every running CT, in the reverse of the boot order (what the boot unit runs at
        /// shutdown).
        #[arg(long)]
        all: bool,
        /// Kill everything at once instead of asking init to halt.
        #[arg(long)]
        fast: bool,
    },
    /// Stop a CT (if it runs) and start it again.
    Restart {
        /// CTID or name.
        ct: String,
    },
    /// Remove a stopped CT: its files, config and cgroups.
    Destroy {
        /// CTID or name.
        ct: String,
    },
    /// A CT's state, init PID, identity, shaping and quota.
    Status {
        /// CTID or name.
        ct: String,
    },
    /// Bind-mount the CT's private area on its root directory.
    Mount {
        /// CTID or name.
        ct: String,
    },
    /// Unmount a stopped CT's root.
    Umount {
        /// CTID or name.
        ct: String,
    },
    /// Freeze every process of the CT (with --dump: checkpoint it and stop it, as vzctl chkpnt).
    Suspend {
        /// CTID or name.
        ct: String,
        /// Dump the CT with CRIU into its default checkpoint directory and stop it.
        #[arg(long)]
        dump: bool,
    },
    /// Thaw a suspended CT, or restore a CT stopped by `suspend --dump`.
    Resume {
        /// CTID or name.
        ct: String,
    },
    /// Dump a running CT with CRIU (it stops unless --keep-running).
    Checkpoint {
        /// CTID or name.
        ct: String,
        /// Image directory (default: <root>/dump/<CTID>).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Leave the CT running after the dump.
        #[arg(long)]
        keep_running: bool,
    },
    /// Restore a CT from a checkpoint made by `checkpoint`.
    Restore {
        /// CTID or name.
        ct: String,
        /// Image directory (default: <root>/dump/<CTID>).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Move a CT to another host over ssh (offline, or --live with CRIU).
    Migrate(Box<MigrateArgs>),
    /// What `migrate` runs on the target over ssh.
    #[command(subcommand, hide = true)]
    MigrateTarget(MigrateTargetCmd),
    /// Run a command in a running CT; its exit code becomes berth's.
    Exec {
        /// CTID or name.
        ct: String,
        /// The command and its arguments (no shell: `sh -c '…'` for one).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Interactive shell in a running CT.
    Enter {
        /// CTID or name.
        ct: String,
    },
    /// Change a CT's settings, live when it runs; --save persists them.
    Set(Box<SetArgs>),
    /// List CTs (running ones; -a for all).
    List(ListArgs),
    /// OS templates.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Clean what a killed berth left behind (stale state, cgroups, mounts, half-made CTs).
    Gc,
    /// Per-CT traffic by network class (vznetstat-like), from the eBPF counters.
    Netstat(NetstatArgs),
    /// Network classes (OpenVZ networks_classes: `CLASS CIDR` per line).
    #[command(subcommand)]
    Netclass(NetclassCmd),
    /// Traffic shaping.
    #[command(subcommand)]
    Shaper(ShaperCmd),
    /// The billing ledger berthd keeps: period totals, the 95th, the 5-minute record.
    Billing(BillingArgs),
    /// Transfer quotas: their state (as of berthd's last tick) and top-ups.
    Quota(QuotaArgs),
    /// Network testbeds of CTs and namespaces from a TOML topology, with built-in checks.
    #[command(subcommand)]
    Testbed(crate::testbed::TestbedCmd),
    /// Import containers from another system.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Print a shell completion script: `berth completion bash > /etc/bash_completion.d/berth`.
    Completion {
        /// The shell the script is for.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (berth.1, berth-create.1, …) into DIR (what `cargo xtask install`
    /// runs).
    #[command(hide = true)]
    Man {
        /// The directory the pages are written to (created if missing).
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImportCmd {
    /// OpenVZ (vzctl) CTs: configs, names, private areas or vzdump archives, with a report of
    /// what each setting became (MAP / APPROX / DROP).
    Vz(VzImportArgs),
}

#[derive(Args, Debug)]
pub struct VzImportArgs {
    /// A CTID, or `all` for every CTID.conf in the conf directory.
    pub target: String,
    /// The node's per-CT configs.
    #[arg(long, default_value = "/etc/vz/conf")]
    pub conf_dir: std::path::PathBuf,
    /// The node's global config (default /etc/vz/vz.conf, if present).
    #[arg(long)]
    pub vz_conf: Option<std::path::PathBuf>,
    /// The CT's simfs private area (default: VE_PRIVATE of its config).
    #[arg(long, conflicts_with = "archive")]
    pub private: Option<std::path::PathBuf>,
    /// A vzdump archive of the CT (its config is read from ./etc/vzdump/vps.conf inside).
    #[arg(long)]
    pub archive: Option<std::path::PathBuf>,
    /// Print the report and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Refuse a CT that would lose a setting that matters (a capability turned on, a device).
    #[arg(long)]
    pub strict: bool,
    /// CPUs of the source node (needed for a CPULIMIT in %).
    #[arg(long)]
    pub source_cpus: Option<u32>,
    /// Where NAMESERVER/SEARCHDOMAIN "inherit" are resolved.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: std::path::PathBuf,
    /// No user namespace: the CT's root is the host's root (for trusted workloads only).
    #[arg(long)]
    pub privileged: bool,
    /// Replace this host's network classes with the node's networks_classes when they differ
    /// (without it the import refuses).
    #[arg(long)]
    pub replace_classes: bool,
}
#[derive(Args, Debug)]
pub struct BillingArgs {
    /// The ledger berthd writes (opened read-only). Default: <root>/billing.db.
    #[arg(long, global = true, env = "BERTHD_LEDGER")]
    pub ledger: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: BillingCmd,
}

#[derive(Subcommand, Debug)]
pub enum BillingCmd {
    /// Totals per direction, class and family and the 95th of a CT's (or every CT's) period.
    Report {
        /// CTID, name or UUID (a destroyed CT by its UUID), or `all`.
        ct: String,
        /// Billing period YYYY-MM (the period starting in that month). Default: the current one.
        #[arg(long)]
        period: Option<String>,
        /// 95th-percentile mode: max, per-direction, sum or max-per-slot.
        #[arg(long, default_value = "max")]
        mode: String,
        /// RFC 4180 CSV with a header instead of a table.
        #[arg(long)]
        csv: bool,
    },
    /// The 5-minute slot record of a CT's period.
    Slots {
        /// CTID, name or UUID.
        ct: String,
        /// Billing period YYYY-MM. Default: the current one.
        #[arg(long)]
        period: Option<String>,
        /// The export an auditor can `recompute` (RFC 4180 CSV with a header).
        #[arg(long)]
        csv: bool,
    },
    /// A chart (SVG or PNG) of a CT's period: 5-minute bit/s in and out, and the billed 95th.
    Graph {
        /// CTID, name or UUID.
        ct: String,
        /// Billing period YYYY-MM. Default: the current one.
        #[arg(long)]
        period: Option<String>,
        /// The file to write, FILE.svg or FILE.png (replaced if it exists).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Ship the ledger into a central PostgreSQL (slots, period totals, CT metadata; README
    /// "Fleet"): everything past the node's acknowledged seq, then exit (or keep following).
    Ship(ShipArgs),
    /// Recompute totals and the 95th from a `slots --csv` export alone.
    Recompute {
        /// The `billing slots --csv` export.
        file: PathBuf,
        /// 95th-percentile mode: max, per-direction, sum or max-per-slot.
        #[arg(long, default_value = "max")]
        mode: String,
        /// RFC 4180 CSV with a header instead of a table.
        #[arg(long)]
        csv: bool,
        /// Recompute the period with this billing day (1–31 or `anniversary`) instead of the
        /// file's; needs --tz too.
        #[arg(long = "billing-day", value_name = "D", requires = "tz")]
        billing_day: Option<String>,
        /// Recompute the period in this IANA time zone; needs --billing-day too.
        #[arg(long = "tz", value_name = "ZONE", requires = "billing_day")]
        tz: Option<String>,
        /// Count the slots over this commit rate (100M, 1G, 100mbit…).
        #[arg(long = "commit", value_name = "RATE")]
        commit: Option<String>,
        /// Bill only these network classes (e.g. 0,1; default: every class in the file).
        #[arg(long = "classes", value_name = "LIST")]
        classes: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The new CT's numeric id (101, 4801, …).
    pub ctid: String,
    /// The OS template (`berth template list`).
    #[arg(long, visible_alias = "ostemplate", default_value = "busybox")]
    pub template: String,
    /// The CT's host name.
    #[arg(long)]
    pub hostname: Option<String>,
    /// A name the CT can be called by instead of its CTID.
    #[arg(long)]
    pub name: Option<String>,
    /// No user namespace: the CT's root is root on the host. For trusted workloads only;
    /// every other CT gets its own range of 65536 ids from the host's pool.
    #[arg(long)]
    pub privileged: bool,
    /// Accepted for compatibility: every CT without --privileged has a user namespace.
    #[arg(long, hide = true, conflicts_with = "privileged")]
    pub userns: bool,
    /// Give the CT a full copy of the template instead of an overlay over it.
    #[arg(long)]
    pub copy: bool,
    /// Routed (venet) address, IPv4 or IPv6; repeatable.
    #[arg(long = "ipadd")]
    pub ipadd: Vec<IpAddr>,
    #[command(flatten)]
    pub billing: BillingFlags,
    #[command(flatten)]
    pub quota: QuotaFlags,
}

/// The CT's billing settings, read by berthd's ledger from the config.
#[derive(Args, Debug, Default, PartialEq, Clone)]
pub struct BillingFlags {
    /// Day of the month billing periods start on, 1–31 (clamped to short months), or
    /// `anniversary`. A change takes effect at the end of the current period.
    #[arg(long = "billing-day", value_name = "D")]
    pub billing_day: Option<String>,
    /// IANA time zone of the billing periods (default UTC).
    #[arg(long = "tz", value_name = "ZONE")]
    pub tz: Option<String>,
    /// Committed rate in bit/s (100M, 1G, 100mbit…; `none` removes it): reports count the
    /// slots over it.
    #[arg(long = "commit", value_name = "RATE")]
    pub commit: Option<String>,
    /// Network classes billed (95th and billed bytes), e.g. 0,1, or `all` (the default).
    #[arg(long = "classes", value_name = "LIST")]
    pub classes: Option<String>,
}

/// vzlist's options. `-h` is vzlist's host-name pattern, so help is `--help` only here.
#[derive(Args, Debug, Default)]
#[command(disable_help_flag = true)]
pub struct ListArgs {
    /// CTs to list (CTIDs or names), whatever their state.
    pub cts: Vec<String>,
    /// All CTs, stopped ones too.
    #[arg(short, long, conflicts_with = "stopped")]
    pub all: bool,
    /// Stopped (and mounted) CTs only.
    #[arg(short = 'S', long)]
    pub stopped: bool,
    /// Comma-separated fields (see `berth list -L`).
    #[arg(short, long, conflicts_with = "name_column")]
    pub output: Option<String>,
    /// Sort by FIELD; `-FIELD` reverses.
    #[arg(short, long, value_name = "[-]FIELD", allow_hyphen_values = true)]
    pub sort: Option<String>,
    /// The name column instead of the host name (default fields only).
    #[arg(short = 'n', long = "name")]
    pub name_column: bool,
    /// CTIDs only, one a line, no header.
    #[arg(short = '1', conflicts_with_all = ["output", "name_column"])]
    pub ctids_only: bool,
    /// JSON (as --json).
    #[arg(short = 'j', id = "list_json")]
    pub json: bool,
    /// No header line.
    #[arg(short = 'H', long)]
    pub no_header: bool,
    /// Only CTs whose host name matches PATTERN (`*`, `?`).
    #[arg(short = 'h', long = "hostname", value_name = "PATTERN")]
    pub hostname: Option<String>,
    /// Only CTs whose name matches PATTERN (`*`, `?`).
    #[arg(short = 'N', long = "name_filter", value_name = "PATTERN")]
    pub name_filter: Option<String>,
    /// Only CTs with an interface (in the CT or on the host) matching PATTERN.
    #[arg(short = 'i', long = "netif", value_name = "PATTERN")]
    pub netif: Option<String>,
    /// vzlist's description filter: refused, berth CTs have no description.
    #[arg(short = 'd', long = "description", value_name = "PATTERN", hide = true)]
    pub description: Option<String>,
    /// Refused: berth has no template CTs (`berth template list` lists OS templates).
    #[arg(short = 't', hide = true)]
    pub templates: bool,
    /// List the available fields.
    #[arg(short = 'L', long)]
    pub list_fields: bool,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

#[derive(Args, Debug)]
pub struct NetstatArgs {
    /// Only this CT.
    pub ct: Option<String>,
    /// Only this network class.
    #[arg(short = 'c', long)]
    pub class: Option<u8>,
    /// IPv4 only.
    #[arg(short = '4', conflicts_with = "v6")]
    pub v4: bool,
    /// IPv6 only.
    #[arg(short = '6')]
    pub v6: bool,
    /// Start this view from zero (billing totals and the kernel counters are untouched).
    #[arg(long)]
    pub reset: bool,
}

#[derive(Subcommand, Debug)]
pub enum ShaperCmd {
    /// Which backend shapes on this host and why; with a CT, its rates, drops and overlimits.
    Status {
        /// CTID or name.
        ct: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetclassCmd {
    /// Replace the class table live from a networks_classes file.
    Load {
        /// The networks_classes file.
        file: PathBuf,
    },
    /// Show the class table.
    List,
}

#[derive(Args, Debug, Default, PartialEq)]
pub struct SetArgs {
    /// CTID or name.
    pub ct: String,
    /// Convert a stopped CT: `yes` drops its user namespace (its root becomes the host's root),
    /// `no` gives it its own id range; its files' owners are shifted to match. Alone only.
    #[arg(long, value_name = "yes|no", value_parser = parse_yes_no)]
    pub privileged: Option<bool>,
    /// The CT's host name (written into its /etc/hostname and /etc/hosts).
    #[arg(long)]
    pub hostname: Option<String>,
    /// A name the CT can be called by instead of its CTID.
    #[arg(long)]
    pub name: Option<String>,
    /// Memory limit, e.g. 512M (`unlimited` removes it). vzctl's BARRIER:LIMIT is accepted:
    /// berth has one limit and takes LIMIT.
    #[arg(long, visible_alias = "ram", value_name = "SIZE[:SIZE]", value_parser = parse_bl_size)]
    pub memory: Option<BarrierLimit<Size>>,
    /// Swap allowed on top of --memory (BARRIER:LIMIT: the LIMIT).
    #[arg(long, value_name = "SIZE[:SIZE]", value_parser = parse_bl_size)]
    pub swap: Option<BarrierLimit<Size>>,
    /// CPU weight (OpenVZ units, default 1000).
    #[arg(long)]
    pub cpuunits: Option<u64>,
    /// CPU limit in percent of one CPU (100 = one CPU, 0 = none).
    #[arg(long)]
    pub cpulimit: Option<u32>,
    /// Number of CPUs.
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Maximum number of processes (0 = none; BARRIER:LIMIT: the LIMIT).
    #[arg(long, value_name = "N[:N]", value_parser = parse_bl_u64)]
    pub numproc: Option<BarrierLimit<u64>>,
    /// Block I/O weight 10..1000.
    #[arg(long)]
    pub ioweight: Option<u32>,
    /// Disk quota (needs project quotas on the filesystem; BARRIER:LIMIT: the LIMIT).
    #[arg(long, value_name = "SIZE[:SIZE]", value_parser = parse_bl_size)]
    pub diskspace: Option<BarrierLimit<Size>>,
    /// Add a routed (venet) address, IPv4 or IPv6; repeatable.
    #[arg(long = "ipadd", value_name = "ADDR")]
    pub ipadd: Vec<IpAddr>,
    /// Remove a routed address, or `all`; repeatable.
    #[arg(long = "ipdel", value_name = "ADDR|all")]
    pub ipdel: Vec<String>,
    /// Add a bridged interface: eth<N>[,mac,host_ifname,host_mac,bridge] (vzctl syntax).
    #[arg(long = "netif_add", value_name = "SPEC")]
    pub netif_add: Vec<String>,
    /// Remove a bridged interface eth<N>, or `all`.
    #[arg(long = "netif_del", value_name = "eth<N>|all")]
    pub netif_del: Option<String>,
    /// DNS server for the CT's resolv.conf; repeatable (replaces the list).
    #[arg(long = "nameserver", value_name = "ADDR")]
    pub nameserver: Vec<IpAddr>,
    /// Search domain for the CT's resolv.conf; repeatable (replaces the list).
    #[arg(long = "searchdomain", value_name = "DOMAIN")]
    pub searchdomain: Vec<String>,
    /// Rate of traffic to the CT (tc units: kbit, mbit, gbit, bps, ...; `none` removes it).
    #[arg(long = "rate-in", value_name = "RATE")]
    pub rate_in: Option<String>,
    /// Rate of traffic from the CT.
    #[arg(long = "rate-out", value_name = "RATE")]
    pub rate_out: Option<String>,
    /// HTB burst of every class (at least one frame).
    #[arg(long = "burst", value_name = "SIZE")]
    pub burst: Option<String>,
    /// Per-network-class rates CLASS:IN:OUT (e.g. 1:100mbit:none); repeatable.
    #[arg(long = "class-rate", value_name = "CLASS:IN:OUT")]
    pub class_rate: Vec<String>,
    /// Packet-rate limit of traffic to the CT, packets/s (`none` removes it).
    #[arg(long = "pps-in", value_name = "N")]
    pub pps_in: Option<String>,
    /// Packet-rate limit of traffic from the CT.
    #[arg(long = "pps-out", value_name = "N")]
    pub pps_out: Option<String>,
    #[command(flatten)]
    pub billing: BillingFlags,
    #[command(flatten)]
    pub quota: QuotaFlags,
    /// Start the CT at boot (`berth start --all-onboot`, the boot unit); needs --save.
    #[arg(long, value_name = "yes|no", value_parser = parse_yes_no)]
    pub onboot: Option<bool>,
    /// Set USER's password in the CT's /etc/shadow (SHA-512-crypt), running or stopped, no
    /// --save needed; repeatable. The user must exist in the CT's /etc/passwd.
    #[arg(long, value_name = "USER:PASSWORD")]
    pub userpasswd: Vec<String>,
    /// Persist in the CT's config.
    #[arg(long)]
    pub save: bool,
}

/// A vzctl resource value: LIMIT, or BARRIER:LIMIT (UBC's soft and hard limits). berth's cgroup
/// limits are one number, so the LIMIT is what is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct BarrierLimit<T> {
    /// As given on the command line, for the notice.
    pub raw: String,
    pub barrier: Option<T>,
    pub limit: T,
}

fn parse_bl<T: std::str::FromStr + PartialOrd>(s: &str) -> Result<BarrierLimit<T>, String>
where
    T::Err: std::fmt::Display,
{
    let one = |v: &str| v.parse::<T>().map_err(|e| e.to_string());
    match s.split_once(':') {
        None => Ok(BarrierLimit {
            raw: s.to_owned(),
            barrier: None,
            limit: one(s)?,
        }),
        Some((b, l)) => {
            let (barrier, limit) = (one(b)?, one(l)?);
            if barrier > limit {
                return Err(format!("{s:?}: the barrier is above the limit"));
            }
            Ok(BarrierLimit {
                raw: s.to_owned(),
                barrier: Some(barrier),
                limit,
            })
        }
    }
}

fn parse_bl_size(s: &str) -> Result<BarrierLimit<Size>, String> {
    // `unlimited` sorts as no byte count: compare the byte counts, unlimited highest.
    let bl = parse_bl::<SizeOrd>(s)?;
    Ok(BarrierLimit {
        raw: bl.raw,
        barrier: bl.barrier.map(|b| b.0),
        limit: bl.limit.0,
    })
}

fn parse_bl_u64(s: &str) -> Result<BarrierLimit<u64>, String> {
    parse_bl::<u64>(s)
}

/// A [`Size`] ordered by bytes, `unlimited` above every count.
#[derive(PartialEq)]
struct SizeOrd(Size);

impl PartialOrd for SizeOrd {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        let key = |s: &Size| s.bytes().unwrap_or(u64::MAX);
        key(&self.0).partial_cmp(&key(&o.0))
    }
}

impl std::str::FromStr for SizeOrd {
    type Err = berth_runtime::size::SizeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(SizeOrd)
    }
}

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// The installed OS templates, their kinds and sizes.
    List,
    /// Import a rootfs tarball (.tar, .tar.gz, .tar.xz, .tar.zst).
    Import {
        /// The tarball.
        file: PathBuf,
        /// The template's name. Default: taken from the file name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Build a template.
    #[command(subcommand)]
    Build(BuildCmd),
    /// Remove a template no CT uses.
    Remove {
        /// The template's name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum BuildCmd {
    /// Offline, from Debian's busybox-static.
    Busybox {
        /// The template's name.
        #[arg(long, default_value = "busybox")]
        name: String,
    },
    /// A real distribution with debootstrap (needs the Debian mirror).
    Debian {
        /// The Debian release.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// The template's name. Default: debian-SUITE.
        #[arg(long)]
        name: Option<String>,
        /// The Debian mirror debootstrap downloads from. Default: debootstrap's.
        #[arg(long)]
        mirror: Option<String>,
        /// The CT's init: sysvinit (sysvinit-core, stopped with SIGPWR) or systemd
        /// (systemd-sysv, stopped with SIGRTMIN+4).
        #[arg(long, default_value = "sysvinit")]
        init: String,
    },
}

fn parse_yes_no(s: &str) -> Result<bool, String> {
    match s {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(format!("{s:?}: expected yes or no")),
    }
}

#[derive(Args, Debug)]
pub struct ShipArgs {
    /// libpq connection string: postgresql://user:pass@host:port/db (for TLS add
    /// ?sslmode=verify-full&sslrootcert=FILE) or `host=/run/postgresql dbname=billing`
    /// (PGPASSWORD is read when it has no password).
    #[arg(long, env = "BERTH_SHIP_URL")]
    pub url: String,
    /// The node's name in the central tables. Default: the host name.
    #[arg(long)]
    pub node: Option<String>,
    /// Keep shipping every --interval seconds (a failed round is retried with backoff).
    #[arg(long)]
    pub follow: bool,
    /// Seconds between two rounds with --follow.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval: u64,
    /// Without --follow: attempts before giving up on an unreachable database.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub attempts: u64,
    /// Ship everything the ledger holds again, from seq 0 (rows the database holds are left as
    /// they are: a replay writes nothing new).
    #[arg(long)]
    pub replay: bool,
    /// Slot rows per transaction (whole ticks are never split).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub page_rows: u32,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks its own definitions (unique ids across flattened flag groups) only when a
    /// command is built: do it here rather than at a user's first run.
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// Every command, argument and flag has help: walks the whole tree, hidden ones too (a
    /// hidden flag is still shown in man pages of older habits and by completions).
    #[test]
    fn every_command_and_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
            if about.trim().is_empty() {
                missing.push(format!("command `{}`", path.trim()));
            }
            for a in cmd.get_arguments() {
                // clap's own --help/--version carry clap's text.
                if matches!(a.get_id().as_str(), "help" | "version") {
                    continue;
                }
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("`{}` argument `{}`", path.trim(), a.get_id()));
                }
            }
            // clap's generated `help` subcommand mirrors the tree with clap's text.
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &path, missing);
            }
        }
        let mut cmd = super::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "no help:\n{}", missing.join("\n"));
    }

    /// The options every command takes are under their own heading, not mixed into a verb's.
    #[test]
    fn global_options_have_their_own_heading() {
        let mut cmd = super::Cli::command();
        cmd.build();
        let create = cmd.find_subcommand_mut("create").unwrap();
        let help = create.render_long_help().to_string();
        let (own, global) = help
            .split_once("Global options:")
            .expect("a global heading");
        assert!(global.contains("--root"), "{help}");
        assert!(!own.contains("--root"), "{help}");
        assert!(own.contains("--template"), "{help}");
    }
}
