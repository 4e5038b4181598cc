//! The progress bar a person sees on a terminal: rows, shards done/total, rows per second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    ticker: Option<tokio::task::JoinHandle<()>>,
    shards: usize,
}

impl Progress {
    /// A bar on stderr when `show`; otherwise nothing (log lines say the same).
    pub fn start(show: bool, estimated_rows: u64, shards: usize, rows: Arc<AtomicU64>) -> Self {
        if !show {
            return Progress {
                bar: None,
                ticker: None,
                shards,
            };
        }
        let bar = ProgressBar::with_draw_target(
            Some(estimated_rows.max(1)),
            ProgressDrawTarget::stderr(),
        );
        let style = ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{wide_bar}] {human_pos}/~{human_len} rows · {rate} · {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{} rows/s", indicatif::HumanCount(state.per_sec() as u64));
        })
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(format!("shards 0/{shards}"));
        let ticking = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            loop {
                every.tick().await;
                let seen = rows.load(Ordering::Relaxed);
                // The estimate may be low; grow the bar rather than overflow it.
                if seen > ticking.length().unwrap_or(0) {
                    ticking.set_length(seen);
                }
                ticking.set_position(seen);
            }
        });
        Progress {
            bar: Some(bar),
            ticker: Some(ticker),
            shards,
        }
    }

    pub fn shard_done(&self, done: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("shards {done}/{}", self.shards));
        }
    }

    pub fn finish(&self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
