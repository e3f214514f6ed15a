//! How `kiln template build` shows a build: on a terminal, one progress line per step
//! (spinner, `[i/N]`, the instruction, its time; `CACHED` for layer-cache hits) with the
//! running step's last output lines beneath it; otherwise the server's log lines as
//! they come.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kiln_client::BuildLogEntry;

/// Output lines of the running step kept on screen.
const TAIL_LINES: usize = 5;

/// A step title as the server logs it: `[builder 3/11] RUN ...`, optionally `CACHED `
/// before it and ` [<layer hash>]` after it.
#[derive(Debug, PartialEq, Eq)]
struct StepTitle {
    index: usize,
    total: usize,
    what: String,
    cached: bool,
}

fn parse_title(message: &str) -> Option<StepTitle> {
    let (cached, rest) = match message.strip_prefix("CACHED ") {
        Some(rest) => (true, rest),
        None => (false, message),
    };
    let rest = rest.strip_prefix("[builder ")?;
    let (counts, what) = rest.split_once("] ")?;
    let (index, total) = counts.split_once('/')?;
    let what = match what.rsplit_once(" [") {
        Some((w, hash)) if hash.ends_with(']') => w,
        _ => what,
    };
    Some(StepTitle {
        index: index.parse().ok()?,
        total: total.parse().ok()?,
        what: what.trim().to_string(),
        cached,
    })
}

pub struct BuildProgress {
    fancy: Option<Fancy>,
}

struct Fancy {
    multi: MultiProgress,
    step: Option<ProgressBar>,
    tail: ProgressBar,
    lines: VecDeque<String>,
}

fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let cut: String = s.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

impl BuildProgress {
    pub fn new() -> Self {
        let fancy = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let tail = multi.add(ProgressBar::new_spinner());
            tail.set_style(ProgressStyle::with_template("{msg:.dim}").expect("static template"));
            Fancy {
                multi,
                step: None,
                tail,
                lines: VecDeque::new(),
            }
        });
        BuildProgress { fancy }
    }

    pub fn on_log(&mut self, entry: &BuildLogEntry) {
        let Some(f) = self.fancy.as_mut() else {
            eprintln!("{}", entry.message);
            return;
        };
        if let Some(title) = parse_title(&entry.message) {
            f.finish_step();
            let bar = f.multi.insert_before(&f.tail, ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {msg} {elapsed:.dim}")
                    .expect("static template"),
            );
            bar.set_prefix(format!("[{}/{}]", title.index, title.total));
            if title.cached {
                bar.set_style(
                    ProgressStyle::with_template("  {prefix:.bold} {msg} {wide_msg:.dim}")
                        .expect("static template"),
                );
                bar.finish_with_message(format!("{} CACHED", short(&title.what, 100)));
            } else {
                bar.set_message(short(&title.what, 100));
                bar.enable_steady_tick(Duration::from_millis(120));
                f.step = Some(bar);
            }
            return;
        }
        let is_step_output = entry
            .step
            .as_deref()
            .is_some_and(|s| s.parse::<usize>().is_ok());
        if is_step_output && f.step.is_some() {
            for line in entry.message.lines() {
                f.lines.push_back(short(line, 160));
            }
            while f.lines.len() > TAIL_LINES {
                f.lines.pop_front();
            }
            let tail: Vec<String> = f.lines.iter().map(|l| format!("    {l}")).collect();
            f.tail.set_message(tail.join("\n"));
        } else {
            f.finish_step();
            let _ = f.multi.println(&entry.message);
        }
    }

    /// Ends the display (the outcome is printed by the caller).
    pub fn finish(&mut self, ok: bool) {
        if let Some(f) = self.fancy.as_mut() {
            if ok {
                f.finish_step();
                f.tail.finish_and_clear();
            } else {
                // Keep the failing step and its output on screen.
                if let Some(bar) = f.step.take() {
                    bar.abandon_with_message(format!("{} FAILED", bar.message()));
                }
                f.tail.abandon();
            }
        }
    }
}

impl Fancy {
    fn finish_step(&mut self) {
        if let Some(bar) = self.step.take() {
            bar.set_style(
                ProgressStyle::with_template("{prefix:.bold.green} {msg} {elapsed:.dim}")
                    .expect("static template"),
            );
            bar.finish();
        }
        self.lines.clear();
        self.tail.set_message("");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_titles() {
        assert_eq!(
            parse_title("[builder 3/11] RUN pip install x [0123abcd]"),
            Some(StepTitle {
                index: 3,
                total: 11,
                what: "RUN pip install x".into(),
                cached: false
            })
        );
        let t = parse_title("CACHED [builder 10/11] USER user [0942faaf]").unwrap();
        assert!(t.cached);
        assert_eq!((t.index, t.total, t.what.as_str()), (10, 11, "USER user"));
        let t = parse_title("CACHED [builder 3/11] ENV A 1").unwrap();
        assert_eq!(t.what, "ENV A 1");
        assert_eq!(parse_title("[base] FROM e2bdev/base [abc]"), None);
        assert_eq!(parse_title("Collecting numpy"), None);
    }
}
