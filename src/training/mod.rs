//! Training: the VAE (`train-vae`) and the text-conditioned latent U-Net (`train`).
//!
//! Both trainers share the pieces here: one loop with its stop, checkpoint and sample points
//! (`driver`), a captioned image folder (`data`), data-parallel shards of a batch on the CPU
//! (`data_parallel`), AdamW with warm-up, clipping and EMA (`optim`),
//! atomic checkpoints that resume bit-for-bit (`checkpoint`), the loss log and plot, and the
//! observer a loop reports to (`metrics`). Everything random in training (weight
//! initialisation, data order, flips, noise) is derived from `--seed`, so a resumed run repeats
//! an uninterrupted one exactly. Training reports through its observer and never prints.

pub mod checkpoint;
pub mod data;
pub mod data_parallel;
pub mod driver;
pub mod export;
pub mod metrics;
pub mod optim;
pub mod unet;
pub mod vae;

use std::collections::HashMap;
use std::hash::Hasher;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

/// A small, fixed pseudo-random generator (SplitMix64) for data order, flips and weight
/// initialisation: unlike `rand`'s `StdRng` its stream never changes between versions, so a
/// checkpoint resumes identically with any build.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for one named stream (`"epoch 3"`, a variable name, ...) under `seed`.
    pub fn for_stream(seed: u64, stream: &str) -> Self {
        let mut hasher = Fnv1a::default();
        hasher.write(stream.as_bytes());
        Self(seed ^ hasher.finish().rotate_left(17))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias worth caring about for n ≪ 2^64.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal by Box-Muller.
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: keeps ln finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// FNV-1a, a stable hash for naming random streams (std's `DefaultHasher` may change).
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `VarBuilder` that creates fresh trainable variables in `varmap`, initialised as candle-nn
/// would (the layer's `Init` hint) but from `seed` and the variable's name instead of the
/// unseedable device RNG: the same seed gives the same initial weights on every device.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    fn initial_values(&self, shape: &Shape, name: &str, init: Init) -> Vec<f64> {
        let count = shape.elem_count();
        let mut rng = SplitMix64::for_stream(self.seed, name);
        let mut uniform = |lo: f64, up: f64| -> Vec<f64> {
            (0..count)
                .map(|_| lo + (up - lo) * rng.next_f64())
                .collect()
        };
        match init {
            Init::Const(value) => vec![value; count],
            Init::Uniform { lo, up } => uniform(lo, up),
            Init::Randn { mean, stdev } => normal_values(&mut rng, count, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(-bound, bound)
                    }
                    NormalOrUniform::Normal => normal_values(&mut rng, count, 0.0, std),
                }
            }
        }
    }
}

fn normal_values(rng: &mut SplitMix64, count: usize, mean: f64, std: f64) -> Vec<f64> {
    (0..count).map(|_| mean + std * rng.normal()).collect()
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut vars = self.varmap.data().lock().unwrap();
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "shape mismatch on {name}: {shape:?} requested, {:?} exists",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.initial_values(&shape, name, init);
        let initial = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let var = Var::from_tensor(&initial)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let vars = self.varmap.data().lock().unwrap();
        match vars.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(device),
            None => candle_core::bail!("cannot find variable {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().unwrap().contains_key(name)
    }
}

/// A `VarBuilder` over the current values of `varmap` cast to `dtype`: the model built from it
/// computes in `dtype` while gradients flow back (through the cast) to the f32 master weights.
/// This is how `--dtype bf16/f16` trains in mixed precision.
pub fn compute_var_builder(varmap: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_tensors(var_tensors(varmap), dtype, device)
}

/// The variables' current values by name (sharing storage with the variables).
pub fn var_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect()
}

/// Checks the training precision: f32 everywhere, half precision (mixed: f32 master weights,
/// f32 losses, half-precision forward/backward) only on a GPU.
pub fn check_training_dtype(dtype: DType, device: &Device) -> anyhow::Result<()> {
    match dtype {
        DType::F32 => Ok(()),
        DType::BF16 | DType::F16 if !device.is_cpu() => Ok(()),
        DType::BF16 | DType::F16 => anyhow::bail!(
            "mixed-precision training ({dtype:?}) needs a GPU (--device cuda or metal); on the CPU train in f32"
        ),
        other => anyhow::bail!("cannot train in {other:?}; use f32, bf16 or f16"),
    }
}
