//! Every metric berthd exports: name, type, labels and help, in one table. The collector,
//! the descriptors, the README's list and the dashboards test all read it.

use prometheus::proto::MetricType;

/// One exported metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// The name as Prometheus stores it (counters end in `_total`).
    pub name: &'static str,
    pub kind: Kind,
    /// The labels every series has; `name` (the CT's name) is added where a CT has one
    /// (see [`MetricDef::ct_name`]).
    pub labels: &'static [&'static str],
    /// Series carry the CT's `name` label when it is set (cAdvisor-compatible families).
    pub ct_name: bool,
    pub help: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    pub fn proto(self) -> MetricType {
        match self {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
        }
    }
}

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    ct_name: bool,
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Counter,
        labels,
        ct_name,
        help,
    }
}

const fn gauge(
    name: &'static str,
    labels: &'static [&'static str],
    ct_name: bool,
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Gauge,
        labels,
        ct_name,
        help,
    }
}

const CT: &[&str] = &["ctid"];
const NET: &[&str] = &["ctid", "class", "family"];
const DROP: &[&str] = &["ctid", "direction", "reason"];

// ---- traffic, from the pinned eBPF maps (direction from the CT's point of view) -----------

pub const NET_RX_BYTES: MetricDef = counter(
    "berth_network_receive_bytes_total",
    NET,
    false,
    "Bytes delivered to the CT (host-side interface egress) by peer class and address family; \
     Ethernet frames by default, IP packets with byte_layer L3.",
);
pub const NET_TX_BYTES: MetricDef = counter(
    "berth_network_transmit_bytes_total",
    NET,
    false,
    "Bytes sent by the CT (host-side interface ingress) by peer class and address family; \
     Ethernet frames by default, IP packets with byte_layer L3.",
);
pub const NET_RX_PACKETS: MetricDef = counter(
    "berth_network_receive_packets_total",
    NET,
    false,
    "Packets delivered to the CT, as segments on the wire (a GSO packet counts gso_segs).",
);
pub const NET_TX_PACKETS: MetricDef = counter(
    "berth_network_transmit_packets_total",
    NET,
    false,
    "Packets sent by the CT, as segments on the wire (a GSO packet counts gso_segs).",
);
pub const NET_DROPS: MetricDef = counter(
    "berth_network_drops_total",
    DROP,
    false,
    "Packets the datapath dropped, by direction (receive = to the CT, transmit = from it) \
     and reason (spoofed_ip, spoofed_mac, non_ip, bad_dst, malformed, unknown).",
);
pub const NET_DROP_BYTES: MetricDef = counter(
    "berth_network_dropped_bytes_total",
    DROP,
    false,
    "Bytes (whole frames) of the packets the datapath dropped, by direction and reason.",
);

// cAdvisor's names, summed over classes and families, for dashboards made for cAdvisor.
pub const C_NET_RX_BYTES: MetricDef = counter(
    "container_network_receive_bytes_total",
    CT,
    true,
    "Bytes delivered to the CT, all classes and families (berth_network_receive_bytes_total \
     summed).",
);
pub const C_NET_TX_BYTES: MetricDef = counter(
    "container_network_transmit_bytes_total",
    CT,
    true,
    "Bytes sent by the CT, all classes and families (berth_network_transmit_bytes_total summed).",
);
pub const C_NET_RX_PACKETS: MetricDef = counter(
    "container_network_receive_packets_total",
    CT,
    true,
    "Packets delivered to the CT, all classes and families.",
);
pub const C_NET_TX_PACKETS: MetricDef = counter(
    "container_network_transmit_packets_total",
    CT,
    true,
    "Packets sent by the CT, all classes and families.",
);
pub const C_NET_RX_DROPPED: MetricDef = counter(
    "container_network_receive_packets_dropped_total",
    CT,
    true,
    "Packets to the CT the datapath dropped, all reasons.",
);
pub const C_NET_TX_DROPPED: MetricDef = counter(
    "container_network_transmit_packets_dropped_total",
    CT,
    true,
    "Packets from the CT the datapath dropped, all reasons (spoofing among them).",
);

// ---- shaping, read back from the kernel (HTB classes, packet-rate buckets) ------------------

const SHAPE_RATE: &[&str] = &["ctid", "direction", "class"];
const SHAPE_DIR: &[&str] = &["ctid", "direction"];

pub const SHAPING_RATE: MetricDef = gauge(
    "berth_shaping_rate_bytes",
    SHAPE_RATE,
    false,
    "Configured rate in bytes per second (×8 for what --rate-in/--rate-out/--class-rate set \
     in bit/s), by direction (receive = to the CT, transmit = from it) and class: `all` for \
     the CT's total, a network class number for a class rate (capped at the total, as \
     enforced). Absent while the direction is not shaped. Compare with \
     rate(berth_network_*_bytes_total), which counts the same Ethernet frames.",
);
pub const SHAPING_PPS_LIMIT: MetricDef = gauge(
    "berth_shaping_pps_limit",
    SHAPE_DIR,
    false,
    "Packet-rate limit in packets per second (--pps-in/--pps-out), by direction; absent \
     without a limit.",
);
pub const SHAPING_OVERLIMITS: MetricDef = counter(
    "berth_shaping_overlimits_total",
    SHAPE_DIR,
    false,
    "Times the CT's traffic had to wait because it exceeded its rate (HTB leaf overlimits), by \
     direction; present while the CT is shaped, restarts from 0 when its shaping is set up \
     anew.",
);
pub const SHAPING_DROPS: MetricDef = counter(
    "berth_shaping_dropped_packets_total",
    DROP,
    false,
    "Packets the shaper dropped, by direction and reason: queue (a shaping queue was full; \
     present while the direction has a rate, restarts from 0 when the CT's shaping is set up \
     anew) and pps (over the packet-rate limit; present while the direction has one, kept \
     across restarts like the traffic counters).",
);

// ---- cgroup counters (cAdvisor names), present while the CT's cgroup exists -----------------

pub const CPU_USAGE: MetricDef = counter(
    "container_cpu_usage_seconds_total",
    CT,
    true,
    "CPU time consumed by the CT's tasks (cpuacct.usage / cpu.stat usage_usec).",
);
pub const CPU_USER: MetricDef = counter(
    "container_cpu_user_seconds_total",
    CT,
    true,
    "CPU time the CT's tasks spent in user mode.",
);
pub const CPU_SYSTEM: MetricDef = counter(
    "container_cpu_system_seconds_total",
    CT,
    true,
    "CPU time the CT's tasks spent in kernel mode.",
);
pub const CFS_PERIODS: MetricDef = counter(
    "container_cpu_cfs_periods_total",
    CT,
    true,
    "CFS bandwidth periods elapsed while the CT had runnable tasks and a CPU limit.",
);
pub const CFS_THROTTLED_PERIODS: MetricDef = counter(
    "container_cpu_cfs_throttled_periods_total",
    CT,
    true,
    "CFS bandwidth periods in which the CT was throttled by its CPU limit.",
);
pub const CFS_THROTTLED_SECONDS: MetricDef = counter(
    "container_cpu_cfs_throttled_seconds_total",
    CT,
    true,
    "Time the CT's tasks were throttled by its CPU limit.",
);
pub const SPEC_CPU_QUOTA: MetricDef = gauge(
    "container_spec_cpu_quota",
    CT,
    true,
    "CPU limit: microseconds of CPU time per period (absent when unlimited).",
);
pub const SPEC_CPU_PERIOD: MetricDef = gauge(
    "container_spec_cpu_period",
    CT,
    true,
    "CFS period in microseconds that container_spec_cpu_quota applies to (absent when unlimited).",
);
pub const MEM_USAGE: MetricDef = gauge(
    "container_memory_usage_bytes",
    CT,
    true,
    "Memory charged to the CT, page cache included.",
);
pub const MEM_WORKING_SET: MetricDef = gauge(
    "container_memory_working_set_bytes",
    CT,
    true,
    "Memory usage minus inactive file cache (what cAdvisor calls the working set).",
);
pub const MEM_CACHE: MetricDef = gauge(
    "container_memory_cache",
    CT,
    true,
    "Page cache charged to the CT, in bytes.",
);
pub const MEM_RSS: MetricDef = gauge(
    "container_memory_rss",
    CT,
    true,
    "Anonymous memory of the CT, in bytes.",
);
pub const MEM_SWAP: MetricDef = gauge(
    "container_memory_swap",
    CT,
    true,
    "Swap used by the CT, in bytes.",
);
pub const SPEC_MEM_LIMIT: MetricDef = gauge(
    "container_spec_memory_limit_bytes",
    CT,
    true,
    "Memory limit of the CT (absent when unlimited).",
);
pub const SPEC_SWAP_LIMIT: MetricDef = gauge(
    "container_spec_memory_swap_limit_bytes",
    CT,
    true,
    "Swap the CT may use on top of its memory limit (absent when unlimited).",
);
// A gauge although it only rises while the cgroup lives: cAdvisor's name has no _total
// suffix, which the text format's linters and OpenMetrics require of counters.
pub const MEM_FAILCNT: MetricDef = gauge(
    "container_memory_failcnt",
    CT,
    true,
    "Times the CT hit its memory (or memory+swap) limit since its cgroup was created; only \
     rises while the CT runs (use increase()).",
);
pub const OOM_EVENTS: MetricDef = counter(
    "container_oom_events_total",
    CT,
    true,
    "Processes of the CT killed by the OOM killer.",
);
pub const PROCESSES: MetricDef = gauge(
    "container_processes",
    CT,
    true,
    "Processes (thread groups) in the CT.",
);
pub const THREADS: MetricDef = gauge(
    "container_threads",
    CT,
    true,
    "Tasks (threads) in the CT, what pids.current and OpenVZ numproc count.",
);
pub const THREADS_MAX: MetricDef = gauge(
    "container_threads_max",
    CT,
    true,
    "Task limit of the CT (pids.max, berth set --numproc; absent when unlimited).",
);
pub const NUMPROC_FAILURES: MetricDef = counter(
    "berth_container_numproc_failures_total",
    CT,
    true,
    "Forks refused because the CT reached its task limit (pids.events max).",
);
pub const FS_READ_BYTES: MetricDef = counter(
    "container_fs_reads_bytes_total",
    CT,
    true,
    "Bytes the CT read from block devices, all devices.",
);
pub const FS_WRITE_BYTES: MetricDef = counter(
    "container_fs_writes_bytes_total",
    CT,
    true,
    "Bytes the CT wrote to block devices, all devices.",
);
pub const FS_READS: MetricDef = counter(
    "container_fs_reads_total",
    CT,
    true,
    "Read requests the CT completed on block devices, all devices.",
);
pub const FS_WRITES: MetricDef = counter(
    "container_fs_writes_total",
    CT,
    true,
    "Write requests the CT completed on block devices, all devices.",
);
pub const START_TIME: MetricDef = gauge(
    "container_start_time_seconds",
    CT,
    true,
    "Unix time the running CT was started; cgroup counters restart from 0 at a new start.",
);

// ---- inventory ---------------------------------------------------------------------------

pub const INFO: MetricDef = gauge(
    "berth_container_info",
    &["ctid", "name", "hostname", "template"],
    false,
    "Always 1, one series per CT with a config; labels carry its name, hostname and template.",
);
pub const STATE: MetricDef = gauge(
    "berth_container_state",
    &["ctid", "state"],
    false,
    "1 for the CT's current state (running, suspended, mounted, stopped), 0 for the others.",
);

// ---- the exporter itself -----------------------------------------------------------------

pub const SOURCE_UP: MetricDef = gauge(
    "berth_exporter_source_up",
    &["source"],
    false,
    "1 if the source (configs, cgroups, datapath, shaper) was read in this scrape, 0 if \
     reading it failed or (datapath) nothing is pinned; its series are missing then. A host \
     where no CT was ever shaped has no shaper to read and reports 1.",
);
pub const COLLECT_SECONDS: MetricDef = gauge(
    "berth_exporter_collect_duration_seconds",
    &[],
    false,
    "Time this scrape spent reading configs, run states, cgroups, the pinned maps and the \
     shaper (and writing the CTs' samples, which happens alongside).",
);

// ---- billing, from berthd's ledger (refreshed at every tick, not at scrape time) -------------

pub const BILLING_PERIOD_BYTES: MetricDef = gauge(
    "berth_billing_period_bytes",
    &["ctid", "uuid", "direction", "class"],
    false,
    "Bytes billed so far in the CT's current billing period, by direction (the CT's point of \
     view) and peer class, both address families; as of berthd's last ledger tick.",
);
pub const BILLING_P95: MetricDef = gauge(
    "berth_billing_p95_bytes_per_second",
    &["ctid", "uuid", "direction"],
    false,
    "95th percentile of the 5-minute rates of the CT's current billing period (per-direction \
     mode) in bytes per second: the bill's bit/s (rounded down) divided by 8; as of berthd's \
     last ledger tick.",
);
pub const QUOTA_USED: MetricDef = gauge(
    "berth_quota_used_bytes",
    &["ctid", "uuid"],
    false,
    "Bytes counted against the CT's transfer quota in its current billing period (its counted \
     direction(s) and classes); as of berthd's last ledger tick.",
);
pub const QUOTA_LIMIT: MetricDef = gauge(
    "berth_quota_limit_bytes",
    &["ctid", "uuid"],
    false,
    "The CT's transfer quota (soft limit) for the current period, top-ups included.",
);
pub const QUOTA_HARD_LIMIT: MetricDef = gauge(
    "berth_quota_hard_limit_bytes",
    &["ctid", "uuid"],
    false,
    "The CT's hard transfer limit for the current period, top-ups included (absent: none).",
);
pub const QUOTA_STATE: MetricDef = gauge(
    "berth_quota_state",
    &["ctid", "uuid", "state"],
    false,
    "1 for the CT's current quota state (normal, warned, throttled, cut, suspended, stopped), \
     0 for the others.",
);
pub const QUOTA_WEBHOOK_BACKLOG: MetricDef = gauge(
    "berth_quota_webhook_backlog",
    &[],
    false,
    "Quota events queued for a webhook and not yet acknowledged with a 2xx.",
);
pub const QUOTA_WEBHOOK_FAILING: MetricDef = gauge(
    "berth_quota_webhook_failing",
    &[],
    false,
    "Queued quota events whose last delivery attempt failed (retried with backoff).",
);

// ---- fleet shipping (berthd --ship-url): the ledger into the central PostgreSQL ------------

pub const SHIP_LAG: MetricDef = gauge(
    "berth_billing_ship_lag_seq",
    &[],
    false,
    "Ledger ticks not yet acknowledged by the central database (berthd --ship-url), as of the \
     last shipping round; grows while the database is unreachable.",
);
pub const SHIP_ACKED: MetricDef = gauge(
    "berth_billing_ship_acked_seq",
    &[],
    false,
    "The last ledger seq the central database acknowledged for this node.",
);
pub const SHIP_LAST_SUCCESS: MetricDef = gauge(
    "berth_billing_ship_last_success_timestamp_seconds",
    &[],
    false,
    "Unix time of the last shipping round that caught up with the ledger (0: none yet).",
);
pub const SHIP_FAILURES: MetricDef = counter(
    "berth_billing_ship_failures_total",
    &[],
    false,
    "Shipping rounds that failed (database unreachable, refused, TLS); each is retried with \
     backoff and loses nothing.",
);

/// Every family, in the order they are documented.
pub const ALL: &[MetricDef] = &[
    NET_RX_BYTES,
    NET_TX_BYTES,
    NET_RX_PACKETS,
    NET_TX_PACKETS,
    NET_DROPS,
    NET_DROP_BYTES,
    C_NET_RX_BYTES,
    C_NET_TX_BYTES,
    C_NET_RX_PACKETS,
    C_NET_TX_PACKETS,
    C_NET_RX_DROPPED,
    C_NET_TX_DROPPED,
    SHAPING_RATE,
    SHAPING_PPS_LIMIT,
    SHAPING_OVERLIMITS,
    SHAPING_DROPS,
    CPU_USAGE,
    CPU_USER,
    CPU_SYSTEM,
    CFS_PERIODS,
    CFS_THROTTLED_PERIODS,
    CFS_THROTTLED_SECONDS,
    SPEC_CPU_QUOTA,
    SPEC_CPU_PERIOD,
    MEM_USAGE,
    MEM_WORKING_SET,
    MEM_CACHE,
    MEM_RSS,
    MEM_SWAP,
    SPEC_MEM_LIMIT,
    SPEC_SWAP_LIMIT,
    MEM_FAILCNT,
    OOM_EVENTS,
    PROCESSES,
    THREADS,
    THREADS_MAX,
    NUMPROC_FAILURES,
    FS_READ_BYTES,
    FS_WRITE_BYTES,
    FS_READS,
    FS_WRITES,
    START_TIME,
    INFO,
    STATE,
    BILLING_PERIOD_BYTES,
    BILLING_P95,
    QUOTA_USED,
    QUOTA_LIMIT,
    QUOTA_HARD_LIMIT,
    QUOTA_STATE,
    QUOTA_WEBHOOK_BACKLOG,
    QUOTA_WEBHOOK_FAILING,
    SHIP_LAG,
    SHIP_ACKED,
    SHIP_LAST_SUCCESS,
    SHIP_FAILURES,
    SOURCE_UP,
    COLLECT_SECONDS,
];

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_unique_and_follow_the_conventions() {
        let mut seen = HashSet::new();
        for d in ALL {
            assert!(seen.insert(d.name), "{} twice", d.name);
            assert!(
                d.name.starts_with("berth_") || d.name.starts_with("container_"),
                "{}",
                d.name
            );
            match d.kind {
                Kind::Counter => assert!(d.name.ends_with("_total"), "{}", d.name),
                Kind::Gauge => assert!(!d.name.ends_with("_total"), "{}", d.name),
            }
            assert!(d.labels.iter().all(|l| *l != "name" || !d.ct_name));
        }
    }
}
