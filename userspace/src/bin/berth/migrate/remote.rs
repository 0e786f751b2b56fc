//! The transport of a migration: one ssh connection to the target (a control master every
//! later ssh and rsync reuses, so each step costs a round trip, not a handshake), the remote
//! `berth migrate-target` calls, and rsync over it.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tracing::debug;

pub struct Remote {
    dest: String,
    opts: Vec<String>,
    berth: String,
    /// The control master's socket directory (this process's own, removed at drop).
    control_dir: PathBuf,
}

/// `s` single-quoted for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Remote {
    /// Checks the options (rsync passes its ssh command through a word split, so an option
    /// must be one word) and the destination; connects nothing yet.
    pub fn new(dest: &str, ssh_opts: &[String], berth: &str, run_dir: &Path) -> Result<Self> {
        let host = dest.rsplit_once('@').map_or(dest, |(_, h)| h);
        if host.is_empty()
            || dest.starts_with('-')
            || dest.contains(|c: char| c.is_whitespace() || c == ':' || c == '/' || c == '\'')
        {
            bail!("bad destination {dest:?}: expected [user@]HOST");
        }
        for o in ssh_opts {
            if !o.contains('=')
                || o.starts_with('-')
                || o.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"' || c == '\\')
            {
                bail!(
                    "bad --ssh-opt {o:?}: expected one KEY=VALUE word as ssh's -o takes it \
                     (no spaces or quotes)"
                );
            }
        }
        if berth.trim().is_empty() {
            bail!("--remote-berth is empty");
        }
        let control_dir = run_dir.join(format!("migrate-{}", std::process::id()));
        std::fs::create_dir_all(&control_dir)
            .with_context(|| format!("creating {}", control_dir.display()))?;
        Ok(Self {
            dest: dest.to_string(),
            opts: ssh_opts.to_vec(),
            berth: berth.to_string(),
            control_dir,
        })
    }

    fn ssh_opts(&self) -> Vec<String> {
        // ssh keeps the first value given for an option: the user's come first.
        let mut v: Vec<String> = self.opts.clone();
        v.extend(
            [
                "BatchMode=yes",
                "ConnectTimeout=10",
                "ServerAliveInterval=5",
                "ServerAliveCountMax=3",
                "ControlMaster=auto",
                "ControlPersist=300",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        v.push(format!(
            "ControlPath={}",
            self.control_dir.join("cm").display()
        ));
        v.into_iter().flat_map(|o| ["-o".to_string(), o]).collect()
    }

    fn ssh(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.ssh_opts());
        c
    }

    /// Opens the connection (and so the control master): a host that cannot be reached is the
    /// first error, before anything is changed anywhere.
    pub fn connect(&self) -> Result<()> {
        let out = self
            .ssh()
            .arg(&self.dest)
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("running ssh (is openssh-client installed?)")?;
        if !out.status.success() {
            bail!(
                "cannot reach {} over ssh: {}",
                self.dest,
                last_line(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `berth --json migrate-target <args>` on the target with `stdin`; its JSON answer,
    /// or its error message as the error.
    pub fn target(&self, args: &[String], stdin: Option<&[u8]>) -> Result<Value> {
        let mut cmd = format!("{} --json migrate-target", self.berth);
        for a in args {
            cmd.push(' ');
            cmd.push_str(&shell_quote(a));
        }
        debug!(dest = %self.dest, %cmd, "remote");
        let mut child = self
            .ssh()
            .arg(&self.dest)
            .arg(&cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ssh")?;
        if let Some(mut w) = child.stdin.take() {
            w.write_all(stdin.unwrap_or_default())
                .context("sending to the target")?;
        }
        let out = child.wait_with_output().context("waiting for ssh")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let json: Option<Value> = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l.trim()).ok());
        if out.status.success() {
            return json.ok_or_else(|| {
                anyhow!(
                    "the target's berth answered no JSON: {}",
                    last_line(&out.stderr)
                )
            });
        }
        if let Some(e) = json.as_ref().and_then(|j| j["error"].as_str()) {
            bail!("on {}: {e}", self.dest);
        }
        // 255: ssh's own failure (connection lost, refused).
        if out.status.code() == Some(255) {
            bail!("ssh to {} failed: {}", self.dest, last_line(&out.stderr));
        }
        bail!(
            "on {}: `{cmd}` failed ({}): {}",
            self.dest,
            out.status,
            last_line(&out.stderr)
        )
    }

    /// One rsync pass of `src/` onto the target's `dst/` (numeric ids, hard links, ACLs,
    /// xattrs, sparse files; what is gone here goes there). Returns the bytes of file data it
    /// had to send. With `progress` rsync's own progress line is shown on stderr.
    pub fn rsync(&self, src: &Path, dst: &Path, progress: bool) -> Result<u64> {
        let ssh_cmd = std::iter::once("ssh".to_string())
            .chain(self.ssh_opts())
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("rsync");
        c.args(["-aHAXS", "--numeric-ids", "--delete", "-x"])
            .arg("--info=stats2")
            .arg("-e")
            .arg(ssh_cmd);
        if progress {
            c.arg("--info=progress2");
        }
        let mut s = src.as_os_str().to_owned();
        s.push("/");
        c.arg(s)
            .arg(format!("{}:{}/", self.dest, dst.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().context("running rsync (is it installed?)")?;
        let mut stdout = child.stdout.take().expect("piped");
        let echo = progress && std::io::stderr().is_terminal();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if echo {
                    let _ = std::io::stderr().write_all(&buf[..n]);
                }
                all.extend_from_slice(&buf[..n]);
            }
            all
        });
        let out = child.wait_with_output().context("waiting for rsync")?;
        let text = reader.join().unwrap_or_default();
        if echo {
            eprint!("\r\x1b[K");
        }
        if !out.status.success() {
            bail!(
                "rsync to {}:{} failed ({}): {}",
                self.dest,
                dst.display(),
                out.status,
                last_line(&out.stderr)
            );
        }
        Ok(parse_transferred(&String::from_utf8_lossy(&text)))
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Ends the control master (it would linger for ControlPersist otherwise).
        let _ = self
            .ssh()
            .args(["-O", "exit"])
            .arg(&self.dest)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(10));
        let _ = std::fs::remove_dir_all(&self.control_dir);
    }
}

fn last_line(b: &[u8]) -> String {
    let t = String::from_utf8_lossy(b);
    t.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no message")
        .to_string()
}

/// rsync's "Total transferred file size: 1,234 bytes".
fn parse_transferred(stats: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("Total transferred file size:"))
        .map(|r| {
            r.chars()
                .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == ' ')
                .filter(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("101"), "101");
        assert_eq!(shell_quote("/a b"), "'/a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn transferred_bytes_come_from_rsyncs_stats() {
        let s = "Number of files: 3\nTotal transferred file size: 10,485,760 bytes\n";
        assert_eq!(parse_transferred(s), 10_485_760);
        assert_eq!(parse_transferred("nothing"), 0);
    }
}
