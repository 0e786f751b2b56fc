//! Helpers for the datapath tests and benchmark: private bpffs pin directories, network
//! namespaces entered with setns, synthetic packets for `BPF_PROG_TEST_RUN`, and interface
//! statistics.

use std::{
    fs::File,
    marker::PhantomData,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use berth::datapath::Datapath;
use nix::sched::{CloneFlags, setns};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix><pid>x<n>` (short: interface names have
/// 15 characters at most).
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("spawning {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A private pin directory on bpffs, unloaded (links, programs, maps) on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        Self {
            path: Path::new("/sys/fs/bpf").join(unique("berth-test-")),
        }
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = Datapath::unload_all(&self.path) {
            eprintln!("cleanup of {}: {e}", self.path.display());
        }
    }
}

/// A network namespace created with `ip netns add` (so `ip -n` can configure it), deleted on
/// drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace with `ip netns exec` (fine for tools; it remounts
    /// /sys for the child, which is what makes /sys/class/net show the namespace's devices).
    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        run("ip", &full)
    }

    /// `/sys/class/net/<ifname>/statistics/<stat>` as seen inside the namespace.
    pub fn if_stat(&self, ifname: &str, stat: &str) -> Result<u64> {
        let path = format!("/sys/class/net/{ifname}/statistics/{stat}");
        let s = self.exec(&["cat", &path])?;
        s.trim().parse().with_context(|| format!("{path}: {s:?}"))
    }

    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let path = format!("/sys/class/net/{ifname}/ifindex");
        let s = self.exec(&["cat", &path])?;
        s.trim().parse().with_context(|| format!("{path}: {s:?}"))
    }

    pub fn enter(&self) -> Result<NetNsGuard> {
        NetNsGuard::enter(&self.path())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup of netns {}: {e}", self.name);
        }
    }
}

/// Moves the current thread into a network namespace and back on drop. `!Send`: setns is per
/// thread, the guard must be dropped on the thread that created it.
pub struct NetNsGuard {
    saved: File,
    _not_send: PhantomData<*const ()>,
}

impl NetNsGuard {
    pub fn enter(target: &Path) -> Result<Self> {
        let saved = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
        let ns = File::open(target).with_context(|| format!("opening {}", target.display()))?;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {}", target.display()))?;
        Ok(Self {
            saved,
            _not_send: PhantomData,
        })
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(self.saved.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Continuing in the wrong namespace would corrupt every later test on this thread.
            panic!("restoring the thread's network namespace: {e}");
        }
    }
}

/// Two namespaces joined by a veth pair: `host` holds `host_if` (where the datapath is
/// attached), `ct` holds `ct_if`. Deleting the namespaces removes the pair.
pub struct Pair {
    pub host: Netns,
    pub ct: Netns,
    pub host_if: String,
    pub ct_if: String,
}

impl Pair {
    pub fn new() -> Result<Self> {
        let pair = Self::new_down()?;
        pair.up()?;
        Ok(pair)
    }

    /// The pair with both ends down: attach first, then [`Self::up`], and the interface
    /// statistics and the counters start from the same zero.
    pub fn new_down() -> Result<Self> {
        let host = Netns::new("bdh")?;
        let ct = Netns::new("bdc")?;
        let host_if = unique("vh");
        let ct_if = unique("vc");
        host.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ct_if, "netns", &ct.name,
        ])?;
        Ok(Self {
            host,
            ct,
            host_if,
            ct_if,
        })
    }

    pub fn up(&self) -> Result<()> {
        self.host.ip(&["link", "set", &self.host_if, "up"])?;
        self.ct.ip(&["link", "set", &self.ct_if, "up"])?;
        Ok(())
    }

    pub fn ct_mac(&self) -> Result<[u8; 6]> {
        let s = self
            .ct
            .exec(&["cat", &format!("/sys/class/net/{}/address", self.ct_if)])?;
        parse_mac(s.trim())
    }
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {s:?}"))?;
    ensure!(parts.len() == 6, "MAC {s:?}");
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&parts);
    Ok(mac)
}

// ---- synthetic frames --------------------------------------------------------------------

pub const CT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xfe];

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// Ethernet + IPv4 (no options) + `payload` bytes; `frag` is the raw flags/fragment-offset
/// field (e.g. 0x2000 = more fragments, 0x0010 = offset 128 bytes).
pub fn ipv4(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], payload: usize, frag: u16) -> Vec<u8> {
    let mut f = eth(HOST_MAC, src_mac, 0x0800);
    let tot = (20 + payload) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&[0, 1]);
    f.extend_from_slice(&frag.to_be_bytes());
    f.extend_from_slice(&[64, 17, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend(std::iter::repeat_n(0xab, payload));
    f
}

pub fn ipv6(
    src_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    next_hdr: u8,
    payload: usize,
) -> Vec<u8> {
    let mut f = eth(HOST_MAC, src_mac, 0x86dd);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload as u16).to_be_bytes());
    f.extend_from_slice(&[next_hdr, 64]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend(std::iter::repeat_n(0xcd, payload));
    f
}

/// An ICMPv6 neighbour solicitation for `target` (type 135).
pub fn nd_solicit(src_mac: [u8; 6], src: [u8; 16], target: [u8; 16]) -> Vec<u8> {
    // Solicited-node multicast ff02::1:ffXX:XXXX.
    let mut dst = [0u8; 16];
    dst[0] = 0xff;
    dst[1] = 0x02;
    dst[11] = 0x01;
    dst[12] = 0xff;
    dst[13..].copy_from_slice(&target[13..]);
    let mut f = ipv6(src_mac, src, dst, 58, 0);
    f.truncate(f.len());
    let body_start = f.len();
    f.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&target);
    let plen = (f.len() - body_start) as u16;
    f[14 + 4..14 + 6].copy_from_slice(&plen.to_be_bytes());
    f
}

/// ARP request "who has `tpa`, tell `spa`".
pub fn arp(src_mac: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = eth([0xff; 6], src_mac, 0x0806);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

/// The frame size the kernel runs the program on: BPF_PROG_TEST_RUN pads nothing, so this is
/// the frame as built.
pub fn wire_len(frame: &[u8]) -> u64 {
    frame.len() as u64
}

/// `struct __sk_buff` (192 bytes on every architecture) for BPF_PROG_TEST_RUN; only fields it
/// accepts as input are set. `ifindex` 0 runs on the namespace's loopback (ifindex 1);
/// `ingress_ifindex` (what tc ingress programs see as the receiving device) is set to the
/// same interface. The tests and the datapath benchmark's probes run programs with it.
pub fn skb_ctx(ifindex: u32, gso_segs: u32, gso_size: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    let ingress = if ifindex == 0 { 1 } else { ifindex };
    ctx[36..40].copy_from_slice(&ingress.to_ne_bytes()); // ingress_ifindex
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes()); // ifindex
    ctx[164..168].copy_from_slice(&gso_segs.to_ne_bytes()); // gso_segs
    ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes()); // gso_size
    ctx
}

/// tc verdicts as `BPF_PROG_TEST_RUN` reports them (the i32 return value as u32).
pub const VERDICT_PASS: u32 = u32::MAX; // TC_ACT_UNSPEC (-1): pass on to the next program
pub const VERDICT_DROP: u32 = 2; // TC_ACT_SHOT

/// Runs `prog` once on `frame` (as loopback traffic unless `ctx` says otherwise).
pub fn test_run(prog: &SchedClassifier, frame: &[u8], ctx: Option<&[u8]>) -> Result<u32> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx,
        ..TestRunOptions::new()
    };
    let res = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok(res.return_value)
}

// ---- traffic -----------------------------------------------------------------------------

/// A UDP socket bound inside `ns` (a socket stays in the namespace it was created in).
pub fn udp_bind(ns: &Netns, addr: std::net::SocketAddr) -> Result<std::net::UdpSocket> {
    let _g = ns.enter()?;
    let s = std::net::UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_millis(300)))?;
    // The tests drain after sending; a receive buffer that overflows would lose datagrams
    // the counters rightly counted. SO_RCVBUFFORCE (root) bypasses net.core.rmem_max.
    let size: libc::c_int = 16 << 20;
    // SAFETY: valid fd and option pointer/length for the call.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    ensure!(
        r == 0,
        "SO_RCVBUFFORCE: {}",
        std::io::Error::last_os_error()
    );
    Ok(s)
}

/// Sends `n` datagrams of `size` payload bytes from `from` to `to`, paced so that no queue
/// on the way overflows (the test compares exact counts).
pub fn udp_send(
    from: &std::net::UdpSocket,
    to: std::net::SocketAddr,
    n: usize,
    size: usize,
) -> Result<()> {
    let buf = vec![0x5a; size];
    for i in 0..n {
        from.send_to(&buf, to)
            .with_context(|| format!("sending to {to}"))?;
        if i % 20 == 19 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    Ok(())
}

/// Receives until the socket is quiet; returns the number of datagrams.
pub fn udp_drain(s: &std::net::UdpSocket) -> usize {
    let mut buf = [0u8; 65536];
    let mut n = 0;
    while s.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}

/// Sends a raw frame out of `ifname` from inside `ns` (AF_PACKET: no stack checks, so a CT
/// can send truncated or foreign frames this way).
pub fn send_raw(ns: &Netns, ifindex: u32, frame: &[u8]) -> Result<()> {
    let _g = ns.enter()?;
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just returned by socket(2) and is owned here.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: frame and sll are valid for the call's duration.
    let r = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(
        r == frame.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

// ---- raw maps (to fabricate pin directories of older layouts) -----------------------------

/// `enum bpf_map_type` values (include/uapi/linux/bpf.h).
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
/// `BPF_F_NO_PREALLOC`, required for LPM tries.
pub const BPF_F_NO_PREALLOC: u32 = 1;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> Result<i64> {
    // SAFETY: attr is a zero-initialised prefix of union bpf_attr for `cmd`, valid for the
    // call; the kernel reads at most attr.len() bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    ensure!(r >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    Ok(r)
}

/// Creates a map with `BPF_MAP_CREATE` and pins it at `path` (the pin keeps it alive).
pub fn create_pinned_map(
    path: &Path,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> Result<()> {
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key_size, value_size, max_entries, flags]
        .into_iter()
        .enumerate()
    {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let fd = sys_bpf(0, &mut attr).context("BPF_MAP_CREATE")?;
    // SAFETY: the fd was just returned by the kernel and is owned here.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 16];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32).to_ne_bytes());
    sys_bpf(6, &mut attr).with_context(|| format!("BPF_OBJ_PIN {}", path.display()))?;
    Ok(())
}

/// Loads berth's do-nothing program (`berth_noop`) over `dp`'s maps and pins it at `path`: a
/// stand-in for "some other tc program" (a previous build's, a foreign one).
pub fn load_noop(dp: &Datapath, path: &std::path::Path) -> Result<SchedClassifier> {
    use berth::bpf::programs::{MapPins, ProgramSpec, load_one};
    let maps = dp.map_pins();
    let spec = ProgramSpec::required(berth_common::program_names::NOOP, "noop");
    let pins = MapPins {
        dir: &maps,
        names: &berth_common::map_names::ALL,
    };
    Ok(load_one(&[pins], spec, path)?)
}
