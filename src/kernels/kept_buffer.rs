//! Buffers a thread keeps between kernel calls (the scratch of every tile, Winograd's
//! transformed kernels), and a way to let them go between pipeline stages.
//!
//! Keeping them spares each call the zero-filled page faults of a fresh buffer of several
//! MiB, but a kept buffer outlives the stage that sized it: after the U-Net's 16×16 level
//! (2,560 input channels) Winograd's kernels held 210 MB through the whole VAE decode, which
//! pushed SD 1.5's peak memory at 512² over diffusers'. [`release_kept_buffers`] marks every
//! thread's buffers stale; each thread drops its own at its next use (the pool's threads
//! cannot be reached from outside, and an idle thread's buffer is dropped when it next works).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bumped by [`release_kept_buffers`]: a buffer kept under an older value is stale.
static GENERATION: AtomicUsize = AtomicUsize::new(0);

/// Lets every thread's kept buffers go: each is dropped at its thread's next use instead of
/// reused. For the boundary between pipeline stages whose buffer sizes differ (denoising,
/// decoding).
pub fn release_kept_buffers() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// One thread-local buffer kept between calls (use in a `thread_local!`).
pub(super) struct KeptBuffer {
    buffer: Cell<Vec<f32>>,
    generation: Cell<usize>,
}

impl KeptBuffer {
    pub const fn new() -> Self {
        Self {
            buffer: Cell::new(Vec::new()),
            generation: Cell::new(0),
        }
    }

    /// The kept buffer (empty when none is kept or it was released), leaving none behind.
    pub fn take(&self) -> Vec<f32> {
        let current = GENERATION.load(Ordering::Relaxed);
        if self.generation.replace(current) != current {
            drop(self.buffer.take());
        }
        self.buffer.take()
    }

    /// Keeps `buffer`, or the one kept meanwhile (by a nested call) when that one is larger.
    pub fn keep(&self, buffer: Vec<f32>) {
        let other = self.buffer.take();
        self.buffer.set(if other.len() > buffer.len() {
            other
        } else {
            buffer
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_buffer_is_not_reused() {
        let kept = KeptBuffer::new();
        kept.keep(vec![1.0; 8]);
        assert_eq!(kept.take().len(), 8, "kept between calls");
        kept.keep(vec![1.0; 8]);
        kept.keep(vec![2.0; 4]);
        assert_eq!(kept.take(), vec![1.0; 8], "the larger of two is kept");
        kept.keep(vec![1.0; 8]);
        release_kept_buffers();
        assert!(kept.take().is_empty(), "released");
    }
}
