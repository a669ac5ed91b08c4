//! Progress of long CLI work (downloads, model loading): an indicatif bar
//! on a terminal, plain lines otherwise (logs and CI keep no escape codes
//! and no carriage returns).

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

/// A unit of work shown as it goes.
pub enum Progress {
    /// stderr is a terminal.
    Bar(ProgressBar),
    /// stderr is a file or pipe: a line every tenth of the way.
    Lines(LineReport),
}

/// The plain-lines form.
pub struct LineReport {
    label: String,
    bytes: bool,
    total: u64,
    done: u64,
    reported_tenths: u64,
    announced: bool,
    started: Instant,
}

impl LineReport {
    fn amount(&self, n: u64) -> String {
        if self.bytes {
            HumanBytes(n).to_string()
        } else {
            n.to_string()
        }
    }
}

fn on_terminal() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

impl Progress {
    fn new(label: &str, bytes: bool, template: &str) -> Self {
        if on_terminal() {
            let bar = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label.to_string());
            Progress::Bar(bar)
        } else {
            Progress::Lines(LineReport { label: label.to_string(), bytes, total: 0, done: 0, reported_tenths: 0, announced: false, started: Instant::now() })
        }
    }

    /// Progress through bytes (a download).
    pub fn bytes(label: &str) -> Self {
        Progress::new(label, true, "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})")
    }

    /// Progress through `total` items (tensors of a model being loaded).
    pub fn items(label: &str, total: u64) -> Self {
        let mut p = Progress::new(label, false, "{msg} [{elapsed_precise}] [{wide_bar}] {pos}/{len}");
        p.start(total);
        p
    }

    /// Sets the amount the work comes to.
    pub fn start(&mut self, total: u64) {
        match self {
            Progress::Bar(b) => b.set_length(total),
            Progress::Lines(l) => {
                // A resumed download starts again with the same total: one line is enough.
                if !l.announced || l.total != total {
                    l.announced = true;
                    l.total = total;
                    l.started = Instant::now();
                    eprintln!("{}: {} to go", l.label, l.amount(total));
                }
            }
        }
    }

    /// `n` more done.
    pub fn advance(&mut self, n: u64) {
        match self {
            Progress::Bar(b) => b.inc(n),
            Progress::Lines(l) => {
                l.done += n;
                if l.total > 0 {
                    let tenths = (l.done * 10 / l.total).min(10);
                    if tenths > l.reported_tenths && tenths < 10 {
                        l.reported_tenths = tenths;
                        eprintln!("{}: {}% ({} of {})", l.label, tenths * 10, l.amount(l.done), l.amount(l.total));
                    }
                }
            }
        }
    }

    /// The work is complete.
    pub fn finish(&mut self) {
        match self {
            Progress::Bar(b) => b.finish(),
            Progress::Lines(l) => {
                eprintln!("{}: done, {} in {:.1} s", l.label, l.amount(l.done), l.started.elapsed().as_secs_f64());
            }
        }
    }
}

impl hf_hub::api::Progress for Progress {
    fn init(&mut self, size: usize, _filename: &str) {
        self.start(size as u64);
    }

    fn update(&mut self, size: usize) {
        self.advance(size as u64);
    }

    fn finish(&mut self) {
        Progress::finish(self);
    }
}
