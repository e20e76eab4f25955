//! What a training run reports: `losses.csv` (`loss_log`), the loss curve `loss.png` (`plot`),
//! and how a loop reports its progress (`progress`).

mod loss_log;
mod plot;
mod progress;

pub use loss_log::LossLog;
pub use progress::{Silent, StepReport, TrainObserver};

pub const LOSS_CSV: &str = "losses.csv";
pub const LOSS_PLOT: &str = "loss.png";
