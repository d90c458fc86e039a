//! Progress: nested bars on a terminal (cells, then a cell's steps, then its evaluation
//! batches; the base's and the reward model's training), plain log lines under `--quiet` or
//! when stderr is not a terminal (a log file, CI).
//!
//! On a real model one step can take minutes, so the bars tick every second (their elapsed
//! time moves while a step runs). A plain bar writes a line when [`PLAIN_LINE_SECONDS`] have
//! passed since its start or its last line, and a top-level bar (depth 0 or 1) one at its end;
//! an evaluation that takes seconds writes nothing.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Seconds between two plain lines of one bar.
const PLAIN_LINE_SECONDS: f64 = 30.0;

/// Where the study's progress goes.
pub(crate) struct Progress {
    multi: MultiProgress,
    plain: bool,
}

impl Progress {
    /// Bars on a terminal; plain lines with `quiet` or without a terminal.
    pub(crate) fn new(quiet: bool) -> Self {
        let plain = quiet || !std::io::stderr().is_terminal();
        let multi =
            if plain { MultiProgress::with_draw_target(ProgressDrawTarget::hidden()) } else { MultiProgress::new() };
        Self { multi, plain }
    }

    /// One line above the bars.
    pub(crate) fn log(&self, message: impl AsRef<str>) {
        if self.plain {
            eprintln!("{}", message.as_ref());
        } else {
            let _ = self.multi.println(message.as_ref());
        }
    }

    /// A bar of `len` units named `label`, indented `depth` levels under the bars above it.
    pub(crate) fn bar(&self, len: u64, label: impl Into<String>, depth: usize) -> Bar {
        let label = label.into();
        let indent = "  ".repeat(depth);
        let bar = self.multi.add(ProgressBar::new(len));
        let template = format!("{indent}{{prefix:32}} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed}}, eta {{eta}}]");
        bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
        bar.set_prefix(label.clone());
        if !self.plain {
            bar.enable_steady_tick(Duration::from_secs(1));
        }
        let plain = self.plain.then(|| PlainState {
            label: format!("{indent}{label}"),
            started: Instant::now(),
            last_line: None,
            end_line: depth <= 1,
        });
        Bar { bar, plain, message: String::new() }
    }
}

struct PlainState {
    label: String,
    started: Instant,
    last_line: Option<Instant>,
    /// Whether the last position gets a line even when it comes quickly.
    end_line: bool,
}

/// A bar from [`Progress::bar`]; cleared when finished or dropped.
pub(crate) struct Bar {
    bar: ProgressBar,
    plain: Option<PlainState>,
    message: String,
}

impl Bar {
    /// Starts at `position` (a resumed run).
    pub(crate) fn set_position(&self, position: u64) {
        self.bar.set_position(position);
    }

    /// The text after the counts (say, the last reward).
    pub(crate) fn set_message(&mut self, message: impl Into<String>) {
        self.message = message.into();
        self.bar.set_message(self.message.clone());
    }

    /// Advances by `units`.
    pub(crate) fn inc(&mut self, units: u64) {
        self.bar.inc(units);
        let (position, len) = (self.bar.position(), self.bar.length().unwrap_or(0));
        let Some(plain) = self.plain.as_mut() else { return };
        let due = plain.last_line.unwrap_or(plain.started).elapsed().as_secs_f64() >= PLAIN_LINE_SECONDS;
        let end = position >= len && (plain.end_line || plain.last_line.is_some());
        if due || end {
            plain.last_line = Some(Instant::now());
            let eta = (position > 0 && position < len).then(|| self.bar.eta().as_secs_f64());
            eprintln!(
                "{}",
                plain_line(&plain.label, position, len, &self.message, plain.started.elapsed().as_secs_f64(), eta)
            );
        }
    }
}

/// A plain bar's line: `label: position/len message (elapsed s, eta s)`.
fn plain_line(label: &str, position: u64, len: u64, message: &str, elapsed: f64, eta: Option<f64>) -> String {
    let message = if message.is_empty() { String::new() } else { format!(" {message}") };
    let eta = eta.map_or(String::new(), |eta| format!(", eta {eta:.0} s"));
    format!("{label}: {position}/{len}{message} ({elapsed:.0} s{eta})")
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_bar_counts_and_writes_lines() {
        let progress = Progress::new(true);
        assert!(progress.plain);
        let mut bar = progress.bar(3, "steps", 1);
        bar.set_message("reward 0.5");
        for _ in 0..3 {
            bar.inc(1);
        }
        assert_eq!(bar.bar.position(), 3);
        // A quick top-level bar writes its end line; a quick nested one writes nothing.
        assert!(bar.plain.as_ref().is_some_and(|plain| plain.label == "  steps" && plain.last_line.is_some()));
        let mut nested = progress.bar(2, "evaluation", 2);
        nested.inc(2);
        assert!(nested.plain.as_ref().is_some_and(|plain| plain.last_line.is_none()));
        assert_eq!(
            plain_line("  grpo/rules/0", 3, 10, "reward 0.500", 12.4, Some(28.0)),
            "  grpo/rules/0: 3/10 reward 0.500 (12 s, eta 28 s)"
        );
        assert_eq!(plain_line("cells", 4, 4, "", 60.0, None), "cells: 4/4 (60 s)");
    }
}
