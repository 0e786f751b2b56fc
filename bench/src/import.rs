//! `bench import`: `berth import vz` of a simfs private area (default 1 GiB in files of mixed
//! sizes, with hard links and a sparse file) against `cp -a` of the same tree, rounds
//! alternating which goes first, each copy followed by a sync of the filesystem so both pay
//! for their writes; and `import vz all --dry-run` of 100 CTs' configs.
//!
//! Bars (issue 17): import at least 0.8× the speed of `cp -a`; the dry run within 1 s.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_tests::ct::TestHost;
use clap::Args;

use crate::stats::{ms, summarize};

#[derive(Args)]
pub struct ImportArgs {
    /// Size of the private area in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mb: u64,
    /// Measured rounds (each: one import and one cp -a).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// CT configs for the dry-run measurement.
    #[arg(long, default_value_t = 100)]
    configs: u32,
}

fn sh(cmd: &mut Command) -> Result<()> {
    let o = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// A tree of `size_mb` MiB: 70% in 64 KiB–4 MiB files, 30% in 4 KiB files, plus hard links,
/// symlinks, a sparse file and owners above 1000.
fn build_tree(root: &Path, size_mb: u64) -> Result<()> {
    fs::create_dir_all(root.join("etc"))?;
    fs::create_dir_all(root.join("sbin"))?;
    std::os::unix::fs::symlink("/bin/busybox", root.join("sbin/init"))?;
    fs::write(root.join("etc/hostname"), "bench\n")?;
    let mut left = size_mb << 20;
    let small_budget = left * 3 / 10;
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0u64;
    let mut small = 0u64;
    while left > 0 {
        let size = if small < small_budget {
            4096
        } else {
            [64 << 10, 256 << 10, 1 << 20, 4 << 20][(n % 4) as usize]
        }
        .min(left);
        let dir = root.join(format!("d{}", n / 500));
        if n.is_multiple_of(500) {
            fs::create_dir_all(&dir)?;
        }
        // Different bytes per file, so nothing can be shared or deduplicated.
        for (i, b) in buf[..size as usize].iter_mut().enumerate() {
            *b = (i as u64 ^ n.wrapping_mul(2654435761)) as u8;
        }
        let p = dir.join(format!("f{n}"));
        fs::File::create(&p)?.write_all(&buf[..size as usize])?;
        if n.is_multiple_of(97) {
            fs::hard_link(&p, dir.join(format!("h{n}")))?;
            std::os::unix::fs::symlink(format!("f{n}"), dir.join(format!("s{n}")))?;
            std::os::unix::fs::chown(&p, Some(1500), Some(1500))?;
        }
        if size == 4096 {
            small += size;
        }
        left -= size;
        n += 1;
    }
    sh(Command::new("truncate")
        .args(["-s", "256M"])
        .arg(root.join("sparse")))?;
    Ok(())
}

fn timed(f: impl FnOnce() -> Result<()>, synced: &Path) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    sh(Command::new("sync").arg("-f").arg(synced))?;
    Ok(t.elapsed())
}

pub fn run(a: &ImportArgs) -> Result<()> {
    crate::require_root("import", "chown, mknod, CT id ranges")?;
    let h = TestHost::new();
    let work = tempfile::Builder::new()
        .prefix("berth-bench-import-")
        .tempdir_in("/var/tmp")?;
    let node = work.path().join("vz");
    let src = work.path().join("private/900");
    fs::create_dir_all(node.join("conf"))?;
    fs::write(node.join("vz.conf"), "")?;
    fs::write(
        node.join("conf/900.conf"),
        "HOSTNAME=\"bench.example.com\"\nPHYSPAGES=\"0:256M\"\n",
    )?;
    tracing::info!(size_mb = a.size_mb, "building the tree");
    build_tree(&src, a.size_mb)?;
    // Both start from a warm page cache.
    sh(Command::new("tar")
        .arg("-cf")
        .arg("/dev/null")
        .arg("-C")
        .arg(&src)
        .arg("."))?;
    let import_args = |ctid: &str| {
        vec![
            "import".to_string(),
            "vz".into(),
            "--conf-dir".into(),
            node.join("conf").display().to_string(),
            "--vz-conf".into(),
            node.join("vz.conf").display().to_string(),
            "--private".into(),
            src.display().to_string(),
            "--privileged".into(),
            ctid.into(),
        ]
    };
    let mut cp = Vec::new();
    let mut imp = Vec::new();
    let cp_dst = work.path().join("cp");
    for round in 0..a.rounds {
        let do_cp = || -> Result<Duration> {
            let d = timed(
                || sh(Command::new("cp").arg("-a").arg(&src).arg(&cp_dst)),
                work.path(),
            )?;
            fs::remove_dir_all(&cp_dst)?;
            Ok(d)
        };
        let do_import = || -> Result<Duration> {
            let args = import_args("900");
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let d = timed(
                || {
                    h.ok(&argv);
                    Ok(())
                },
                &h.root,
            )?;
            h.ok(&["destroy", "900"]);
            Ok(d)
        };
        if round % 2 == 0 {
            cp.push(do_cp()?);
            imp.push(do_import()?);
        } else {
            imp.push(do_import()?);
            cp.push(do_cp()?);
        }
        tracing::info!(
            round,
            cp_ms = ms(cp[cp.len() - 1]),
            import_ms = ms(imp[imp.len() - 1]),
            "round"
        );
    }
    let ratios: Vec<f64> = cp
        .iter()
        .zip(&imp)
        .map(|(c, i)| c.as_secs_f64() / i.as_secs_f64())
        .collect();
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let (c, i) = (summarize(cp), summarize(imp));
    println!(
        "import of a {} MiB simfs tree: berth import p50 {:.0} ms, cp -a p50 {:.0} ms; speed ratio (cp time / import time) median {median:.2} (range {:.2}-{:.2}) over {} rounds (bar >= 0.80): {}",
        a.size_mb,
        ms(i.p50),
        ms(c.p50),
        sorted[0],
        sorted[sorted.len() - 1],
        ratios.len(),
        if median >= 0.8 { "PASS" } else { "FAIL" }
    );

    // The dry run of a node's worth of configs.
    let many = work.path().join("many");
    fs::create_dir_all(many.join("conf"))?;
    fs::write(
        many.join("vz.conf"),
        format!(
            "VE_PRIVATE={}/private/$VEID\nTRAFFIC_SHAPING=yes\n",
            many.display()
        ),
    )?;
    for c in 0..a.configs {
        let ctid = 1000 + c;
        fs::create_dir_all(many.join(format!("private/{ctid}/etc")))?;
        fs::write(
            many.join(format!("conf/{ctid}.conf")),
            format!(
                "PHYSPAGES=\"0:262144\"\nSWAPPAGES=\"0:131072\"\nDISKSPACE=\"10G:11G\"\nCPUUNITS=\"1000\"\nNUMPROC=\"400:400\"\nKMEMSIZE=\"unlimited\"\nIP_ADDRESS=\"198.18.{}.{} 2001:db8::{ctid:x}\"\nHOSTNAME=\"ct{ctid}.example.com\"\nRATE=\"eth0:1:8000\"\nONBOOT=\"yes\"\nNAME=\"ct{ctid}\"\n",
                c / 250,
                c % 250 + 1
            ),
        )?;
    }
    let dry = |h: &TestHost| -> Result<Duration> {
        let t = Instant::now();
        let o = h.run(&[
            "import",
            "vz",
            "--conf-dir",
            &many.join("conf").display().to_string(),
            "--vz-conf",
            &many.join("vz.conf").display().to_string(),
            "all",
            "--dry-run",
            "--json",
        ]);
        let d = t.elapsed();
        if !o.status.success() {
            bail!("dry run: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(d)
    };
    let mut dries = Vec::new();
    let mut controls = Vec::new();
    for _ in 0..5 {
        dries.push(dry(&h)?);
        let t = Instant::now();
        h.ok(&["list", "-a"]);
        controls.push(t.elapsed());
    }
    let (d, k) = (summarize(dries), summarize(controls));
    println!(
        "import vz all --dry-run of {} configs: p50 {:.1} ms, max {:.1} ms (bar <= 1000 ms): {}; control `berth list -a` p50 {:.1} ms",
        a.configs,
        ms(d.p50),
        ms(d.max),
        if d.max <= Duration::from_secs(1) {
            "PASS"
        } else {
            "FAIL"
        },
        ms(k.p50)
    );
    Ok(())
}
