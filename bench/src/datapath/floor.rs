//! What `bpf_stats` adds to every run, measured without load: the no-op and berth's `from_ct`
//! run [`TEST_RUN_REPEAT`] times each under BPF_PROG_TEST_RUN (which times the whole loop
//! itself), with statistics off and on. Hot caches, so a lower bound for the cost under load.

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use berth::datapath::Datapath;
use berth_common::program_names;
use berth_tests::{
    bpf_stats::{enable_stats, prog_stats},
    datapath::skb_ctx,
};

use super::report::FloorProbe;
use super::topology::{CT_V4, HOST_V4};

pub const TEST_RUN_REPEAT: u32 = 2_000_000;

/// A TCP segment the CT sends to the host (the shape the load consists of).
fn probe_frame(ct_mac: [u8; 6]) -> Vec<u8> {
    let src: std::net::Ipv4Addr = CT_V4.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let dst: std::net::Ipv4Addr = HOST_V4.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let mut f = Vec::with_capacity(74);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ct_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    // IPv4: version/IHL, TOS, total length 60, id, flags/fragment, TTL, TCP, checksum.
    f.extend_from_slice(&[0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    // TCP: ports 40000 → 5201, seq/ack, data offset 5, ACK, window; then 20 bytes of payload.
    f.extend_from_slice(&[
        0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff,
    ]);
    f.extend_from_slice(&[0; 4]);
    f.resize(74, 0);
    f
}

fn test_run_ns(
    prog: &SchedClassifier,
    name: &'static str,
    frame: &[u8],
    ctx: &[u8],
) -> Result<f64> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(ctx),
        repeat: TEST_RUN_REPEAT,
        ..TestRunOptions::new()
    };
    let res = prog
        .test_run(opts)
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
    Ok(res.duration.as_secs_f64() * 1e9)
}

pub fn test_run_floor(
    dp: &Datapath,
    noop: &SchedClassifier,
    ifindex: u32,
    ct_mac: [u8; 6],
) -> Result<FloorProbe> {
    let frame = probe_frame(ct_mac);
    let ctx = skb_ctx(ifindex, 0, 0);
    let (from_ct, _) = dp.programs();
    let mut p = FloorProbe {
        repeat: TEST_RUN_REPEAT,
        ..FloorProbe::default()
    };
    // Warm-up, then off / on / off / on: the minimum of each pair (interference only adds).
    test_run_ns(noop, program_names::NOOP, &frame, &ctx)?;
    let mut off = [f64::INFINITY; 2];
    let mut on = [f64::INFINITY; 2];
    let mut stats = f64::INFINITY;
    for _ in 0..2 {
        off[0] = off[0].min(test_run_ns(noop, program_names::NOOP, &frame, &ctx)?);
        off[1] = off[1].min(test_run_ns(from_ct, program_names::FROM_CT, &frame, &ctx)?);
        let guard = enable_stats()?;
        let before = prog_stats(noop, program_names::NOOP)?;
        on[0] = on[0].min(test_run_ns(noop, program_names::NOOP, &frame, &ctx)?);
        let after = prog_stats(noop, program_names::NOOP)?;
        on[1] = on[1].min(test_run_ns(from_ct, program_names::FROM_CT, &frame, &ctx)?);
        drop(guard);
        stats = stats.min(after.since(before).ns_per_run());
    }
    p.noop_off_ns = off[0];
    p.berth_off_ns = off[1];
    p.noop_on_ns = on[0];
    p.berth_on_ns = on[1];
    p.noop_stats_ns = stats;
    Ok(p)
}
