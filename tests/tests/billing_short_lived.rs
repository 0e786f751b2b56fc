//! A CT whose whole life falls between two ledger ticks (or into a berthd downtime) is still
//! billed: destroy leaves its final counters and billing settings in a retired record, and the
//! next tick registers and books it.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use berth_tests::billing::{Berthd, kernel_bytes, ledger_report};
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4};

fn live_and_die(h: &TestHost, ct: &str, ip: &str) -> Result<(String, u64, u64)> {
    h.ok(&["create", ct, "--ipadd", ip, "--billing-day", "15"]);
    h.ok(&["start", ct]);
    let uuid = h.status(ct)["uuid"].as_str().context("uuid")?.to_owned();
    let (rc, out, err) = h.exec(
        ct,
        &[
            "ping", "-c", "20", "-i", "0.01", "-s", "1000", "-W", "2", UPLINK4,
        ],
    );
    ensure!(rc == 0, "ping from {ct}: {out}{err}");
    h.ok(&["stop", "--fast", ct]);
    let (i, o) = kernel_bytes(h, ct);
    ensure!(i > 20_000 && o > 20_000, "CT {ct} counted {i}/{o}");
    h.ok(&["destroy", ct]);
    Ok((uuid, i, o))
}

#[test]
fn ct_living_between_ticks_or_while_berthd_is_down_is_billed() -> Result<()> {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let ledger = h.root.join("ledger/billing.db");
    let ledger_s = ledger.to_str().context("ledger path")?.to_owned();
    let mut d = Berthd::start(&h, &ledger, "10")?;
    d.wait_tick_end(0, Duration::from_secs(15))?;

    // Right after a tick: the CT is created, counts, and is gone before the next one.
    let ticks = d.tick_ends();
    let (u1, i1, o1) = live_and_die(&h, "5401", "192.0.2.141")?;
    ensure!(
        d.tick_ends() == ticks,
        "a tick ran during the CT's life: the test proves nothing"
    );
    // While berthd is down.
    d.kill()?;
    let (u2, i2, o2) = live_and_die(&h, "5402", "192.0.2.142")?;
    let mut d = Berthd::start(&h, &ledger, "10")?;
    d.wait_tick_end(0, Duration::from_secs(15))?;
    d.sigterm()?;

    for (uuid, i, o) in [(&u1, i1, o1), (&u2, i2, o2)] {
        let (r, l_in, l_out) = ledger_report(&h, &ledger_s, uuid)?;
        ensure!(
            (l_in, l_out) == (i, o),
            "{uuid}: ledger {l_in}/{l_out}, kernel {i}/{o}: {r}"
        );
        ensure!(
            r["billing_day"] == "15",
            "the CT's billing day was not carried: {r}"
        );
        ensure!(r["destroyed"].is_string(), "{r}");
    }
    Ok(())
}
