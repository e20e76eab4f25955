//! How a training loop reports: the observer trait and a silent observer (the command line's
//! progress display is `cli::train_progress`).

/// One optimizer step as a training loop reports it.
pub struct StepReport<'a> {
    /// Updates completed, this one included.
    pub step: usize,
    pub max_steps: usize,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Named loss terms, the total among them.
    pub losses: &'a [(&'a str, f64)],
}

/// What a training loop tells the outside world, and how it is asked to stop.
pub trait TrainObserver {
    /// Called once, before the first step of this invocation (`step` > 0 when resuming).
    fn on_start(&mut self, step: usize, max_steps: usize);
    fn on_step(&mut self, report: &StepReport);
    /// Checkpoints written, samples saved, skipped images ...
    fn on_message(&mut self, message: &str);
    /// Polled before every step; `true` makes the loop checkpoint and return.
    fn should_stop(&mut self) -> bool;
}

/// An observer that reports nothing and never stops: for library use and tests.
pub struct Silent;

impl TrainObserver for Silent {
    fn on_start(&mut self, _: usize, _: usize) {}
    fn on_step(&mut self, _: &StepReport) {}
    fn on_message(&mut self, _: &str) {}
    fn should_stop(&mut self) -> bool {
        false
    }
}
