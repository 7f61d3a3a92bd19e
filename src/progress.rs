//! Progress reporting for long work: an `indicatif` bar on a terminal, plain
//! lines (about every 10%) otherwise, nothing when quiet.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar over a known number of items.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    next_line: u64,
    plain: bool,
    start: Instant,
    message: String,
}

impl Progress {
    /// A bar for `total` items; plain lines when stderr is not a terminal,
    /// nothing at all when `quiet`.
    pub fn new(label: &str, total: u64, quiet: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!quiet && terminal).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b
        });
        Progress {
            bar,
            label: label.to_string(),
            total,
            done: 0,
            next_line: total.div_ceil(10).max(1),
            plain: !quiet && !terminal,
            start: Instant::now(),
            message: String::new(),
        }
    }

    /// Adds `n` finished items.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if self.plain && (self.done >= self.next_line || self.done == self.total) {
            eprintln!(
                "{}: {}/{} ({:.0}%) {:.1}s {}",
                self.label,
                self.done,
                self.total,
                100.0 * self.done as f64 / self.total.max(1) as f64,
                self.start.elapsed().as_secs_f64(),
                self.message
            );
            while self.next_line <= self.done {
                self.next_line += self.total.div_ceil(10).max(1);
            }
        }
    }

    /// Sets the message shown beside the bar (loss, accuracy, ...).
    pub fn set_message(&mut self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
        }
        self.message = msg;
    }

    /// Prints a line without disturbing the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None if self.plain => eprintln!("{line}"),
            None => {}
        }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
