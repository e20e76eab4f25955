//! `scheduler/scheduler_config.json`, read with diffusers' field names and defaults.
//!
//! One struct serves every sampler: diffusers lets any scheduler be built `from_config` of
//! another, ignoring fields it does not know and taking its own defaults for missing ones. The
//! DDIM, DDPM and Euler defaults agree on every shared field but `timestep_spacing` ("leading"
//! for DDIM/DDPM, "linspace" for Euler), which is therefore kept as given.

use std::path::Path;

use serde::Deserialize;

/// How betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end))²`, the latent-diffusion schedule.
    ScaledLinear,
    /// The Glide cosine schedule (`betas_for_alpha_bar`, max beta 0.999).
    SquaredcosCapV2,
}

/// What the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise ε.
    Epsilon,
    /// The velocity v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀.
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// How inference timesteps are picked from the training ones (Table 2 of arXiv 2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// How Euler samplers place their sigmas between the first and the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSpacing {
    /// Interpolated linearly at the inference timesteps (diffusers' default).
    Interpolated,
    /// Karras et al. 2022 (ρ = 7), with timesteps read back from the log-sigmas
    /// (`use_karras_sigmas`).
    Karras,
}

/// The sigma after the last Euler step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    Zero,
    /// The sigma of training timestep 0.
    SigmaMin,
}

/// DPM-Solver's settings (`DPMSolverMultistepScheduler`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpmSolverOptions {
    /// "sde-dpmsolver++": fresh noise at every step (else "dpmsolver++", deterministic).
    pub stochastic: bool,
    /// 1 or 2: how many model outputs a step combines.
    pub order: usize,
    /// The second-order correction: "heun" (else "midpoint").
    pub heun: bool,
    /// First-order last steps when there are fewer than 15 steps.
    pub lower_order_final: bool,
    /// A first-order (Euler) last step whatever the step count.
    pub euler_at_final: bool,
}

/// DDPM's posterior variance (ignored by DDIM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceType {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
    FixedLargeLog,
    /// The model predicts the variance in a second half of its output channels.
    Learned,
    /// The model predicts an interpolation between the small and large log-variances.
    LearnedRange,
}

/// The parsed scheduler config. `Default` is diffusers' `DDIMScheduler()` / `DDPMScheduler()`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawSchedulerConfig")]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_start`/`beta_end`/`beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// DDIM: ᾱ before the first training step is 1 (else ᾱ₀).
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    /// `None` when the file does not say: each sampler then takes its own default.
    pub timestep_spacing: Option<TimestepSpacing>,
    pub variance_type: VarianceType,
    /// Dynamic thresholding of x̂₀ (Imagen); takes precedence over `clip_sample`.
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub rescale_betas_zero_snr: bool,
    /// What only the Euler and DPM-Solver samplers read.
    pub sigma_sampler: SigmaSamplerSettings,
}

impl SchedulerConfig {
    /// `timestep_spacing`, or `default` (the sampler's own) when the file leaves it out.
    pub fn timestep_spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }
}

impl SchedulerConfig {
    /// Stable Diffusion's scheduler config (SD 1.5's `scheduler_config.json`, which diffusers'
    /// `from_single_file` reads for an SD checkpoint without a config): scaled-linear betas
    /// 0.00085 to 0.012 over 1000 steps, `steps_offset` 1, ᾱ before the first step ᾱ₀, no
    /// clipping, ε-prediction, each sampler's own timestep spacing.
    pub fn stable_diffusion() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            clip_sample: false,
            set_alpha_to_one: false,
            steps_offset: 1,
            ..Self::default()
        }
    }
}

impl std::str::FromStr for PredictionType {
    type Err = String;

    /// diffusers' spellings: `epsilon`, `v_prediction`, `sample`.
    fn from_str(value: &str) -> Result<Self, String> {
        Self::CHOICES.parse("prediction_type", value)
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            variance_type: VarianceType::FixedSmall,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            rescale_betas_zero_snr: false,
            sigma_sampler: SigmaSamplerSettings::default(),
        }
    }
}

/// The settings of diffusers' sigma-based schedulers (Euler, DPM-Solver), kept as written:
/// other samplers ignore them, as diffusers' `from_config` does, and a value ldm does not
/// implement is refused only when such a sampler is built.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SigmaSamplerSettings {
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub interpolation_type: String,
    pub timestep_type: String,
    pub final_sigmas_type: String,
    /// Karras' bounds; default the schedule's own.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub algorithm_type: String,
    pub solver_order: usize,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: f64,
}

impl Default for SigmaSamplerSettings {
    fn default() -> Self {
        Self {
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            interpolation_type: "linear".into(),
            timestep_type: "discrete".into(),
            final_sigmas_type: "zero".into(),
            sigma_min: None,
            sigma_max: None,
            algorithm_type: "dpmsolver++".into(),
            solver_order: 2,
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
        }
    }
}

impl SigmaSamplerSettings {
    /// How the sigmas are spaced; exponential, beta and log-linear spacing and continuous
    /// timesteps are not implemented.
    pub fn sigma_spacing(&self) -> anyhow::Result<SigmaSpacing> {
        for (field, unsupported) in [
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("interpolation_type", self.interpolation_type != "linear"),
            ("timestep_type", self.timestep_type != "discrete"),
        ] {
            anyhow::ensure!(!unsupported, "{}", unsupported_setting(field));
        }
        Ok(if self.use_karras_sigmas {
            SigmaSpacing::Karras
        } else {
            SigmaSpacing::Interpolated
        })
    }

    pub fn final_sigma(&self) -> anyhow::Result<FinalSigma> {
        match self.final_sigmas_type.as_str() {
            "zero" => Ok(FinalSigma::Zero),
            "sigma_min" => Ok(FinalSigma::SigmaMin),
            _ => anyhow::bail!("{}", unsupported_setting("final_sigmas_type")),
        }
    }

    /// DPM-Solver++ (data prediction), ODE or SDE, order 1 or 2; diffusers itself maps "deis" to
    /// "dpmsolver++" and "logrho"/"bh1"/"bh2" to "midpoint".
    pub fn dpm_solver(&self) -> anyhow::Result<DpmSolverOptions> {
        let algorithm = self.algorithm_type.as_str();
        for (field, unsupported) in [
            (
                "algorithm_type",
                !["dpmsolver++", "sde-dpmsolver++", "deis"].contains(&algorithm),
            ),
            ("solver_order", !(1..=2).contains(&self.solver_order)),
            (
                "solver_type",
                !["midpoint", "heun", "logrho", "bh1", "bh2"].contains(&self.solver_type.as_str()),
            ),
            (
                "lambda_min_clipped",
                self.lambda_min_clipped != f64::NEG_INFINITY,
            ),
        ] {
            anyhow::ensure!(!unsupported, "{}", unsupported_setting(field));
        }
        Ok(DpmSolverOptions {
            stochastic: algorithm == "sde-dpmsolver++",
            order: self.solver_order,
            heun: self.solver_type == "heun",
            lower_order_final: self.lower_order_final,
            euler_at_final: self.euler_at_final,
        })
    }
}

fn unsupported_setting(field: &str) -> String {
    field_error(field, "has a value this sampler does not support in ldm")
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`, naming the file and the offending field in errors.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        crate::config::read_json(path)
    }
}

/// The file as written: enumerated fields as strings, so that a bad value can be reported
/// together with its field name. Every field takes diffusers' default when missing.
#[derive(Deserialize)]
#[serde(default)]
struct RawSchedulerConfig {
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: String,
    trained_betas: Option<Vec<f64>>,
    clip_sample: bool,
    clip_sample_range: f64,
    set_alpha_to_one: bool,
    steps_offset: usize,
    prediction_type: String,
    timestep_spacing: Option<String>,
    /// `null` in DPM-Solver configs: DDPM's default then.
    variance_type: Option<String>,
    thresholding: bool,
    dynamic_thresholding_ratio: f64,
    sample_max_value: f64,
    rescale_betas_zero_snr: bool,
    #[serde(flatten)]
    sigma_sampler: SigmaSamplerSettings,
}

impl Default for RawSchedulerConfig {
    fn default() -> Self {
        let d = SchedulerConfig::default();
        Self {
            num_train_timesteps: d.num_train_timesteps,
            beta_start: d.beta_start,
            beta_end: d.beta_end,
            beta_schedule: BetaSchedule::CHOICES.name_of(d.beta_schedule).into(),
            trained_betas: d.trained_betas,
            clip_sample: d.clip_sample,
            clip_sample_range: d.clip_sample_range,
            set_alpha_to_one: d.set_alpha_to_one,
            steps_offset: d.steps_offset,
            prediction_type: PredictionType::CHOICES.name_of(d.prediction_type).into(),
            timestep_spacing: None,
            variance_type: None,
            thresholding: d.thresholding,
            dynamic_thresholding_ratio: d.dynamic_thresholding_ratio,
            sample_max_value: d.sample_max_value,
            rescale_betas_zero_snr: d.rescale_betas_zero_snr,
            sigma_sampler: d.sigma_sampler,
        }
    }
}

impl TryFrom<RawSchedulerConfig> for SchedulerConfig {
    type Error = String;

    fn try_from(raw: RawSchedulerConfig) -> Result<Self, String> {
        if raw.num_train_timesteps == 0 {
            return Err(field_error("num_train_timesteps", "must be at least 1"));
        }
        if let Some(betas) = &raw.trained_betas {
            if betas.len() != raw.num_train_timesteps {
                return Err(field_error(
                    "trained_betas",
                    &format!(
                        "has {} values but num_train_timesteps is {}",
                        betas.len(),
                        raw.num_train_timesteps
                    ),
                ));
            }
        }
        if !(0.0..=1.0).contains(&raw.dynamic_thresholding_ratio) {
            return Err(field_error(
                "dynamic_thresholding_ratio",
                &format!("{} is not in [0, 1]", raw.dynamic_thresholding_ratio),
            ));
        }
        let timestep_spacing = raw
            .timestep_spacing
            .as_deref()
            .map(|value| TimestepSpacing::CHOICES.parse("timestep_spacing", value))
            .transpose()?;
        Ok(Self {
            num_train_timesteps: raw.num_train_timesteps,
            beta_start: raw.beta_start,
            beta_end: raw.beta_end,
            beta_schedule: BetaSchedule::CHOICES.parse("beta_schedule", &raw.beta_schedule)?,
            trained_betas: raw.trained_betas,
            clip_sample: raw.clip_sample,
            clip_sample_range: raw.clip_sample_range,
            set_alpha_to_one: raw.set_alpha_to_one,
            steps_offset: raw.steps_offset,
            prediction_type: PredictionType::CHOICES
                .parse("prediction_type", &raw.prediction_type)?,
            timestep_spacing,
            variance_type: match raw.variance_type.as_deref() {
                Some(value) => VarianceType::CHOICES.parse("variance_type", value)?,
                None => VarianceType::FixedSmall,
            },
            thresholding: raw.thresholding,
            dynamic_thresholding_ratio: raw.dynamic_thresholding_ratio,
            sample_max_value: raw.sample_max_value,
            rescale_betas_zero_snr: raw.rescale_betas_zero_snr,
            sigma_sampler: raw.sigma_sampler,
        })
    }
}

fn field_error(field: &str, problem: &str) -> String {
    format!("scheduler config field \"{field}\" {problem}")
}

/// The spellings diffusers accepts for an enumerated field.
struct Choices<T: 'static>(&'static [(&'static str, T)]);

impl<T: Copy + PartialEq> Choices<T> {
    fn parse(&self, field: &str, value: &str) -> Result<T, String> {
        self.0
            .iter()
            .find(|(name, _)| *name == value)
            .map(|&(_, choice)| choice)
            .ok_or_else(|| {
                let names: Vec<&str> = self.0.iter().map(|(name, _)| *name).collect();
                field_error(
                    field,
                    &format!(
                        "has unsupported value \"{value}\" (supported: {})",
                        names.join(", ")
                    ),
                )
            })
    }

    fn name_of(&self, choice: T) -> &'static str {
        self.0
            .iter()
            .find(|(_, c)| *c == choice)
            .map(|(name, _)| *name)
            .expect("every variant has a name")
    }
}

impl BetaSchedule {
    const CHOICES: Choices<Self> = Choices(&[
        ("linear", Self::Linear),
        ("scaled_linear", Self::ScaledLinear),
        ("squaredcos_cap_v2", Self::SquaredcosCapV2),
    ]);
}

impl PredictionType {
    const CHOICES: Choices<Self> = Choices(&[
        ("epsilon", Self::Epsilon),
        ("v_prediction", Self::VPrediction),
        ("sample", Self::Sample),
    ]);
}

impl TimestepSpacing {
    const CHOICES: Choices<Self> = Choices(&[
        ("leading", Self::Leading),
        ("trailing", Self::Trailing),
        ("linspace", Self::Linspace),
    ]);
}

impl VarianceType {
    const CHOICES: Choices<Self> = Choices(&[
        ("fixed_small", Self::FixedSmall),
        ("fixed_small_log", Self::FixedSmallLog),
        ("fixed_large", Self::FixedLarge),
        ("fixed_large_log", Self::FixedLargeLog),
        ("learned", Self::Learned),
        ("learned_range", Self::LearnedRange),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<SchedulerConfig, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn missing_fields_take_diffusers_defaults() {
        assert_eq!(parse("{}").unwrap(), SchedulerConfig::default());
    }

    #[test]
    fn sd15_style_config_parses() {
        let config = parse(
            r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
                "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#,
        )
        .unwrap();
        assert_eq!(config.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(config.steps_offset, 1);
        assert!(!config.set_alpha_to_one && !config.clip_sample);
        assert_eq!(config.prediction_type, PredictionType::Epsilon);
    }

    #[test]
    fn unsupported_values_name_their_field() {
        for (json, field) in [
            (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
            (r#"{"prediction_type": "flow"}"#, "prediction_type"),
            (r#"{"timestep_spacing": "karras"}"#, "timestep_spacing"),
            (r#"{"variance_type": "huge"}"#, "variance_type"),
            (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
            (
                r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}"#,
                "trained_betas",
            ),
            (
                r#"{"dynamic_thresholding_ratio": 1.5}"#,
                "dynamic_thresholding_ratio",
            ),
        ] {
            let error = parse(json).unwrap_err();
            assert!(error.contains(&format!("\"{field}\"")), "{json}: {error}");
        }
    }
}
