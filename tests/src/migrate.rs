//! Two "hosts" for migration tests, each a network namespace of the test's own with its own
//! berth installation, and an sshd the test starts inside the target's namespace:
//!
//! ```text
//!   lan netns: bridge lan0 192.0.2.1/24 (the client; the CTs' neighbours)
//!      |  veth                      |  veth
//!   host A: up0 192.0.2.2/24     host B: up0 192.0.2.3/24
//!           mg0 198.51.100.1/24 <-veth-> mg0 198.51.100.2/24 (sshd on :22)
//! ```
//!
//! A CT's routed address in 192.0.2.0/24 is answered by proxy ARP from whichever host runs
//! it; the target's gratuitous ARP moves the lan's neighbour entry. For live migration both
//! installations share one cgroup parent name (as two real nodes both use `berth`): CRIU's
//! images name the CT's cgroups by path, and the source's are gone before the target's are
//! made. Otherwise each has its own: a CTID on both "hosts" at once (a refusal test) would
//! share a cgroup, and the target's `destroy` would kill the source's CT.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ct::TestHost;
use crate::net::{Ns, wait_for};

pub const SRC_ADDR: &str = "198.51.100.1";
pub const DST_ADDR: &str = "198.51.100.2";

/// What the tests need that this machine may lack, or `None` when all is there.
pub fn missing_tools() -> Option<String> {
    for p in [
        "/usr/sbin/sshd",
        "/usr/bin/ssh",
        "/usr/bin/ssh-keygen",
        "/usr/bin/rsync",
    ] {
        if !Path::new(p).exists() {
            return Some(format!(
                "{p} missing (xtask/setup.sh installs openssh and rsync)"
            ));
        }
    }
    None
}

pub struct Bed {
    pub lan: Ns,
    pub a: Ns,
    pub b: Ns,
    pub src: TestHost,
    pub dst: TestHost,
    pub keys: tempfile::TempDir,
    sshd: Option<Child>,
}

fn ns_path(ns: &Ns) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), ns.fd.as_raw_fd())
}

impl Bed {
    /// Two hosts with cgroup parents of their own.
    pub fn new() -> Self {
        Self::build(false)
    }

    /// Two hosts sharing one cgroup parent name (for live migration).
    pub fn shared_cgroups() -> Self {
        Self::build(true)
    }

    fn build(shared_cgroups: bool) -> Self {
        let lan = Ns::new();
        let a = Ns::new();
        let b = Ns::new();
        for ns in [&lan, &a, &b] {
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
            ns.ip("link set lo up");
        }
        lan.ip("link add lan0 type bridge");
        lan.ip("addr add 192.0.2.1/24 dev lan0");
        lan.ip("link set lan0 up");
        for (ns, port, addr) in [(&a, "pa", "192.0.2.2/24"), (&b, "pb", "192.0.2.3/24")] {
            lan.ip(&format!("link add {port} type veth peer name up0"));
            lan.ip(&format!("link set up0 netns {}", ns_path(ns)));
            lan.ip(&format!("link set {port} master lan0 up"));
            ns.ip(&format!("addr add {addr} dev up0"));
            ns.ip("link set up0 up");
            ns.sysctl("net.ipv4.conf.all.forwarding", "1");
            ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        }
        a.ip("link add mg0 type veth peer name mgb");
        a.ip(&format!("link set mgb netns {}", ns_path(&b)));
        b.ip("link set mgb name mg0");
        a.ip(&format!("addr add {SRC_ADDR}/24 dev mg0"));
        b.ip(&format!("addr add {DST_ADDR}/24 dev mg0"));
        a.ip("link set mg0 up");
        b.ip("link set mg0 up");
        let src = TestHost::new().in_netns(a.fd());
        let mut dst = TestHost::new().in_netns(b.fd());
        if shared_cgroups {
            // See the module docs. dst's own (empty) parent is dropped.
            for r in crate::ct::cgroup_roots() {
                let _ = std::fs::remove_dir(r.join(&dst.cgroup_parent));
            }
            dst.cgroup_parent = src.cgroup_parent.clone();
        }
        let keys = tempfile::Builder::new()
            .prefix("berth-mig-keys-")
            .tempdir()
            .expect("tempdir");
        let mut bed = Self {
            lan,
            a,
            b,
            src,
            dst,
            keys,
            sshd: None,
        };
        bed.start_sshd();
        bed
    }

    fn key(&self, name: &str) -> PathBuf {
        self.keys.path().join(name)
    }

    fn start_sshd(&mut self) {
        for k in ["host_key", "id"] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(self.key(k))
                .output()
                .expect("run ssh-keygen");
            assert!(out.status.success(), "ssh-keygen: {out:?}");
        }
        std::fs::copy(self.key("id.pub"), self.key("authorized_keys")).unwrap();
        let cfg = format!(
            "ListenAddress {DST_ADDR}:22\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n\
             MaxStartups 50\nMaxSessions 50\n",
            self.key("host_key").display(),
            self.key("authorized_keys").display(),
            self.key("sshd.pid").display(),
        );
        std::fs::write(self.key("sshd_config"), cfg).unwrap();
        // sshd's compiled-in privilege separation directory (its own unit makes it at boot).
        let _ = std::fs::create_dir_all("/run/sshd");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns_path(&self.b)))
            .args(["/usr/sbin/sshd", "-D", "-e", "-f"])
            .arg(self.key("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.key("sshd.log"))
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .spawn()
            .expect("spawn sshd");
        self.sshd = Some(child);
        assert!(
            wait_for(Duration::from_secs(10), || {
                self.a
                    .run(
                        "sh",
                        &["-c", &format!("echo | busybox nc -w 1 {DST_ADDR} 22")],
                    )
                    .stdout
                    .starts_with(b"SSH-")
            }),
            "sshd did not come up: {}",
            std::fs::read_to_string(self.key("sshd.log")).unwrap_or_default()
        );
    }

    /// Kills the sshd's per-connection processes (its children, found by their parent PID)
    /// and then the sshd itself: every connection drops at once.
    pub fn drop_connections(&self) {
        let Some(sshd) = self.sshd_pid() else { return };
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(sshd) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sshd as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Kills the sshd (by the PID it was started with) and reaps it.
    pub fn kill_sshd(&mut self) {
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The destination, ssh options and remote berth for `migrate`.
    pub fn migrate_args(&self, ct: &str) -> Vec<String> {
        let mut v = vec![
            "migrate".to_string(),
            ct.to_string(),
            format!("root@{DST_ADDR}"),
        ];
        for o in [
            format!("IdentityFile={}", self.key("id").display()),
            "IdentitiesOnly=yes".into(),
            "StrictHostKeyChecking=no".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "LogLevel=ERROR".into(),
        ] {
            v.push("--ssh-opt".into());
            v.push(o);
        }
        v.push("--remote-berth".into());
        v.push(self.remote_berth());
        v
    }

    /// The target's berth as the source runs it over ssh (sshd clears the environment).
    pub fn remote_berth(&self) -> String {
        format!(
            "env BERTH_ROOT={} BERTH_CGROUP_PARENT={} BERTH_BPFFS={} {}",
            self.dst.root.display(),
            self.dst.cgroup_parent,
            self.dst.bpffs.display(),
            crate::ct::berth_bin().display()
        )
    }

    /// `migrate` with `extra` flags, run on the source.
    pub fn migrate(&self, ct: &str, extra: &[&str]) -> std::process::Output {
        let mut a = self.migrate_args(ct);
        a.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        self.src.run(&refs)
    }

    /// One ping from the lan to `addr`.
    pub fn lan_ping(&self, addr: &str) -> bool {
        self.lan
            .run("ping", &["-c", "1", "-W", "2", addr])
            .status
            .success()
    }

    /// Processes left of the sshd sessions (none once every migration is done).
    pub fn sshd_pid(&self) -> Option<u32> {
        self.sshd.as_ref().map(Child::id)
    }

    pub fn ns_path(&self, ns: &Ns) -> String {
        ns_path(ns)
    }
}

impl Default for Bed {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.kill_sshd();
    }
}
