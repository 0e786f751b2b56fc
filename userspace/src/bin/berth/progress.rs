//! Progress bars of the library's long operations (runtime `progress` reports): drawn on
//! stderr only when it is a terminal and `-q` is not given, so pipes and logs get none.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use berth_runtime::progress::{self, Sink};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Installs the bars when stderr is a terminal and not `quiet`.
pub fn init(quiet: bool) {
    if !quiet && std::io::stderr().is_terminal() {
        progress::install(Box::new(Bars(Mutex::new(None))));
    }
}

struct Bars(Mutex<Option<ProgressBar>>);

impl Sink for Bars {
    fn start(&self, what: &str, total: Option<u64>) {
        let pb = match total {
            Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr())
                .with_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                ),
            // No size known (debootstrap): a spinner with the time so far.
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .expect("a valid template"),
            ),
        };
        pb.set_message(what.to_owned());
        pb.enable_steady_tick(Duration::from_millis(200));
        let mut cur = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = cur.replace(pb) {
            old.finish_and_clear();
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(pb) = &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            pb.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(pb) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            pb.finish_and_clear();
        }
    }
}
