//! Progress of long operations (archive extraction, tree copies, debootstrap) for a front end
//! to draw. The library reports into one process-wide sink that a binary installs at start
//! (the CLI draws bars on a terminal); with none installed (berthd, tests, a pipe) a report is
//! one atomic load.

use std::io::Read;
use std::sync::OnceLock;

/// Where reports go.
pub trait Sink: Send + Sync {
    /// An operation begins: `what` names it, `total` is its size in bytes if known.
    fn start(&self, what: &str, total: Option<u64>);
    /// `bytes` more of the current operation are done.
    fn advance(&self, bytes: u64);
    /// The current operation ended (done or failed).
    fn finish(&self);
}

static SINK: OnceLock<Box<dyn Sink>> = OnceLock::new();

/// Installs the process's sink; false if one was installed already.
pub fn install(sink: Box<dyn Sink>) -> bool {
    SINK.set(sink).is_ok()
}

/// One reported operation: started when made, finished when dropped (also on an error path).
pub struct Task(());

impl Task {
    pub fn start(what: &str, total: Option<u64>) -> Self {
        if let Some(s) = SINK.get() {
            s.start(what, total);
        }
        Self(())
    }

    pub fn advance(&self, bytes: u64) {
        if let Some(s) = SINK.get() {
            s.advance(bytes);
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(s) = SINK.get() {
            s.finish();
        }
    }
}

/// A reader reporting what is read through it to the current task.
pub struct Counted<R>(pub R);

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        if let Some(s) = SINK.get() {
            s.advance(n as u64);
        }
        Ok(n)
    }
}
