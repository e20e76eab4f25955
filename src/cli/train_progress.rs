//! The training commands' observer: an indicatif progress bar with the losses, messages on
//! stderr, and Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressStyle};

use crate::training::metrics::{StepReport, TrainObserver};

/// The command-line observer: an indicatif bar with the losses and steps/s on a terminal
/// (hidden otherwise or with `quiet`), messages on stderr unless `quiet`, and Ctrl-C.
pub struct ConsoleProgress {
    bar: ProgressBar,
    quiet: bool,
    interrupt: &'static AtomicBool,
}

impl ConsoleProgress {
    pub fn new(quiet: bool) -> anyhow::Result<Self> {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            // Draws to stderr, and only when it is a terminal.
            ProgressBar::new(0)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Ok(Self {
            bar,
            quiet,
            interrupt: interrupt_flag()?,
        })
    }
}

impl TrainObserver for ConsoleProgress {
    fn on_start(&mut self, step: usize, max_steps: usize) {
        self.bar.set_length(max_steps as u64);
        self.bar.set_position(step as u64);
        self.bar.reset_eta();
    }

    fn on_step(&mut self, report: &StepReport) {
        let losses: Vec<String> = report
            .losses
            .iter()
            .map(|(name, value)| format!("{name} {value:.4e}"))
            .collect();
        let status = format!("{} lr {:.2e}", losses.join(" "), report.lr);
        // Without a terminal (logs, CI) a line every 5% of the run replaces the bar.
        let period = (report.max_steps / 20).max(1);
        if self.bar.is_hidden() && !self.quiet && report.step.is_multiple_of(period) {
            eprintln!("step {}/{}: {status}", report.step, report.max_steps);
        }
        self.bar.set_message(status);
        self.bar.set_position(report.step as u64);
    }

    fn on_message(&mut self, message: &str) {
        if self.quiet {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{message}");
        } else {
            self.bar.println(message);
        }
    }

    fn should_stop(&mut self) -> bool {
        let stop = self.interrupt.load(Ordering::SeqCst);
        if stop {
            self.on_message("interrupted: saving a checkpoint");
        }
        stop
    }
}

impl Drop for ConsoleProgress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// A flag that turns true on Ctrl-C (SIGINT): the training loops ask the observer before every
/// step (`should_stop`, which reads it), then save a checkpoint and return. A second Ctrl-C
/// exits at once (status 130), for when saving hangs. The handler is installed once per process.
fn interrupt_flag() -> anyhow::Result<&'static AtomicBool> {
    static FLAG: AtomicBool = AtomicBool::new(false);
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            ctrlc::set_handler(|| {
                if FLAG.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
            })
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    Ok(&FLAG)
}
