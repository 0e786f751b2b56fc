//! Building a topology, inside the supervisor (PID 1 of its pid and mount namespaces). Every
//! namespace is held by a holder process (`sleep infinity` unshared into a new netns), never by
//! a name under /run/netns, so nothing outlives the supervisor's pid namespace.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use ipnet::IpNet;

use crate::topology::{HOST, Kind, Mode, Node, Topology, UPLINK};
use crate::{Error, Result};

/// Where the berth installation of a run lives (all on the supervisor's private mounts).
#[derive(Debug, Clone)]
pub struct Berth {
    pub bin: PathBuf,
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub cgroup_parent: String,
    pub bpffs: PathBuf,
}

impl Berth {
    /// A berth command running in the namespace of `host_pid` (the testbed's host).
    pub fn cmd(&self, host_pid: i32, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root")
            .arg(&self.root)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(args)
            .env_remove("BERTH_ROOT")
            .env_remove("BERTH_RUN_DIR")
            .env_remove("BERTH_BPFFS")
            .env_remove("BERTH_CGROUP_PARENT")
            .stdin(Stdio::null());
        in_netns(&mut c, host_pid);
        c
    }

    pub fn ok(&self, host_pid: i32, args: &[&str]) -> Result<String> {
        let out = self
            .cmd(host_pid, args)
            .output()
            .map_err(Error::io(format!("run berth {}", args.join(" "))))?;
        checked(&format!("berth {}", args.join(" ")), out)
    }
}

/// The running testbed, as the supervisor sees it (PIDs of its own pid namespace).
pub struct Built {
    pub topo: Topology,
    pub berth: Berth,
    /// Node name (including `host` and `uplink`) -> PID whose netns is the node's.
    pub pids: BTreeMap<String, i32>,
    pub holders: Vec<Child>,
    pub berthd: Option<(Child, String)>,
    /// Node name -> PID holding the namespace of its delay line.
    pub delay_pids: BTreeMap<String, i32>,
    pub delay_lines: Vec<crate::delay::DelayLine>,
    /// In a user namespace of its own: no eBPF.
    pub rootless: bool,
}

impl Built {
    pub fn pid(&self, node: &str) -> i32 {
        self.pids[node]
    }

    pub fn host_pid(&self) -> i32 {
        self.pids[HOST]
    }

    /// `prog args` in the network namespace of `node` (host tools, the node's network).
    pub fn cmd(&self, node: &str, prog: &str, args: &[&str]) -> Command {
        let mut c = Command::new(prog);
        c.args(args).stdin(Stdio::null());
        in_netns(&mut c, self.pid(node));
        c
    }

    pub fn run(&self, node: &str, prog: &str, args: &[&str]) -> Result<Output> {
        self.cmd(node, prog, args)
            .output()
            .map_err(Error::io(format!("run {prog} in {node}")))
    }
}

/// Sets the child's network namespace to that of `pid` between fork and exec.
pub fn in_netns(c: &mut Command, pid: i32) {
    let path = std::ffi::CString::new(format!("/proc/{pid}/ns/net")).expect("no NUL in path");
    // SAFETY: open/setns/close are async-signal-safe; `path` is moved into the closure.
    unsafe {
        c.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
}

pub fn checked(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        return Err(Error::failed(
            what,
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process holding a new network namespace.
pub fn holder() -> Result<Child> {
    let mut c = Command::new("sleep");
    c.arg("infinity")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: unshare is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.spawn().map_err(Error::io("start a namespace holder"))
}

/// Runs `lines` through one `ip -batch -` in the netns of `pid`.
pub fn ip_batch(pid: i32, what: &str, lines: &[String]) -> Result<()> {
    let mut c = Command::new("ip");
    c.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    in_netns(&mut c, pid);
    let mut child = c.spawn().map_err(Error::io(format!("run ip in {what}")))?;
    let mut input = lines.join("\n");
    input.push('\n');
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(Error::io(format!("feed ip in {what}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(Error::io(format!("run ip in {what}")))?;
    checked(&format!("configure {what}"), out).map(|_| ())
}

pub fn sysctl(pid: i32, what: &str, kv: &[String]) -> Result<()> {
    let mut c = Command::new("sysctl");
    c.arg("-qw").args(kv).stdin(Stdio::null());
    in_netns(&mut c, pid);
    let out = c
        .output()
        .map_err(Error::io(format!("run sysctl in {what}")))?;
    checked(&format!("sysctl in {what}"), out).map(|_| ())
}

fn v6(n: &IpNet) -> bool {
    matches!(n, IpNet::V6(_))
}

/// `addr add` with DAD off for IPv6: an address usable at once, never "tentative".
fn addr_add(a: &IpNet, dev: &str) -> String {
    let nodad = if v6(a) { " nodad" } else { "" };
    format!("addr add {a} dev {dev}{nodad}")
}

const NO_DAD: [&str; 2] = [
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
];

/// tbf on `dev`: a burst of 10 ms at the rate, at least a few frames.
fn tbf(dev: &str, rate: &(String, u64)) -> String {
    let burst = (rate.1 / 8 / 100).max(4500);
    format!(
        "qdisc replace dev {dev} root tbf rate {} burst {burst} latency 50ms",
        rate.0
    )
}

fn tc(pid: i32, what: &str, line: &str) -> Result<()> {
    let mut c = Command::new("tc");
    c.args(line.split_whitespace()).stdin(Stdio::null());
    in_netns(&mut c, pid);
    let out = c.output().map_err(Error::io(format!("run tc in {what}")))?;
    checked(&format!("tc {line} in {what}"), out).map(|_| ())
}

/// The host-side interface name of a node.
pub fn host_ifname(n: &Node) -> String {
    match (n.kind, n.mode, n.ctid) {
        (Kind::Ct, Mode::Routed, Some(id)) => format!("venet{id}"),
        (Kind::Ct, Mode::Bridged, Some(id)) => format!("veth{id}.0"),
        _ => format!("tb-{}", n.name),
    }
}

/// Builds `topo`. On error, what was made is left to the supervisor's exit.
pub fn build(topo: &Topology, berth: Berth, mnt: &Path) -> Result<Built> {
    let mut built = Built {
        topo: topo.clone(),
        berth,
        pids: BTreeMap::new(),
        holders: Vec::new(),
        berthd: None,
        delay_pids: BTreeMap::new(),
        delay_lines: Vec::new(),
        rootless: false,
    };
    let t0 = std::time::Instant::now();
    let mut names = vec![HOST.to_owned(), UPLINK.to_owned()];
    names.extend(
        topo.nodes
            .iter()
            .filter(|n| n.kind == Kind::Netns)
            .map(|n| n.name.clone()),
    );
    for n in &names {
        let h = holder()?;
        built.pids.insert(n.clone(), h.id() as i32);
        built.holders.push(h);
        sysctl(built.pids[n], n, &NO_DAD.map(str::to_owned))?;
    }
    crate::impair::delay_namespaces(&mut built)?;
    let host = built.host_pid();
    let uplink = built.pids[UPLINK];
    sysctl(
        host,
        HOST,
        &[
            "net.ipv4.ip_forward=1".into(),
            "net.ipv6.conf.all.forwarding=1".into(),
        ],
    )?;

    // The host: its uplink, bridges, and the host sides of the namespace nodes.
    let mut h = vec![
        "link set lo up".to_owned(),
        format!("link add up0 type veth peer name up1 netns {uplink}"),
    ];
    h.extend(topo.host_addrs.iter().map(|a| addr_add(a, "up0")));
    h.push("link set up0 up".into());
    for b in &topo.bridges {
        // No multicast snooping: a CT that has not sent its MLD report yet would miss the
        // host's neighbour solicitations.
        h.push(format!("link add {} type bridge mcast_snooping 0", b.name));
        // No link-local appearing later, when a port gives the bridge carrier; a fixed one
        // now, since the kernel solicits neighbours from a link-local source only.
        h.push(format!("link set {} addrgenmode none", b.name));
        h.push(format!("addr add fe80::1/64 dev {} nodad", b.name));
        h.extend(b.addrs.iter().map(|a| addr_add(a, &b.name)));
        h.push(format!("link set {} up", b.name));
    }
    // Proxy ARP answers late (up to 0.8 s) by default: a first ping would time out.
    let mut proxy_arp = vec![
        "net.ipv4.conf.up0.proxy_arp=1".to_owned(),
        "net.ipv4.neigh.up0.proxy_delay=0".to_owned(),
    ];
    for n in topo.nodes.iter().filter(|n| n.kind == Kind::Netns) {
        let pid = built.pids[&n.name];
        let hif = host_ifname(n);
        match n.mode {
            Mode::Routed => {
                h.push(crate::impair::host_link(&built, n, &hif, "venet0", pid));
                h.push(format!("link set {hif} up"));
                h.push(format!("addr add fe80::1/64 dev {hif} nodad"));
                for a in &n.addrs {
                    h.push(format!("route add {} dev {hif}", a.addr()));
                    if v6(a) && topo.host_addrs.iter().any(|u| u.contains(&a.addr())) {
                        h.push(format!("neigh add proxy {} dev up0", a.addr()));
                    }
                }
                proxy_arp.push(format!("net.ipv4.conf.{hif}.proxy_arp=1"));
                proxy_arp.push(format!("net.ipv4.neigh.{hif}.proxy_delay=0"));
            }
            Mode::Bridged => {
                let br = n.bridge.as_deref().unwrap_or_default();
                h.push(crate::impair::host_link(&built, n, &hif, "eth0", pid));
                h.push(format!("link set {hif} master {br}"));
                h.push(format!("link set {hif} up"));
            }
        }
    }
    ip_batch(host, HOST, &h)?;
    proxy_arp.push("net.ipv6.conf.up0.proxy_ndp=1".into());
    proxy_arp.push("net.ipv6.neigh.up0.proxy_delay=0".into());
    sysctl(host, HOST, &proxy_arp)?;

    // The uplink routes the prefixes to the host.
    let mut u = vec!["link set lo up".to_owned()];
    u.extend(topo.uplink_addrs.iter().map(|a| addr_add(a, "up1")));
    u.push("link set up1 up".into());
    for p in &topo.uplink_prefixes {
        let via = topo.host_addrs.iter().find(|a| v6(a) == v6(p));
        if let Some(via) = via {
            u.push(format!("route add {p} via {}", via.addr()));
        }
    }
    ip_batch(uplink, UPLINK, &u)?;

    for n in topo.nodes.iter().filter(|n| n.kind == Kind::Netns) {
        let pid = built.pids[&n.name];
        let dev = if n.mode == Mode::Routed {
            "venet0"
        } else {
            "eth0"
        };
        let mut l = vec!["link set lo up".to_owned()];
        l.extend(n.addrs.iter().map(|a| addr_add(a, dev)));
        l.push(format!("link set {dev} up"));
        l.extend(default_routes(topo, n, dev));
        ip_batch(pid, &n.name, &l)?;
        if let Some(rate) = &n.rate {
            tc(pid, &n.name, &tbf(dev, rate))?;
            tc(host, HOST, &tbf(&host_ifname(n), rate))?;
        }
    }
    let t_ns = t0.elapsed();
    build_cts(&mut built)?;
    let t_cts = t0.elapsed();
    crate::impair::start(&mut built)?;
    if topo.berthd {
        built.berthd = Some(start_berthd(&built, mnt)?);
    }
    tracing::info!(
        namespaces_ms = t_ns.as_millis() as u64,
        cts_ms = (t_cts - t_ns).as_millis() as u64,
        berthd_ms = (t0.elapsed() - t_cts).as_millis() as u64,
        "testbed built"
    );
    Ok(built)
}

fn default_routes(topo: &Topology, n: &Node, dev: &str) -> Vec<String> {
    let mut out = Vec::new();
    for fam6 in [false, true] {
        if !n.addrs.iter().any(|a| v6(a) == fam6) {
            continue;
        }
        // `ip -batch` takes no -6: the v6 default is spelled ::/0.
        let default = if fam6 { "::/0" } else { "default" };
        match n.mode {
            // The host side proxies ARP (v4) and answers as fe80::1 (v6).
            Mode::Routed if fam6 => out.push(format!("route add ::/0 via fe80::1 dev {dev}")),
            Mode::Routed => out.push(format!("route add default dev {dev}")),
            Mode::Bridged => {
                let br = topo
                    .bridges
                    .iter()
                    .find(|b| Some(&b.name) == n.bridge.as_ref());
                if let Some(gw) = br.and_then(|b| b.addrs.iter().find(|a| v6(a) == fam6)) {
                    out.push(format!("route add {default} via {} dev {dev}", gw.addr()));
                }
            }
        }
    }
    out
}

/// Creates and starts the CT nodes through the berth binary, one thread per CT: berth
/// serializes commands per CT only, and its id pool and address checks are safe in parallel.
fn build_cts(built: &mut Built) -> Result<()> {
    let cts: Vec<Node> = built
        .topo
        .nodes
        .iter()
        .filter(|n| n.kind == Kind::Ct)
        .cloned()
        .collect();
    if cts.is_empty() {
        return Ok(());
    }
    let host = built.host_pid();
    let (b, topo) = (&built.berth, &built.topo);
    let t = std::time::Instant::now();
    b.ok(host, &["template", "build", "busybox"])?;
    tracing::info!(
        ms = t.elapsed().as_millis() as u64,
        "busybox template built"
    );
    let pids: Vec<Result<i32>> = std::thread::scope(|s| {
        let hs: Vec<_> = cts
            .iter()
            .map(|n| s.spawn(move || ct_up(b, topo, host, n)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::failed("bring up a CT", "its thread panicked")))
            })
            .collect()
    });
    for (n, pid) in cts.iter().zip(pids) {
        built.pids.insert(n.name.clone(), pid?);
    }
    Ok(())
}

/// create, configure and start one CT; its init's PID.
fn ct_up(b: &Berth, topo: &Topology, host: i32, n: &Node) -> Result<i32> {
    let id = n.ctid.unwrap_or_default().to_string();
    let mut args = vec!["create".to_owned(), id.clone()];
    if n.mode == Mode::Routed {
        for a in &n.addrs {
            args.push("--ipadd".into());
            args.push(a.addr().to_string());
        }
    }
    b.ok(host, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    if let Some(br) = &n.bridge {
        b.ok(
            host,
            &[
                "set",
                &id,
                "--netif_add",
                &format!("eth0,,,,{br}"),
                "--save",
            ],
        )?;
    }
    if let Some((rate, _)) = &n.rate {
        b.ok(
            host,
            &["set", &id, "--rate-in", rate, "--rate-out", rate, "--save"],
        )?;
    }
    let t = std::time::Instant::now();
    // `start --json` names the init PID: no `status` call (a berth process less per CT, which
    // counts when many runs share the CPUs).
    let st: serde_json::Value = serde_json::from_str(&b.ok(host, &["start", &id, "--json"])?)
        .map_err(|e| Error::failed(format!("start CT {id}"), e.to_string()))?;
    tracing::info!(ctid = %id, ms = t.elapsed().as_millis() as u64, "CT started");
    let pid = st["init_pid"]
        .as_i64()
        .ok_or_else(|| Error::failed(format!("start CT {id}"), format!("no init_pid in {st}")))?
        as i32;
    if n.mode == Mode::Bridged {
        // As the CT's network scripts would; from the host's root, DAD off.
        sysctl(pid, &n.name, &NO_DAD.map(str::to_owned))?;
        let mut l: Vec<String> = n.addrs.iter().map(|a| addr_add(a, "eth0")).collect();
        l.push("link set eth0 up".into());
        l.extend(default_routes(topo, n, "eth0"));
        ip_batch(pid, &n.name, &l)?;
    }
    Ok(pid)
}

/// berthd on the testbed's host, on its loopback (a namespace of its own: the port is free).
fn start_berthd(built: &Built, mnt: &Path) -> Result<(Child, String)> {
    let b = &built.berth;
    let bin = b.bin.with_file_name("berthd");
    let mut c = Command::new(&bin);
    c.args(["--listen", "127.0.0.1:9597", "--tick", "10", "--root"])
        .arg(&b.root)
        .arg("--run-dir")
        .arg(&b.run_dir)
        .arg("--cgroup-parent")
        .arg(&b.cgroup_parent)
        .arg("--bpffs")
        .arg(&b.bpffs)
        .arg("--ledger")
        .arg(mnt.join("ledger.db"))
        .env_remove("BERTH_ROOT")
        .env_remove("BERTH_RUN_DIR")
        .env("BERTH_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    in_netns(&mut c, built.host_pid());
    let mut child = c
        .spawn()
        .map_err(Error::io(format!("start {}", bin.display())))?;
    let mut line = String::new();
    let out = child.stdout.take().map(BufReader::new);
    if let Some(mut r) = out {
        r.read_line(&mut line)
            .map_err(Error::io("read berthd's listen line"))?;
    }
    let addr = line
        .trim()
        .strip_prefix("berthd listening on http://")
        .map(str::to_owned)
        .ok_or_else(|| Error::failed("start berthd", format!("unexpected first line {line:?}")))?;
    Ok((child, addr))
}

/// The inode of the network namespace of `pid` (as `/proc/<pid>/ns/net` shows it).
pub fn netns_ino(proc_root: &Path, pid: i32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(proc_root.join(format!("{pid}/ns/net")))
        .ok()
        .map(|m| m.ino())
}
