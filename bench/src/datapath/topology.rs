//! The datapath benchmark's world: a "host" and a "CT" namespace joined by a veth pair, an
//! iperf3 server in the host, a private pin directory; all removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use berth::datapath::Datapath;
use berth_tests::datapath::Pair;
use tracing::warn;

pub const HOST_V4: &str = "10.201.0.1";
pub const CT_V4: &str = "10.201.0.2";
const HOST_V6: &str = "fd00:201::1";
pub const CT_V6: &str = "fd00:201::2";

/// Drop order: the iperf3 server, the pinned datapath (unloaded from inside the host
/// namespace, where its interfaces are), then the namespaces (fields).
pub struct Topology {
    server: Option<Child>,
    pub pin_dir: PathBuf,
    pub pair: Pair,
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        match self.pair.host.enter() {
            Ok(_in_host) => {
                if let Err(e) = Datapath::unload_all(&self.pin_dir) {
                    warn!(pin_dir = %self.pin_dir.display(), error = %e, "benchmark cleanup: unloading");
                }
            }
            Err(e) => warn!(error = %e, "benchmark cleanup: entering the host namespace"),
        }
    }
}

impl Topology {
    pub fn create() -> Result<Self> {
        let pair = Pair::new_down()?;
        let (h, c) = (&pair.host, &pair.ct);
        h.ip(&[
            "addr",
            "add",
            &format!("{HOST_V4}/24"),
            "dev",
            &pair.host_if,
        ])?;
        h.ip(&[
            "addr",
            "add",
            &format!("{HOST_V6}/64"),
            "dev",
            &pair.host_if,
            "nodad",
        ])?;
        c.ip(&["addr", "add", &format!("{CT_V4}/24"), "dev", &pair.ct_if])?;
        c.ip(&[
            "addr",
            "add",
            &format!("{CT_V6}/64"),
            "dev",
            &pair.ct_if,
            "nodad",
        ])?;
        pair.up()?;
        Ok(Self {
            server: None,
            pin_dir: Path::new("/sys/fs/bpf").join(format!("berth-bench-{}", std::process::id())),
            pair,
        })
    }

    pub fn host_if(&self) -> &str {
        &self.pair.host_if
    }

    pub fn start_server(&mut self) -> Result<()> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.pair.host.name])
            .args(["iperf3", "-s", "-B", HOST_V4])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning iperf3 -s")?;
        self.server = Some(child);
        // Ready when a client gets through (the server binds within ~100 ms).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.iperf(&["-t", "1"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs an iperf3 client in the CT towards the host; returns the receiver's rate, Gbit/s.
    pub fn iperf(&self, args: &[&str]) -> Result<f64> {
        let mut full = vec!["iperf3", "-c", HOST_V4, "-J"];
        // Client and server on CPUs of their own: the scheduler moving them around is most of
        // the run-to-run spread on a 2-vCPU VM.
        if thread::available_parallelism().is_ok_and(|n| n.get() >= 2) {
            full.extend_from_slice(&["-A", "0,1"]);
        }
        full.extend_from_slice(args);
        let out = self.pair.ct.exec(&full)?;
        let v: serde_json::Value = serde_json::from_str(&out).with_context(|| {
            format!(
                "reading iperf3 JSON from: {}",
                out.chars().take(500).collect::<String>()
            )
        })?;
        let end = &v["end"];
        let bps = end["sum_received"]["bits_per_second"]
            .as_f64()
            .or_else(|| end["sum"]["bits_per_second"].as_f64())
            .with_context(|| {
                format!(
                    "no iperf3 receiver bits_per_second in: {}",
                    end.to_string().chars().take(500).collect::<String>()
                )
            })?;
        Ok(bps / 1e9)
    }
}
