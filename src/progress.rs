//! Progress of a run: bytes written, shown as a bar (rate and ETA) on stderr only when it is
//! a terminal, and reported to an optional observer (library users, tests).

use std::fmt;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Called after each chunk is written, with the bytes written so far.
#[derive(Clone)]
pub struct Observer(pub Arc<dyn Fn(u64) + Send + Sync>);

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Observer")
    }
}

/// Bytes fetched from remote inputs so far.
pub type Fetched = Box<dyn Fn() -> u64 + Send + Sync>;

/// Bytes written by a run, counted once for the bar, the observer and the final summary;
/// with remote inputs, the bar also shows what was fetched.
pub struct Progress {
    bar: ProgressBar,
    written: AtomicU64,
    observer: Option<Observer>,
    fetched: Option<Fetched>,
}

impl Progress {
    pub fn new(
        total_bytes: u64,
        show_bar: bool,
        observer: Option<Observer>,
        fetched: Option<Fetched>,
    ) -> Progress {
        Progress {
            bar: bar(total_bytes, show_bar),
            written: AtomicU64::new(0),
            observer,
            fetched,
        }
    }

    /// Bytes fetched from remote inputs (0 without any).
    pub fn fetched(&self) -> u64 {
        self.fetched.as_ref().map_or(0, |f| f())
    }

    /// Count `n` more bytes written.
    pub fn add(&self, n: u64) {
        let total = self.written.fetch_add(n, Ordering::Relaxed) + n;
        self.bar.inc(n);
        if self.fetched.is_some() {
            self.bar
                .set_message(format!("fetched {}", crate::units::human(self.fetched())));
        }
        if let Some(Observer(f)) = &self.observer {
            f(total);
        }
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn bar(total_bytes: u64, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::hidden());
    }
    let pb = ProgressBar::new(total_bytes);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
    ) {
        pb.set_style(style);
    }
    pb
}
