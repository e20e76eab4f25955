//! The noise levels σ = sqrt((1 − ᾱ)/ᾱ) that the Euler and DPM-Solver samplers walk, computed
//! as diffusers does: a float32 training schedule, float64 interpolation and Karras spacing.

use super::config::SchedulerConfig;
use super::noise_schedule::NoiseSchedule;

/// Karras' ρ, which diffusers fixes.
const KARRAS_RHO: f64 = 7.0;

/// σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) in float32 for every training timestep; zero-SNR schedules get
/// ᾱ_T = 2⁻²⁴ first, as diffusers' sigma-based schedulers do, so σ_T stays finite.
pub(super) fn training_sigmas(config: &SchedulerConfig) -> Vec<f32> {
    let schedule = NoiseSchedule::new(config);
    let mut alphas = schedule.alphas_cumprod().to_vec();
    if config.rescale_betas_zero_snr {
        if let Some(last) = alphas.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    alphas.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.interp(t, arange(len), sigmas)`.
pub(super) fn interpolate(sigmas: &[f32], t: f64) -> f64 {
    let last = sigmas.len() - 1;
    if t <= 0.0 {
        return sigmas[0] as f64;
    }
    if t >= last as f64 {
        return sigmas[last] as f64;
    }
    let low = t.floor() as usize;
    let (a, b) = (sigmas[low] as f64, sigmas[low + 1] as f64);
    if t == low as f64 {
        return a;
    }
    (b - a) * (t - low as f64) + a
}

/// `n` sigmas in Karras et al.'s spacing from `sigma_max` down to `sigma_min` (the config's
/// bounds take precedence): (σ_max^(1/ρ) + r·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, r = linspace(0, 1, n).
pub(super) fn karras_sigmas(
    config: &SchedulerConfig,
    sigma_min: f64,
    sigma_max: f64,
    n: usize,
) -> Vec<f64> {
    let sigma_min = config.sigma_sampler.sigma_min.unwrap_or(sigma_min);
    let sigma_max = config.sigma_sampler.sigma_max.unwrap_or(sigma_max);
    let (min_inv, max_inv) = (
        sigma_min.powf(1.0 / KARRAS_RHO),
        sigma_max.powf(1.0 / KARRAS_RHO),
    );
    (0..n)
        .map(|i| {
            let ramp = if n > 1 {
                if i == n - 1 {
                    1.0
                } else {
                    i as f64 * (1.0 / (n - 1) as f64)
                }
            } else {
                0.0
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(KARRAS_RHO)
        })
        .collect()
}

/// ln σ of the training sigmas, in float32 as numpy takes them, for [`sigma_to_timestep`],
/// which interpolates between two of them: a one-timestep schedule is an error.
pub(super) fn log_sigmas(train_sigmas: &[f32]) -> anyhow::Result<Vec<f64>> {
    anyhow::ensure!(
        train_sigmas.len() >= 2,
        "Karras sigmas need at least 2 training timesteps, the scheduler config has \
         num_train_timesteps {}",
        train_sigmas.len()
    );
    Ok(train_sigmas.iter().map(|&s| s.ln() as f64).collect())
}

/// The fractional training timestep of a sigma, interpolating linearly in log-sigma between
/// the two training timesteps around it (diffusers' `_sigma_to_t`); `log_sigmas` holds at least
/// two.
pub(super) fn sigma_to_timestep(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last training timestep whose log-sigma is at most `log_sigma`, kept below the end.
    let at_most = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low = at_most.saturating_sub(1).min(log_sigmas.len() - 2);
    let (low_log, high_log) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((low_log - log_sigma) / (low_log - high_log)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_matches_numpy_interp() {
        let sigmas = [1.0f32, 3.0, 7.0];
        assert_eq!(interpolate(&sigmas, 0.0), 1.0);
        assert_eq!(interpolate(&sigmas, 0.5), 2.0);
        assert_eq!(interpolate(&sigmas, 1.25), 4.0);
        assert_eq!(interpolate(&sigmas, 2.0), 7.0);
        assert_eq!(interpolate(&sigmas, 5.0), 7.0);
    }

    #[test]
    fn sigma_to_timestep_inverts_the_training_sigmas() {
        let log_sigmas: Vec<f64> = [0.1f64, 0.5, 2.0, 9.0].iter().map(|s| s.ln()).collect();
        assert_eq!(sigma_to_timestep(0.5, &log_sigmas), 1.0);
        assert_eq!(sigma_to_timestep(9.0, &log_sigmas), 3.0);
        assert_eq!(sigma_to_timestep(0.01, &log_sigmas), 0.0);
        let halfway = (0.5f64 * 2.0).sqrt(); // geometric mean: halfway in log space
        assert!((sigma_to_timestep(halfway, &log_sigmas) - 1.5).abs() < 1e-12);
    }
}
