//! The job queue: requests wait in FIFO order for the one worker that owns the model; at most
//! `--max-queue` may wait (the next gets 429). It also holds what the progress endpoint shows
//! and the interrupt flag the worker checks between steps.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::error::{ApiError, ErrorKind};
use super::request::{Generation, ImageRequest};

/// What the worker is asked to do.
pub enum Task {
    Generate {
        request: Box<ImageRequest>,
        reply: oneshot::Sender<Result<Generation, ApiError>>,
    },
    /// Load the named model and make it the one requests run on by default.
    SelectModel {
        name: String,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

impl Task {
    /// Whoever asked has gone (the client disconnected): the task need not run.
    pub fn abandoned(&self) -> bool {
        match self {
            Self::Generate { reply, .. } => reply.is_closed(),
            Self::SelectModel { reply, .. } => reply.is_closed(),
        }
    }
}

/// The running job, as A1111's `shared.state` describes it.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The job's kind ("txt2img", ...); empty when idle.
    pub job: String,
    pub job_timestamp: String,
    /// Batches done and in all.
    pub job_no: usize,
    pub job_count: usize,
    pub sampling_step: usize,
    pub sampling_steps: usize,
    pub started: Option<Instant>,
    pub interrupted: bool,
}

impl Progress {
    /// A1111's progress fraction (0.01 floor while running) and its estimate of the seconds
    /// left.
    pub fn fraction_and_eta(&self) -> (f64, f64) {
        let Some(started) = self.started.filter(|_| self.job_count > 0) else {
            return (0.0, 0.0);
        };
        let count = self.job_count as f64;
        let mut progress = 0.01 + self.job_no as f64 / count;
        if self.sampling_steps > 0 {
            progress += self.sampling_step as f64 / self.sampling_steps as f64 / count;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let eta = elapsed / progress - elapsed;
        (progress.min(1.0), eta.max(0.0))
    }
}

/// The queue's sending side and the state shared with the worker.
pub struct Queue {
    sender: mpsc::UnboundedSender<Task>,
    /// Tasks sent and not yet taken by the worker.
    waiting: AtomicUsize,
    max_waiting: usize,
    interrupt: AtomicBool,
    progress: Mutex<Progress>,
}

impl Queue {
    /// A queue holding at most `max_waiting` tasks, and the receiver the worker takes them from.
    pub fn new(max_waiting: usize) -> (Self, mpsc::UnboundedReceiver<Task>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let queue = Self {
            sender,
            waiting: AtomicUsize::new(0),
            max_waiting,
            interrupt: AtomicBool::new(false),
            progress: Mutex::new(Progress::default()),
        };
        (queue, receiver)
    }

    /// Queues `task` behind the others, or refuses it when the queue is full.
    pub fn submit(&self, task: Task) -> Result<(), ApiError> {
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
                (waiting < self.max_waiting).then_some(waiting + 1)
            })
            .map_err(|waiting| {
                ApiError::new(
                    ErrorKind::QueueFull,
                    format!(
                        "the queue is full: {waiting} requests are waiting (--max-queue {}); \
                         try again later",
                        self.max_waiting
                    ),
                )
            })?;
        self.sender.send(task).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            ApiError::new(ErrorKind::Internal, "the generation worker has stopped")
        })
    }

    /// The worker took a task off the queue.
    pub fn taken(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// How many tasks wait behind the running one.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Asks the running job to stop at its next step; false when nothing runs.
    pub fn interrupt(&self) -> bool {
        let mut progress = self.progress.lock().expect("progress lock");
        if progress.job.is_empty() {
            return false;
        }
        progress.interrupted = true;
        self.interrupt.store(true, Ordering::SeqCst);
        true
    }

    pub fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }

    pub fn progress(&self) -> Progress {
        self.progress.lock().expect("progress lock").clone()
    }

    /// A job of `job_count` batches starts: progress restarts and earlier interrupts are
    /// forgotten.
    pub fn begin(&self, job: &str, job_count: usize) {
        let mut progress = self.progress.lock().expect("progress lock");
        *progress = Progress {
            job: job.to_string(),
            job_timestamp: timestamp(),
            job_count,
            started: Some(Instant::now()),
            ..Progress::default()
        };
        self.interrupt.store(false, Ordering::SeqCst);
    }

    pub fn update(&self, change: impl FnOnce(&mut Progress)) {
        change(&mut self.progress.lock().expect("progress lock"));
    }

    /// The job is over.
    pub fn end(&self) {
        *self.progress.lock().expect("progress lock") = Progress::default();
        self.interrupt.store(false, Ordering::SeqCst);
    }
}

/// Seconds since the Unix epoch, as a string (A1111 uses a local date; clients only show it).
fn timestamp() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_refuses_and_taking_frees_a_place() {
        let (queue, mut receiver) = Queue::new(1);
        let task = || Task::SelectModel {
            name: "m".into(),
            reply: oneshot::channel().0,
        };
        queue.submit(task()).unwrap();
        let error = queue.submit(task()).unwrap_err();
        assert_eq!(error.kind, ErrorKind::QueueFull);
        assert!(error.message.contains("--max-queue 1"), "{error:?}");
        assert!(receiver.try_recv().is_ok());
        queue.taken();
        queue.submit(task()).unwrap();
        assert_eq!(queue.waiting(), 1);
    }

    #[test]
    fn progress_runs_from_a_floor_to_one_and_interrupts_need_a_job() {
        let (queue, _receiver) = Queue::new(1);
        assert!(!queue.interrupt());
        assert_eq!(queue.progress().fraction_and_eta(), (0.0, 0.0));
        queue.begin("txt2img", 2);
        queue.update(|p| {
            p.job_no = 1;
            p.sampling_steps = 4;
            p.sampling_step = 2;
        });
        let (fraction, eta) = queue.progress().fraction_and_eta();
        assert!((fraction - 0.76).abs() < 1e-9, "{fraction}");
        assert!(eta >= 0.0);
        assert!(queue.interrupt());
        assert!(queue.interrupted());
        queue.end();
        assert!(!queue.interrupted());
        assert!(queue.progress().job.is_empty());
    }
}
