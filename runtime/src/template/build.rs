//! Building templates: offline from a static busybox, or a Debian tree with debootstrap.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path};
use std::process::Command;

use super::{
    Result, TemplateError, TemplateInfo, TemplateKind, TemplateStore, io_err, now_unix, tree_size,
    validate_name,
};

/// The line that makes sysvinit halt on SIGPWR: with no /etc/powerstatus, init treats SIGPWR as
/// "power failing" and runs `powerfail` entries.
pub(crate) const POWERFAIL_LINE: &str = "pf::powerfail:/sbin/init 0";

/// busybox init reads this. berth has already mounted /proc, /sys, /dev and /run when init
/// starts, so rcS mounts nothing. SIGUSR2 makes busybox init run the shutdown actions, kill
/// everything and call reboot(POWER_OFF), which in a PID namespace ends the namespace's init.
const BUSYBOX_INITTAB: &str = "\
::sysinit:/etc/init.d/rcS
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
";

const BUSYBOX_RCS: &str = "\
#!/bin/sh
# berth mounts /proc, /sys, /dev and /run, sets the hostname and brings lo up before init
# starts: nothing to do here but the admin's rc.local.
[ -x /etc/rc.local ] && /etc/rc.local
exit 0
";

/// The init a Debian template boots: what debootstrap installs and how berth powers it off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DebianInit {
    /// sysvinit-core; halts on SIGPWR through the powerfail inittab entry berth adds.
    #[default]
    Sysvinit,
    /// systemd-sysv (/sbin/init → /lib/systemd/systemd); SIGRTMIN+4 starts poweroff.target.
    Systemd,
}

/// `--init` named something other than `systemd` or `sysvinit`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown init {0:?} for a Debian template (choose systemd or sysvinit)")]
pub struct UnknownInit(pub String);

impl std::str::FromStr for DebianInit {
    type Err = UnknownInit;
    fn from_str(s: &str) -> std::result::Result<Self, UnknownInit> {
        match s {
            "sysvinit" => Ok(DebianInit::Sysvinit),
            "systemd" => Ok(DebianInit::Systemd),
            _ => Err(UnknownInit(s.to_string())),
        }
    }
}

impl DebianInit {
    pub fn name(self) -> &'static str {
        match self {
            DebianInit::Sysvinit => "sysvinit",
            DebianInit::Systemd => "systemd",
        }
    }

    /// debootstrap's `--include`: the init package and what a CT's network setup uses.
    fn include(self) -> &'static str {
        match self {
            DebianInit::Sysvinit => "--include=sysvinit-core,ifupdown,iproute2",
            DebianInit::Systemd => "--include=systemd-sysv,ifupdown,iproute2",
        }
    }

    fn stop_signal(self) -> &'static str {
        match self {
            DebianInit::Sysvinit => "SIGPWR",
            // systemd(1): SIGRTMIN+4 "Enters the poweroff.target unit"; in a container that
            // ends in reboot(POWER_OFF), which exits the pid namespace's init.
            DebianInit::Systemd => "SIGRTMIN+4",
        }
    }
}

fn write(root: &Path, rel: &str, text: &str, mode: u32) -> Result<()> {
    let p = root.join(rel);
    fs::write(&p, text).map_err(io_err("write", &p))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &p))
}

/// Returns an error unless `binary` is a statically linked ELF: a dynamic busybox would need the
/// host's libc inside the CT.
fn check_static_elf(binary: &Path) -> Result<()> {
    let refuse = |why: String| TemplateError::Refused {
        op: "build busybox template from",
        path: binary.to_path_buf(),
        why,
    };
    let mut f = fs::File::open(binary).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            refuse("not found (apt-get install busybox-static)".into())
        } else {
            io_err("open", binary)(e)
        }
    })?;
    let mut ehdr = [0u8; 64];
    f.read_exact(&mut ehdr)
        .map_err(|_| refuse("not an ELF executable".into()))?;
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(refuse("not a 64-bit little-endian ELF executable".into()));
    }
    let u64_at = |o: usize| u64::from_le_bytes(ehdr[o..o + 8].try_into().unwrap_or([0; 8]));
    let u16_at = |o: usize| u16::from_le_bytes([ehdr[o], ehdr[o + 1]]);
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54) as u64, u16_at(56) as u64);
    let mut all = Vec::new();
    let mut f = fs::File::open(binary).map_err(io_err("open", binary))?;
    f.read_to_end(&mut all).map_err(io_err("read", binary))?;
    for i in 0..phnum {
        let off = (phoff + i * phentsize) as usize;
        let Some(ph) = all.get(off..off + 4) else {
            return Err(refuse("truncated ELF program headers".into()));
        };
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(ph.try_into().unwrap_or([0; 4])) == PT_INTERP {
            return Err(refuse(
                "dynamically linked; install busybox-static for a self-contained binary".into(),
            ));
        }
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> Result<std::process::Output> {
    let out = cmd.output().map_err(|e| TemplateError::Command {
        what: what.to_string(),
        why: if e.kind() == std::io::ErrorKind::NotFound {
            format!("{:?} not found", cmd.get_program())
        } else {
            e.to_string()
        },
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = stderr.lines().chain(stdout.lines()).rev().take(8).collect();
        return Err(TemplateError::Command {
            what: what.to_string(),
            why: format!(
                "{}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        });
    }
    Ok(out)
}

/// Adds [`POWERFAIL_LINE`] to an inittab unless a `powerfail` action is already configured, and
/// comments out getty lines: a CT has no tty1..6, and sysvinit would respawn them in a loop.
pub(crate) fn ensure_powerfail(inittab: &Path) -> Result<()> {
    let text = fs::read_to_string(inittab).map_err(io_err("read", inittab))?;
    let (new, changed) = edit_inittab(&text);
    if changed {
        fs::write(inittab, new).map_err(io_err("write", inittab))?;
    }
    Ok(())
}

pub(crate) fn edit_inittab(text: &str) -> (String, bool) {
    let mut out = String::with_capacity(text.len() + 64);
    let mut has_powerfail = false;
    let mut changed = false;
    for line in text.lines() {
        let t = line.trim_start();
        let fields: Vec<&str> = t.splitn(4, ':').collect();
        let active = !t.starts_with('#') && fields.len() == 4;
        if active && t == POWERFAIL_LINE {
            has_powerfail = true;
        } else if active && fields[2].starts_with("power") {
            // Debian ships `pf::powerwait:/etc/init.d/powerfail start`: the same id as ours
            // (sysvinit then ignores the second "pf" line) and a script a CT does not have.
            out.push_str("# disabled by berth (SIGPWR halts the CT): ");
            changed = true;
        }
        if active
            && fields[2] == "respawn"
            && fields[3].contains("getty")
            && fields[3].contains("tty")
        {
            out.push_str("# disabled by berth (no ttys in a CT): ");
            changed = true;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !has_powerfail {
        out.push_str(
            "# berth stops the CT with SIGPWR; with no /etc/powerstatus init runs this.\n",
        );
        out.push_str(POWERFAIL_LINE);
        out.push('\n');
        changed = true;
    }
    (out, changed)
}

impl TemplateStore {
    /// Builds a busybox template offline from the static busybox binary (Debian: busybox-static).
    pub fn build_busybox(&self, name: &str) -> Result<TemplateInfo> {
        validate_name(name)?;
        self.ensure_absent(name)?;
        let bin = self.busybox.clone();
        check_static_elf(&bin)?;
        let version = run(Command::new(&bin).arg("--help"), "busybox --help")
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        let list = run(Command::new(&bin).arg("--list-full"), "busybox --list-full")?;
        let list = String::from_utf8_lossy(&list.stdout).into_owned();

        let scratch = self.scratch("build", name)?;
        let root = scratch.rootfs();
        for (dir, mode) in [
            ("bin", 0o755),
            ("sbin", 0o755),
            ("etc", 0o755),
            ("etc/init.d", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("dev", 0o755),
            ("run", 0o755),
            ("tmp", 0o1777),
            ("root", 0o700),
            ("var", 0o755),
            ("var/log", 0o755),
            ("usr", 0o755),
            ("usr/bin", 0o755),
            ("usr/sbin", 0o755),
            ("home", 0o755),
        ] {
            let p = root.join(dir);
            fs::DirBuilder::new()
                .mode(mode)
                .create(&p)
                .map_err(io_err("create directory", &p))?;
            // mkdir applies the umask; the sticky /tmp and 0555 /proc need the exact mode.
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &p))?;
        }
        let target = root.join("bin/busybox");
        fs::copy(&bin, &target).map_err(io_err("copy busybox to", &target))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", &target))?;
        let mut links = 0usize;
        for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let rel = Path::new(applet);
            if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(TemplateError::Command {
                    what: "busybox --list-full".into(),
                    why: format!("unexpected applet path {applet:?}"),
                });
            }
            // The list includes bin/busybox itself; linking it would replace the binary with a
            // symlink to itself.
            if rel == Path::new("bin/busybox") {
                continue;
            }
            let link = root.join(rel);
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
            }
            match std::os::unix::fs::symlink("/bin/busybox", &link) {
                Ok(()) => links += 1,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("create applet link", &link)(e)),
            }
        }
        if !fs::symlink_metadata(root.join("sbin/init")).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(TemplateError::Refused {
                op: "build busybox template from",
                path: bin.clone(),
                why: "this busybox has no init applet".into(),
            });
        }
        write(
            &root,
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        )?;
        write(&root, "etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
        // Locked root password: set one inside the CT (berth exec 101 passwd) if logins are wanted.
        write(
            &root,
            "etc/shadow",
            "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
            0o600,
        )?;
        write(&root, "etc/hostname", "localhost\n", 0o644)?;
        write(
            &root,
            "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        )?;
        write(&root, "etc/inittab", BUSYBOX_INITTAB, 0o644)?;
        write(&root, "etc/init.d/rcS", BUSYBOX_RCS, 0o755)?;
        let info = TemplateInfo {
            name: name.to_string(),
            kind: TemplateKind::Busybox,
            created: now_unix(),
            source: format!("{} ({version})", bin.display()),
            init: "/sbin/init".into(),
            stop_signal: "SIGUSR2".into(),
            size: tree_size(&root)?,
        };
        scratch.commit(self, &info)?;
        tracing::info!(template = %name, applets = links, "built busybox template");
        Ok(info)
    }

    /// Builds a Debian template with `debootstrap --variant=minbase` (needs network access to the
    /// mirror unless it is a local one) and the chosen init: sysvinit-core (powered off with
    /// SIGPWR) or systemd-sysv (SIGRTMIN+4).
    pub fn build_debian(
        &self,
        suite: &str,
        name: &str,
        mirror: Option<&str>,
        init: DebianInit,
    ) -> Result<TemplateInfo> {
        validate_name(name)?;
        if suite.is_empty()
            || !suite
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(TemplateError::Command {
                what: "debootstrap".into(),
                why: format!("invalid suite {suite:?} (e.g. bookworm, trixie, stable)"),
            });
        }
        if let Some(m) = mirror
            && (m.is_empty() || m.starts_with('-') || m.chars().any(char::is_whitespace))
        {
            return Err(TemplateError::Command {
                what: "debootstrap".into(),
                why: format!("invalid mirror {m:?} (e.g. http://deb.debian.org/debian)"),
            });
        }
        self.ensure_absent(name)?;
        let scratch = self.scratch("build", name)?;
        let root = scratch.rootfs();
        let mut cmd = Command::new("debootstrap");
        cmd.args(["--variant=minbase", init.include(), suite])
            .arg(&root);
        if let Some(m) = mirror {
            cmd.arg(m);
        }
        tracing::info!(suite, template = %name, init = init.name(), "running debootstrap");
        let task = crate::progress::Task::start(&format!("debootstrap {suite}"), None);
        let res = run(&mut cmd, &format!("debootstrap {suite}")).map_err(|e| match e {
            TemplateError::Command { what, why } if why.contains("not found") => {
                TemplateError::Command {
                    what,
                    why: format!("{why} (apt-get install debootstrap)"),
                }
            }
            e => e,
        });
        drop(task);
        res?;
        match init {
            DebianInit::Sysvinit => ensure_powerfail(&root.join("etc/inittab"))?,
            // Nothing to mask: with its delegated cgroup, a console it owns and /run, Debian 12's
            // systemd reaches `running` with no failed unit as debootstrap installs it.
            DebianInit::Systemd => {}
        }
        write(&root, "etc/hostname", "localhost\n", 0o644)?;
        write(
            &root,
            "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        )?;
        // Downloaded packages are ~40 MB of dead weight copied into every CT.
        let archives = root.join("var/cache/apt/archives");
        if let Ok(rd) = fs::read_dir(&archives) {
            for ent in rd.flatten() {
                if ent.path().extension().is_some_and(|e| e == "deb") {
                    fs::remove_file(ent.path()).map_err(io_err("remove", &ent.path()))?;
                }
            }
        }
        let info = TemplateInfo {
            name: name.to_string(),
            kind: TemplateKind::Debian,
            created: now_unix(),
            source: format!(
                "debootstrap --variant=minbase {} {suite} {}",
                init.include(),
                mirror.unwrap_or("(default mirror)")
            ),
            init: "/sbin/init".into(),
            stop_signal: init.stop_signal().into(),
            size: tree_size(&root)?,
        };
        scratch.commit(self, &info)?;
        tracing::info!(template = %name, size = info.size, "built debian template");
        Ok(info)
    }
}
