//! vzdump's `.tar.lzo` archives, decompressed by the `lzop` program (Debian package lzop): no
//! well-kept crate reads lzop's container format, and the tool is what made the archives.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

/// The first bytes of every lzop file.
pub(crate) const MAGIC: &[u8] = b"\x89LZO\x00\r\n\x1a\n";

/// The decompressed bytes of `archive`; reading past the end reports lzop's failure (a bad
/// checksum, a truncated file) as an error, so a damaged archive is never taken as complete.
pub(crate) struct Lzop {
    child: Child,
    out: ChildStdout,
    done: bool,
}

impl Lzop {
    pub(crate) fn open(archive: &Path) -> io::Result<Self> {
        let input = File::open(archive)?;
        let mut child = Command::new("lzop")
            .args(["-d", "-c", "-q"])
            .stdin(input)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("run lzop (Debian package lzop): {e}"))
            })?;
        let out = child.stdout.take().expect("stdout is piped");
        Ok(Self {
            child,
            out,
            done: false,
        })
    }
}

impl Read for Lzop {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.out.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.done {
            self.done = true;
            let status = self.child.wait()?;
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(io::Error::other(format!(
                    "lzop -d: {status}: {}",
                    err.trim()
                )));
            }
        }
        Ok(n)
    }
}

impl Drop for Lzop {
    fn drop(&mut self) {
        if !self.done {
            // An extraction that stopped early (a refused entry): lzop is ours to end and reap.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
