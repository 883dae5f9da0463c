//! Progress on long work (`sync`, a backfill, `demo`): a bar per source when stderr is a
//! terminal, plain log lines otherwise (journald, CI, a pipe), never escape codes there.
//!
//! The engine reports through [`crate::engine::Progress`]; this module only draws. Log
//! lines written while bars are on screen go through [`Display::log_writer`], which lifts
//! the bars, writes the line and draws them again, so the two never garble each other.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::Progress;

/// Where progress goes: bars on a terminal, or log lines.
#[derive(Clone)]
pub struct Display {
    bars: Option<MultiProgress>,
}

impl Display {
    /// Bars when `terminal` (stderr is one and logs are text), log lines otherwise.
    pub fn new(terminal: bool) -> Display {
        let bars = terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Display { bars }
    }

    /// Log lines only: for the service and for tests.
    pub fn lines() -> Display {
        Display { bars: None }
    }

    /// A writer for one log line to stderr that does not tear through the bars (stderr
    /// itself when there are none).
    pub fn log_writer(&self) -> Box<dyn Write> {
        match &self.bars {
            None => Box::new(std::io::stderr()),
            Some(bars) => Box::new(LogLine {
                bars: bars.clone(),
                line: Vec::new(),
            }),
        }
    }

    /// The progress of one source's pass.
    pub fn source(&self, name: &str) -> SourceProgress {
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(ProgressBar::new_spinner());
            bar.set_style(listing_style());
            bar.set_prefix(name.to_owned());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        SourceProgress {
            name: name.to_owned(),
            bar,
            started: Instant::now(),
            windows: AtomicU64::new(0),
            windows_done: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            records: AtomicU64::new(0),
        }
    }
}

fn listing_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:>14}  {msg}  {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn windows_style() -> ProgressStyle {
    ProgressStyle::with_template("  {prefix:>14}  [{bar:28}] {pos}/{len} windows  {msg}  {elapsed}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// One log line, written to stderr when dropped (the fmt layer drops the writer at the
/// end of each event), with the bars lifted meanwhile.
struct LogLine {
    bars: MultiProgress,
    line: Vec<u8>,
}

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        self.bars.suspend(|| {
            // A log line that cannot reach stderr has nowhere else to go.
            let _ = std::io::stderr().write_all(&self.line);
        });
    }
}

/// How one source's pass is going: a bar, or a log line per window (or per 50 pages of
/// a listing).
pub struct SourceProgress {
    name: String,
    bar: Option<ProgressBar>,
    started: Instant,
    windows: AtomicU64,
    windows_done: AtomicU64,
    pages: AtomicU64,
    records: AtomicU64,
}

/// Pages between two log lines of a listing, when there are no bars.
const PAGES_PER_LINE: u64 = 50;

impl SourceProgress {
    fn summary(&self) -> String {
        let records = self.records.load(Ordering::Relaxed);
        let pages = self.pages.load(Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        format!(
            "{pages} pages, {records} records ({:.0}/s)",
            records as f64 / seconds
        )
    }

    /// Leaves the bar on screen with how the pass ended.
    pub fn finish(&self, outcome: &str) {
        if let Some(bar) = &self.bar {
            bar.disable_steady_tick();
            bar.finish_with_message(format!("{}  {outcome}", self.summary()));
        }
    }
}

impl Progress for SourceProgress {
    fn windows_planned(&self, windows: u64) {
        self.windows.store(windows, Ordering::Relaxed);
        // Without bars, the engine's log line of the plan says it.
        if let Some(bar) = &self.bar {
            bar.set_style(windows_style());
            bar.set_length(windows);
            bar.set_position(0);
        }
    }

    fn window_done(&self) {
        let done = self.windows_done.fetch_add(1, Ordering::Relaxed) + 1;
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => tracing::info!(
                source = %self.name,
                "window {done} of {} read: {}",
                self.windows.load(Ordering::Relaxed),
                self.summary()
            ),
        }
    }

    fn window_split(&self) {
        self.windows.fetch_add(1, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc_length(1);
        }
    }

    fn page_stored(&self, records: u64) {
        let pages = self.pages.fetch_add(1, Ordering::Relaxed) + 1;
        self.records.fetch_add(records, Ordering::Relaxed);
        match &self.bar {
            Some(bar) => bar.set_message(self.summary()),
            None if self.windows.load(Ordering::Relaxed) == 0
                && pages.is_multiple_of(PAGES_PER_LINE) =>
            {
                tracing::info!(source = %self.name, "{}", self.summary());
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_terminal_there_are_no_bars_and_counts_still_add_up() {
        let display = Display::lines();
        let progress = display.source("s");
        assert!(progress.bar.is_none());
        progress.windows_planned(3);
        progress.page_stored(10);
        progress.page_stored(5);
        progress.window_done();
        assert_eq!(progress.records.load(Ordering::Relaxed), 15);
        assert_eq!(progress.windows_done.load(Ordering::Relaxed), 1);
        assert!(progress.summary().starts_with("2 pages, 15 records"));
    }
}
