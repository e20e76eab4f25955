//! The forward-diffusion noise schedule (betas → ᾱ), shared by the samplers and by training.
//!
//! The numbers reproduce diffusers' float32 schedule on torch's CPU: betas from a float32
//! `torch.linspace` (whose x86 kernel evaluates `start + step·i` with one fused multiply-add),
//! then ᾱ = float32 of a float64 running product of float32 (1 − β), as torch's CPU `cumprod`
//! accumulates in double.

use candle_core::{Result, Tensor};

use super::config::{BetaSchedule, SchedulerConfig};

/// ᾱ_t for every training timestep t, with the betas it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig) -> Self {
        let n = config.num_train_timesteps;
        let betas = match (&config.trained_betas, config.beta_schedule) {
            (Some(betas), _) => betas.iter().map(|&b| b as f32).collect(),
            (None, BetaSchedule::Linear) => {
                torch_linspace_f32(config.beta_start, config.beta_end, n)
            }
            (None, BetaSchedule::ScaledLinear) => {
                torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => cosine_betas(n),
        };
        let betas = if config.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let alphas_cumprod = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>());
        Self {
            betas,
            alphas_cumprod,
        }
    }

    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// ᾱ_t = Π_{s≤t} (1 − β_s), indexed by training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱ_t, or an error for a timestep outside the schedule.
    pub fn alpha_cumprod(&self, timestep: usize) -> Result<f32> {
        match self.alphas_cumprod.get(timestep) {
            Some(&alpha) => Ok(alpha),
            None => candle_core::bail!(
                "timestep {timestep} is outside the {} training timesteps",
                self.alphas_cumprod.len()
            ),
        }
    }

    /// Forward diffusion q(x_t | x₀): sqrt(ᾱ_t)·x₀ + sqrt(1−ᾱ_t)·ε, with `timesteps[i]` for
    /// batch row i (diffusers' `add_noise`).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let (signal, noise_scale) = self.row_scales(original, timesteps)?;
        original.broadcast_mul(&signal)? + noise.broadcast_mul(&noise_scale)?
    }

    /// The v-prediction target sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x₀ per batch row (diffusers'
    /// `get_velocity`).
    pub fn velocity(&self, sample: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (signal, noise_scale) = self.row_scales(sample, timesteps)?;
        noise.broadcast_mul(&signal)? - sample.broadcast_mul(&noise_scale)?
    }

    /// sqrt(ᾱ_t) and sqrt(1 − ᾱ_t) per batch row, shaped `[B, 1, …]` to broadcast over `like`.
    fn row_scales(&self, like: &Tensor, timesteps: &[usize]) -> Result<(Tensor, Tensor)> {
        let batch = like.dim(0)?;
        if timesteps.len() != batch {
            candle_core::bail!("{} timesteps given for a batch of {batch}", timesteps.len());
        }
        let alphas = timesteps
            .iter()
            .map(|&t| self.alpha_cumprod(t))
            .collect::<Result<Vec<f32>>>()?;
        let mut shape = vec![1; like.rank()];
        shape[0] = batch;
        let column = |values: Vec<f32>| {
            Tensor::from_vec(values, shape.as_slice(), like.device())?.to_dtype(like.dtype())
        };
        Ok((
            column(alphas.iter().map(|a| a.sqrt()).collect())?,
            column(alphas.iter().map(|a| (1.0 - a).sqrt()).collect())?,
        ))
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU, bit for bit: the endpoints are
/// rounded to f32, the first half counts up from `start`, the second half down from `end`,
/// each value being one fused multiply-add.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine ᾱ(t) and max beta 0.999, in f64 and then
/// rounded to f32 (`torch.tensor(betas, dtype=float32)`).
fn cosine_betas(n: usize) -> Vec<f32> {
    const MAX_BETA: f64 = 0.999;
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(MAX_BETA) as f32
        })
        .collect()
}

/// Running product in f64 of f32 factors, each prefix rounded to f32 (torch's CPU `cumprod`).
fn cumprod(factors: &[f32]) -> Vec<f32> {
    factors
        .iter()
        .scan(1.0f64, |product, &f| {
            *product *= f as f64;
            Some(*product as f32)
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), in f32 as diffusers:
/// shift sqrt(ᾱ) so its last value is 0, scale it so its first value is unchanged.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>());
    let sqrt_alphas: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_alphas[0], sqrt_alphas[sqrt_alphas.len() - 1]);
    let scale = first / (first - last);
    let alphas_bar: Vec<f32> = sqrt_alphas
        .iter()
        .map(|s| {
            let rescaled = (s - last) * scale;
            rescaled * rescaled
        })
        .collect();
    std::iter::once(alphas_bar[0])
        .chain(alphas_bar.windows(2).map(|w| w[1] / w[0]))
        .map(|alpha| 1.0 - alpha)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn linspace_hits_both_endpoints_and_is_monotonic() {
        let values = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(values[0], 0.0001f32);
        assert_eq!(values[999], 0.02f32);
        assert!(values.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(torch_linspace_f32(0.3, 0.7, 1), vec![0.3f32]);
    }

    #[test]
    fn cosine_betas_are_capped() {
        let betas = cosine_betas(1000);
        assert_eq!(betas[999], 0.999f32);
        assert!(betas.iter().all(|&b| b > 0.0 && b <= 0.999));
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero_and_keeps_the_start() {
        let config = SchedulerConfig {
            beta_schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.00085,
            beta_end: 0.012,
            ..Default::default()
        };
        let plain = NoiseSchedule::new(&config);
        let rescaled = NoiseSchedule::new(&SchedulerConfig {
            rescale_betas_zero_snr: true,
            ..config
        });
        assert_eq!(rescaled.alphas_cumprod()[999], 0.0);
        assert_eq!(rescaled.betas()[999], 1.0);
        let first = (plain.alphas_cumprod()[0], rescaled.alphas_cumprod()[0]);
        assert!((first.0 - first.1).abs() < 1e-7, "{first:?}");
    }

    #[test]
    fn add_noise_and_velocity_use_each_rows_timestep() -> Result<()> {
        let schedule = NoiseSchedule::new(&SchedulerConfig::default());
        let x0 = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
        let eps = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.0]], &Device::Cpu)?;
        let timesteps = [10, 900];
        let noisy = schedule
            .add_noise(&x0, &eps, &timesteps)?
            .to_vec2::<f32>()?;
        let velocity = schedule.velocity(&x0, &eps, &timesteps)?.to_vec2::<f32>()?;
        let (x0, eps) = (x0.to_vec2::<f32>()?, eps.to_vec2::<f32>()?);
        for (row, &t) in timesteps.iter().enumerate() {
            let a = schedule.alphas_cumprod()[t];
            for col in 0..2 {
                let expected = a.sqrt() * x0[row][col] + (1.0 - a).sqrt() * eps[row][col];
                assert_eq!(noisy[row][col], expected);
                let expected = a.sqrt() * eps[row][col] - (1.0 - a).sqrt() * x0[row][col];
                assert_eq!(velocity[row][col], expected);
            }
        }
        assert!(schedule
            .add_noise(&x0_tensor()?, &x0_tensor()?, &[1000, 0])
            .is_err());
        assert!(schedule
            .add_noise(&x0_tensor()?, &x0_tensor()?, &[1])
            .is_err());
        Ok(())
    }

    fn x0_tensor() -> Result<Tensor> {
        Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)
    }
}
