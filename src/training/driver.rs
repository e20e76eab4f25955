//! The loop both trainers run, so that stopping, checkpointing and sampling behave the same for
//! the VAE and the U-Net: steps until `max_steps` or until the observer stops it (Ctrl-C),
//! a checkpoint every `save_every` steps and always at the end, samples every `sample_every`
//! steps and at the end of a finished run.

use super::metrics::{StepReport, TrainObserver};

/// What the loop needs from a trainer.
pub trait TrainingRun {
    /// Optimizer updates completed, those before a resume included.
    fn step(&self) -> usize;
    /// One optimizer update (recorded in the run's loss log).
    fn train_step(&mut self) -> anyhow::Result<StepOutcome>;
    fn save_checkpoint(&mut self, observer: &mut dyn TrainObserver) -> anyhow::Result<()>;
    fn save_samples(&mut self, observer: &mut dyn TrainObserver) -> anyhow::Result<()>;
}

/// What one update reports to the observer.
pub struct StepOutcome {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Named loss terms, the total among them.
    pub losses: Vec<(&'static str, f64)>,
}

/// When the loop stops, saves and samples (periods of 0 mean never, but the end).
pub struct LoopPlan {
    pub max_steps: usize,
    pub save_every: usize,
    pub sample_every: usize,
    /// The run started from a checkpoint of its current step (which need not be saved again).
    pub resumed: bool,
}

/// Runs `run` as `plan` says; returns whether the observer stopped it before `max_steps`.
pub fn run_loop(
    run: &mut dyn TrainingRun,
    plan: &LoopPlan,
    observer: &mut dyn TrainObserver,
) -> anyhow::Result<bool> {
    let mut checkpointed_at = plan.resumed.then_some(run.step());
    let mut sampled_at = None;
    observer.on_start(run.step(), plan.max_steps);
    let mut interrupted = false;
    while run.step() < plan.max_steps {
        if observer.should_stop() {
            interrupted = true;
            break;
        }
        let outcome = run.train_step()?;
        let step = run.step();
        observer.on_step(&StepReport {
            step,
            max_steps: plan.max_steps,
            lr: outcome.lr,
            grad_norm: outcome.grad_norm,
            losses: &outcome.losses,
        });
        // The last step's checkpoint is written after the loop, once.
        if step < plan.max_steps && is_due(step, plan.save_every) {
            run.save_checkpoint(observer)?;
            checkpointed_at = Some(step);
        }
        if is_due(step, plan.sample_every) {
            run.save_samples(observer)?;
            sampled_at = Some(step);
        }
    }
    let step = run.step();
    if checkpointed_at != Some(step) {
        run.save_checkpoint(observer)?;
    }
    if !interrupted && plan.sample_every > 0 && sampled_at != Some(step) {
        run.save_samples(observer)?;
    }
    Ok(interrupted)
}

fn is_due(step: usize, every: usize) -> bool {
    every > 0 && step.is_multiple_of(every)
}
