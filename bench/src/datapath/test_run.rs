//! `bench datapath-test-run`: the cost of one run of each program on a typical frame, by
//! BPF_PROG_TEST_RUN repeated (no skb allocation in the loop; excludes the bpf_stats
//! overhead), on the loopback of a namespace of its own: berth's two programs on a managed
//! interface, `from_ct` on an unmanaged one, and the no-op program (the method's floor).

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use berth::datapath::{Datapath, IfaceConfig, parse_networks_classes};
use berth_tests::datapath::{CT_MAC, HOST_MAC, Netns, PinDir, ipv4, load_noop, skb_ctx};
use clap::Args;

#[derive(Args)]
pub struct TestRunArgs {
    /// Runs per BPF_PROG_TEST_RUN call (the kernel reports their average).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
}

const CT: u32 = 101;
const CT_V4: [u8; 4] = [10, 0, 0, 2];
/// The namespace's loopback.
const LO: u32 = 1;
const CLASSES: &str = "\
0 192.0.2.0/24
2 198.51.100.0/24
1 0.0.0.0/0
1 ::/0
3 fd00:78::/64
";

/// ns per run of `prog` on `frame`, `repeat` times.
fn ns_per_run(
    prog: &SchedClassifier,
    frame: &[u8],
    ctx: Option<&[u8]>,
    repeat: u32,
) -> Result<u128> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx,
        repeat,
        ..TestRunOptions::new()
    };
    let res = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok(res.duration.as_nanos())
}

pub fn run(a: &TestRunArgs) -> Result<()> {
    crate::require_root("datapath-test-run", "network namespaces, eBPF")?;
    let repeat = a.repeat;
    let pin = PinDir::new();
    let ns = Netns::new("bdb")?;
    let _in_ns = ns.enter()?;
    let ctid = berth_runtime::Ctid::new(CT)?;
    let mut dp = Datapath::open_or_load(&pin.path)?;
    dp.attach(LO, IfaceConfig::routed(ctid, CT_MAC))?;
    dp.set_ct_addrs(ctid, &["10.0.0.2".parse()?])?;
    dp.load_classes(&parse_networks_classes(CLASSES)?)?;
    let (from_ct, to_ct) = dp.programs();
    let out_frame = ipv4(CT_MAC, CT_V4, [192, 0, 2, 9], 1400, 0);
    let in_frame = ipv4(HOST_MAC, [192, 0, 2, 9], CT_V4, 1400, 0);
    let ctx = skb_ctx(0, 0, 0);
    for (name, prog, frame) in [
        ("from_ct", from_ct, &out_frame),
        ("to_ct", to_ct, &in_frame),
    ] {
        println!(
            "{name}: {} ns/run (BPF_PROG_TEST_RUN, repeat {repeat})",
            ns_per_run(prog, frame, Some(&ctx), repeat)?
        );
    }
    // An interface berth does not manage (an IFACES miss, then an IFACES_SPILL miss).
    dp.detach(LO)?;
    let (from_ct, _) = dp.programs();
    println!(
        "unmanaged interface: {} ns/run",
        ns_per_run(from_ct, &out_frame, Some(&ctx), repeat)?
    );
    // The floor of the method: a program that does nothing.
    let noop = load_noop(&dp, &pin.path.join("bench-noop"))?;
    println!(
        "no-op program: {} ns/run",
        ns_per_run(&noop, &out_frame, None, repeat)?
    );
    Ok(())
}
