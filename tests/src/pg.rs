//! A private PostgreSQL cluster for the fleet tests and the shipping benchmark: Debian's
//! `postgresql` binaries (/usr/lib/postgresql/<version>/bin), `initdb` into a directory of the
//! caller's, the server run as the `postgres` user on a unix socket in that directory and on
//! 127.0.0.1 at a free port, with TLS (a self-signed certificate for `localhost`) and password
//! (SCRAM) authentication over TCP. The system's cluster is never used; the server is stopped by
//! its PID (postmaster.pid) when the value is dropped.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// The role the tests connect as, and its password over TCP.
pub const USER: &str = "berth";
pub const PASSWORD: &str = "fleet-pw";

/// The newest installed server's bin directory, if any.
pub fn bin_dir() -> Option<PathBuf> {
    let mut v: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let ver = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((ver, bin))
        })
        .collect();
    v.sort();
    v.pop().map(|(_, b)| b)
}

pub struct Cluster {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub data: PathBuf,
    /// The unix socket directory (`host=` of a keyword connection string).
    pub sock: PathBuf,
    pub port: u16,
    /// The server's certificate (`sslrootcert` for verify-full against `localhost`).
    pub cert: PathBuf,
    uid: u32,
    gid: u32,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn check(what: &str, o: Output) -> Result<Output> {
    ensure!(
        o.status.success(),
        "{what}: {}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(o)
}

impl Cluster {
    /// initdb into `dir`/data (`dir` is handed to the postgres user) and start the server.
    pub fn start(dir: &Path) -> Result<Cluster> {
        let bin = bin_dir().context("no PostgreSQL server in /usr/lib/postgresql")?;
        let user = nix::unistd::User::from_name("postgres")?
            .context("no `postgres` user (Debian's postgresql package creates it)")?;
        let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
        nix::unistd::chown(dir, Some(user.uid), Some(user.gid))?;
        let c = Cluster {
            bin,
            dir: dir.to_path_buf(),
            data: dir.join("data"),
            sock: dir.to_path_buf(),
            port: free_port()?,
            cert: dir.join("server.crt"),
            uid,
            gid,
        };
        check(
            "openssl req",
            Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=localhost"])
                .args(["-addext", "subjectAltName=DNS:localhost"])
                .arg("-keyout")
                .arg(dir.join("server.key"))
                .arg("-out")
                .arg(&c.cert)
                .stdin(Stdio::null())
                .output()?,
        )?;
        for f in ["server.key", "server.crt"] {
            nix::unistd::chown(&dir.join(f), Some(user.uid), Some(user.gid))?;
        }
        std::fs::write(dir.join("pw"), PASSWORD)?;
        nix::unistd::chown(&dir.join("pw"), Some(user.uid), Some(user.gid))?;
        check(
            "initdb",
            c.as_postgres(&c.bin.join("initdb"))
                .arg("-D")
                .arg(&c.data)
                .args([
                    "-U",
                    USER,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ])
                .arg(format!("--pwfile={}", dir.join("pw").display()))
                .args(["-E", "UTF8", "--no-sync"])
                .output()?,
        )?;
        // Only the tests' own addresses: the socket in `dir` and loopback.
        std::fs::write(
            c.data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )?;
        c.pg_start()?;
        Ok(c)
    }

    fn as_postgres(&self, prog: &Path) -> Command {
        let mut cmd = Command::new(prog);
        cmd.uid(self.uid)
            .gid(self.gid)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .env("LC_ALL", "C");
        cmd
    }

    /// Starts the server (again) on the same data directory, port and socket.
    pub fn pg_start(&self) -> Result<()> {
        let opts = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c fsync=on -c max_connections=40",
            self.sock.display(),
            self.port,
            self.cert.display(),
            self.dir.join("server.key").display()
        );
        check(
            "pg_ctl start",
            self.as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-o", &opts, "-w", "-t", "60", "start"])
                .output()?,
        )?;
        Ok(())
    }

    /// `pg_ctl stop -m MODE` (`immediate`: what a crash of the database looks like).
    pub fn pg_stop(&self, mode: &str) -> Result<()> {
        check(
            "pg_ctl stop",
            self.as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", mode, "-w", "-t", "60", "stop"])
                .output()?,
        )?;
        Ok(())
    }

    /// The postmaster's PID while it runs.
    pub fn pid(&self) -> Option<i32> {
        let s = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        s.lines().next()?.trim().parse().ok()
    }

    /// Keyword connection string over the unix socket.
    pub fn socket_url(&self) -> String {
        format!(
            "host={} port={} dbname=postgres user={USER} sslmode=disable",
            self.sock.display(),
            self.port
        )
    }

    /// URL over TCP with TLS checked against the server's certificate and a password.
    pub fn tls_url(&self) -> String {
        format!(
            "postgresql://{USER}:{PASSWORD}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            self.port,
            self.cert.display()
        )
    }

    /// One SQL statement through psql on the socket; the rows unaligned, `|`-separated.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let o = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.sock)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()?;
        let o = check(&format!("psql {sql}"), o)?;
        Ok(String::from_utf8_lossy(&o.stdout).trim_end().to_string())
    }

    /// Polls `sql` until `done` accepts its output.
    pub fn wait_for(
        &self,
        sql: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let t0 = Instant::now();
        loop {
            if let Ok(v) = self.psql(sql)
                && done(&v)
            {
                return Ok(v);
            }
            if t0.elapsed() > timeout {
                bail!("{sql}: not done after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.pid().is_some()
            && self.pg_stop("fast").is_err()
            && let Some(pid) = self.pid()
        {
            // SIGQUIT: the postmaster's immediate shutdown.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGQUIT,
            );
        }
    }
}
