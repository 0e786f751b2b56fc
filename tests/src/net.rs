//! Network test bed: every namespace here is the test's own — even "the host" and the upstream
//! router ("uplink"). Names inside fresh namespaces cannot collide with anything, so fixed
//! interface names are safe; nothing is created in the real host namespace.
//!
//! Topology (TEST-NET addresses only):
//! ```text
//!  uplink netns               host netns                         CT netns
//!  up1 192.0.2.1/24  <-veth->  up0 192.0.2.2/24                   venet0 (routed CTs)
//!      2001:db8:1::1/64            2001:db8:1::2/64               eth0   (bridged CTs, on br0)
//!  routes to 198.51.100.0/24,  br0 198.51.100.1/24, 2001:db8:2::1/64
//!  2001:db8:2::/64 via host
//! ```

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use berth_runtime::net::inspect::Snapshot;
use berth_runtime::net::{HostNet, NetNsGuard, Netlink, create_netns};

/// A network namespace owned by the test (it disappears when dropped and unused).
pub struct Ns {
    pub fd: OwnedFd,
}

impl Ns {
    pub fn new() -> Self {
        Self {
            fd: create_netns().expect("create netns"),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs a program with its network namespace set to this one (setns in the child, not
    /// `ip netns exec`, which would remount /sys).
    pub fn run(&self, prog: &str, args: &[&str]) -> Output {
        let fd = self.fd.as_raw_fd();
        let mut cmd = Command::new(prog);
        cmd.args(args);
        // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("run {prog} {args:?}: {e}"))
    }

    /// `ip ARGS...` in this namespace; panics with ip's message on failure.
    pub fn ip(&self, args: &str) {
        let a: Vec<&str> = args.split_whitespace().collect();
        let out = self.run("ip", &a);
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The MAC address of `ifname` ("aa:bb:..."); read via ip(8): /sys shows the host's devices.
    pub fn mac(&self, ifname: &str) -> String {
        let out = self.run("ip", &["-o", "link", "show", ifname]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut it = text.split_whitespace();
        it.find(|w| *w == "link/ether");
        it.next()
            .unwrap_or_else(|| panic!("no MAC for {ifname}: {text}"))
            .to_string()
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let out = self.run("sysctl", &["-qw", &format!("{key}={value}")]);
        assert!(
            out.status.success(),
            "sysctl {key}={value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One ping (v4 or v6 by address), up to `wait_s` seconds for the answer.
    pub fn ping(&self, addr: &str) -> bool {
        self.run("ping", &["-c", "1", "-W", "4", addr])
            .status
            .success()
    }

    pub fn netlink(&self) -> Netlink {
        Netlink::open_in(self.fd(), "test netns").expect("netlink socket in test netns")
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot::take(&mut self.netlink()).expect("snapshot")
    }

    /// A snapshot once the kernel's asynchronous follow-ups (link-local addresses appearing with
    /// carrier, their local/anycast routes) have stopped changing anything.
    pub fn settled_snapshot(&self) -> Snapshot {
        let mut last = self.snapshot();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.snapshot();
            if now == last {
                return now;
            }
            last = now;
        }
        panic!("namespace did not settle within 5 s");
    }
}

impl Default for Ns {
    fn default() -> Self {
        Self::new()
    }
}

pub const UPLINK4: &str = "192.0.2.1";
pub const UPLINK6: &str = "2001:db8:1::1";
pub const BRIDGE: &str = "br0";

pub struct Topology {
    pub host: Ns,
    pub uplink: Ns,
}

impl Topology {
    /// The host already routes (forwarding on, proxy_ndp on up0), as a hoster's node would: then
    /// enabling them cannot show up as a difference (IPv6 adds anycast routes when forwarding).
    pub fn new() -> Self {
        let t = Self::bare();
        t.host.sysctl("net.ipv4.conf.all.forwarding", "1");
        t.host.sysctl("net.ipv6.conf.all.forwarding", "1");
        t.host.sysctl("net.ipv6.conf.up0.proxy_ndp", "1");
        t.settle();
        t
    }

    /// Without any forwarding sysctl set (to check that berth sets what it needs).
    pub fn bare() -> Self {
        let host = Ns::new();
        let uplink = Ns::new();
        // Link-locals without DAD: usable (and their routes present) as soon as they appear.
        for ns in [&host, &uplink] {
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        }
        host.ip("link set lo up");
        uplink.ip("link set lo up");
        // Create the pair in the host netns, then move one end into the uplink netns.
        host.ip("link add up0 type veth peer name up1");
        let up_fd = format!("/proc/{}/fd/{}", std::process::id(), uplink.fd.as_raw_fd());
        host.ip(&format!("link set up1 netns {up_fd}"));
        host.ip("addr add 192.0.2.2/24 dev up0");
        host.ip("addr add 2001:db8:1::2/64 dev up0 nodad");
        host.ip("link set up0 up");
        host.ip(&format!("link add {BRIDGE} type bridge"));
        // No automatic link-local on the bridge: it would appear only once a CT port gives the
        // bridge carrier, and stay after teardown (a false "left behind").
        host.ip(&format!("link set {BRIDGE} addrgenmode none"));
        host.ip(&format!("addr add 198.51.100.1/24 dev {BRIDGE}"));
        host.ip(&format!("addr add 2001:db8:2::1/64 dev {BRIDGE} nodad"));
        host.ip(&format!("link set {BRIDGE} up"));
        uplink.ip("addr add 192.0.2.1/24 dev up1");
        uplink.ip("addr add 2001:db8:1::1/64 dev up1 nodad");
        uplink.ip("link set up1 up");
        uplink.ip("route add 198.51.100.0/24 via 192.0.2.2");
        uplink.ip("-6 route add 2001:db8:2::/64 via 2001:db8:1::2");
        let t = Self { host, uplink };
        t.settle();
        t
    }

    /// Waits until the kernel's own asynchronous work (IPv6 link-local addresses and DAD) is
    /// done, so that snapshots taken now are comparable with later ones.
    pub fn settle(&self) {
        let ok = wait_for(Duration::from_secs(5), || {
            let a = self.host.snapshot();
            let b = self.uplink.snapshot();
            std::thread::sleep(Duration::from_millis(100));
            has_ll(&a, "up0")
                && has_ll(&b, "up1")
                && a == self.host.snapshot()
                && b == self.uplink.snapshot()
        });
        assert!(ok, "test topology did not settle");
    }

    pub fn hostnet(&self) -> HostNet {
        HostNet::open(Some(self.host.fd())).expect("open host side")
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

fn has_ll(s: &Snapshot, dev: &str) -> bool {
    s.addrs
        .iter()
        .any(|a| a.starts_with(&format!("{dev} fe80:")))
}

/// Asserts that `after` equals `before`, listing every difference.
pub fn assert_same(what: &str, before: &Snapshot, after: &Snapshot) {
    let extra = after.minus(before);
    let missing = before.minus(after);
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{what}: left behind {extra:#?}\nmissing {missing:#?}"
    );
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A raw packet capture on one interface of a namespace (AF_PACKET, all protocols).
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    pub fn open(ns: &Ns, ifname: &str) -> Self {
        let _g = NetNsGuard::enter(ns.fd()).expect("enter netns");
        let name = std::ffi::CString::new(ifname).expect("interface name");
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let idx = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(idx > 0, "no interface {ifname}");
        // SAFETY: plain socket/bind calls with checked results and a live sockaddr.
        unsafe {
            let raw = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(0x0003u16.to_be()),
            );
            assert!(raw >= 0, "packet socket: {}", io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(raw);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = 0x0003u16.to_be();
            sll.sll_ifindex = idx;
            let r = libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
            Self { fd }
        }
    }

    /// Frames received within `timeout`.
    pub fn frames(&self, timeout: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while Instant::now() < end {
            // SAFETY: buffer pointer/length from a live Vec.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                out.push(buf[..n as usize].to_vec());
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        out
    }
}
