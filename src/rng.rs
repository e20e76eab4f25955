//! Noise that reproduces PyTorch's CPU generator.
//!
//! `torch.Generator("cpu").manual_seed(s)` followed by `torch.randn(shape, generator=g)` is what
//! diffusers uses for seeded generation. Reproducing that stream exactly (MT19937, then
//! Box-Muller in torch's 16-element blocks) is what lets `--seed N` give the same image as a
//! Python pipeline, on every device: noise is always drawn on the CPU and then moved.

use candle_core::{DType, Device, Result, Shape, Tensor};

/// Anything that can hand out standard-normal noise for a whole batch.
pub trait NoiseSource {
    /// A tensor of shape `shape` (batch first) drawn from N(0, 1).
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;

    /// N(0, 1) noise with `like`'s shape, dtype and device (a sampler's per-step noise).
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        self.randn(like.shape(), like.dtype(), like.device())
    }
}

/// Mersenne Twister MT19937, the engine behind `torch.Generator("cpu")`.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// Bytes of a serialised [`TorchGenerator`]: 624 engine words and the position (u32 LE each),
/// a cache flag and the cached normal (f64 LE).
const STATE_LEN: usize = 625 * 4 + 1 + 8;

/// A re-implementation of PyTorch's CPU generator, for `randn` in float32.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// torch caches the second Box-Muller value of its scalar (double) path.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`; torch keeps the low 32 bits for the engine.
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed as u32),
            next_double_normal: None,
        }
    }

    /// The generator's full state (engine words, position, cached normal) as bytes, so a
    /// training checkpoint can resume the exact noise stream.
    pub fn state(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(STATE_LEN);
        for word in self.engine.state {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes.extend_from_slice(&(self.engine.index as u32).to_le_bytes());
        let cached = self.next_double_normal;
        bytes.push(cached.is_some() as u8);
        bytes.extend_from_slice(&cached.unwrap_or(0.0).to_le_bytes());
        bytes
    }

    /// The inverse of [`TorchGenerator::state`].
    pub fn from_state(bytes: &[u8]) -> anyhow::Result<Self> {
        if bytes.len() != STATE_LEN {
            anyhow::bail!(
                "generator state has {} bytes, expected {STATE_LEN}",
                bytes.len()
            );
        }
        let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        let mut state = [0u32; 624];
        for (i, slot) in state.iter_mut().enumerate() {
            *slot = word(i);
        }
        let index = word(624) as usize;
        if index > 624 {
            anyhow::bail!("generator state has position {index}, beyond 624");
        }
        let cached = f64::from_le_bytes(bytes[2501..2509].try_into().unwrap());
        let next_double_normal = match bytes[2500] {
            0 => None,
            1 => Some(cached),
            flag => anyhow::bail!("generator state has a bad cache flag {flag}"),
        };
        Ok(Self {
            engine: Mt19937 { state, index },
            next_double_normal,
        })
    }

    /// Uniform in [0, 1) with 24 random bits, as torch's float `uniform_real_distribution`.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// Uniform in [0, 1) with 53 random bits, as torch's double `uniform_real_distribution`.
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `torch.randn(n)` in float32: the vectorised path for n >= 16, the scalar one below.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n >= 16 {
            self.randn_blocks(n)
        } else {
            (0..n).map(|_| self.normal_f64() as f32).collect()
        }
    }

    /// torch's `normal_fill`: n uniforms, Box-Muller over blocks of 16 (value j pairs with
    /// j + 8); a ragged tail redraws 16 fresh uniforms for the last 16 slots.
    fn randn_blocks(&mut self, n: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// torch's scalar `normal_distribution<double>`, which caches its second value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }
}

fn box_muller_16(block: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
        block[j] = radius * theta.cos();
        block[j + 8] = radius * theta.sin();
    }
}

/// One torch generator per image, as diffusers does with `generator=[g_0, g_1, ...]`: image i of
/// a batch draws all its noise from its own seed, so batching never changes an image.
pub struct BatchNoise {
    generators: Vec<TorchGenerator>,
}

impl BatchNoise {
    pub fn from_seeds(seeds: &[u64]) -> Self {
        Self {
            generators: seeds.iter().map(|&s| TorchGenerator::new(s)).collect(),
        }
    }
}

impl NoiseSource for BatchNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let dims = shape.dims();
        let batch = dims.first().copied().unwrap_or(1);
        if batch != self.generators.len() {
            candle_core::bail!(
                "noise for a batch of {batch} requested from {} generators",
                self.generators.len()
            );
        }
        let per_item = shape.elem_count() / batch.max(1);
        let values: Vec<f32> = self
            .generators
            .iter_mut()
            .flat_map(|g| g.randn(per_item))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The C++ standard requires the 10000th output of mt19937 seeded with 5489.
        let mut mt = Mt19937::new(5489);
        let value = (0..10_000).map(|_| mt.next_u32()).last().unwrap();
        assert_eq!(value, 4_123_659_995);
    }

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut generator = TorchGenerator::new(42);
        generator.randn(37);
        generator.randn(3); // leaves a cached scalar normal
        let state = generator.state();
        let mut restored = TorchGenerator::from_state(&state).unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(restored.randn(1), generator.randn(1));
        assert_eq!(restored.randn(700), generator.randn(700));
        assert!(TorchGenerator::from_state(&state[1..]).is_err());
    }
}
