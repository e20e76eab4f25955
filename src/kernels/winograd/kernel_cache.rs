//! Transformed kernels kept across the steps of one denoising loop.
//!
//! Winograd's kernel transform is bound by memory traffic (U is 16/9 or 4× the weight,
//! written on every call): in SD 1.5 at 256² it was ~7% of a step's CPU time, the same every
//! step for weights that do not change. Inside [`keeping_transformed_kernels`], the transforms
//! of constant weights (named by their tensor id, never reused) are kept, up to
//! [`BUDGET_BYTES`]: the first convolutions of the first step fill it, later steps read
//! them. The budget keeps peak memory below diffusers' (SD 1.5's whole U at 512² would be
//! 2 GB); everything is let go when the loop ends, before the VAE decodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::TensorId;

/// A weight's transformed kernels: the weight's tensor id and the scheme's tile size.
pub(super) type Key = (TensorId, usize);

/// The most transformed kernels kept at once.
const BUDGET_BYTES: usize = 512 << 20;

#[derive(Default)]
struct Kept {
    /// Loops open now (a server may run several); the kernels go when the last one ends.
    scopes: usize,
    bytes: usize,
    kernels: HashMap<Key, Arc<Vec<f32>>>,
}

static KEPT: Mutex<Option<Kept>> = Mutex::new(None);

fn kept() -> MutexGuard<'static, Option<Kept>> {
    // Nothing a panicking holder leaves half-done matters: at worst a transform is redone.
    KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` (a denoising loop, whose weights do not change), keeping the transformed kernels
/// of constant weights between its convolutions.
pub fn keeping_transformed_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Scope;
    impl Drop for Scope {
        fn drop(&mut self) {
            let mut kept = kept();
            if let Some(state) = kept.as_mut() {
                state.scopes -= 1;
                if state.scopes == 0 {
                    *kept = None;
                }
            }
        }
    }
    kept().get_or_insert_with(Kept::default).scopes += 1;
    let _scope = Scope;
    f()
}

/// The kept transform of `key`, if any.
pub(super) fn find(key: Key) -> Option<Arc<Vec<f32>>> {
    kept().as_ref()?.kernels.get(&key).cloned()
}

/// Whether a transform of `len` values would be kept (a loop is open and the budget has
/// room), so that the caller computes it into a buffer of its own.
pub(super) fn has_room(len: usize) -> bool {
    kept()
        .as_ref()
        .is_some_and(|state| state.bytes + 4 * len <= BUDGET_BYTES)
}

/// Keeps `kernels` as the transform of `key` while the budget has room (another thread may
/// have kept the same one meanwhile); returns them for use either way.
pub(super) fn keep(key: Key, kernels: Vec<f32>) -> Arc<Vec<f32>> {
    let kernels = Arc::new(kernels);
    if let Some(state) = kept().as_mut() {
        let bytes = 4 * kernels.len();
        if !state.kernels.contains_key(&key) && state.bytes + bytes <= BUDGET_BYTES {
            state.bytes += bytes;
            state.kernels.insert(key, kernels.clone());
        }
    }
    kernels
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// The state is global: these tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn key() -> Key {
        (Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap().id(), 2)
    }

    #[test]
    fn kernels_are_kept_within_a_loop_and_the_budget_only() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b, c) = (key(), key(), key());
        assert!(!has_room(1), "no loop, nothing kept");
        keep(a, vec![1.0]);
        assert!(find(a).is_none());
        keeping_transformed_kernels(|| {
            keeping_transformed_kernels(|| {
                assert!(has_room(1));
                keep(a, vec![1.0, 2.0]);
            });
            assert_eq!(
                find(a).as_deref(),
                Some(&vec![1.0, 2.0]),
                "an inner loop's end keeps them"
            );
            keep(a, vec![3.0]);
            assert_eq!(
                find(a).as_deref(),
                Some(&vec![1.0, 2.0]),
                "the first one stays"
            );
            let most = BUDGET_BYTES / 4 - 2;
            assert!(has_room(most) && !has_room(most + 1));
            let big = keep(b, vec![0.0; most + 1]);
            assert_eq!(big.len(), most + 1, "returned for use");
            assert!(find(b).is_none(), "over the budget");
            keep(c, vec![0.0; most]);
            assert!(find(c).is_some(), "up to the budget");
        });
        assert!(
            find(a).is_none() && find(c).is_none(),
            "let go with the loop"
        );
    }
}
