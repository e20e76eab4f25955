//! DDIM, DDPM, Euler, Euler a and DPM-Solver++ against diffusers 0.42:
//! `tests/fixtures/cases/schedulers_*` record, for one scheduler config each, the timesteps, the
//! float32 schedule (and the sigmas of the sigma-based samplers), every step's scaled model
//! input, inputs and outputs (with the noise diffusers drew), and `add_noise`: per batch row
//! timesteps with `get_velocity` for DDIM/DDPM, at the img2img begin step for the others.

mod common;

use std::collections::VecDeque;
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Shape, Tensor};
use clap::ValueEnum;
use ldm::rng::NoiseSource;
use ldm::schedulers::{self, NoiseSchedule, SamplerKind, SchedulerConfig, SigmaSpacing};

/// ᾱ must match torch's float32 schedule to this. It is bit-exact without zero-SNR rescaling,
/// which goes through torch's float32 sqrt: torch 2.15's CPU sqrt is not correctly rounded
/// (1 ulp off in ~25% of cases, measured), while ours is.
const SCHEDULE_TOL: f32 = 1e-6;
/// Zero-SNR betas near 1 are ratios of tiny ᾱ, where those 1-ulp differences grow.
const ZERO_SNR_BETAS_TOL: f32 = 1e-5;
/// One step fed the recorded inputs: 1e-5 abs plus 2e-7 (~2 f32 ulps) of the largest value in
/// or out, for the same 1-ulp sqrt differences in the step coefficients (values reach ~280; a
/// zero-SNR Euler step starts from σ = 4096 and cancels most of it).
const STEP_ABS_TOL: f32 = 1e-5;
const STEP_REL_TOL: f32 = 2e-7;
/// A whole chain run from the first recorded sample, replaying the recorded noise: 1e-4 abs
/// plus 1e-6 (~8 f32 ulps) of the largest final value (random model outputs drive DPM-Solver's
/// 20-step chain to ~550).
const FREE_RUN_TOL: f32 = 1e-4;
const FREE_RUN_REL_TOL: f32 = 1e-6;
/// Euler sigmas: float32 values through float64 interpolation (and Karras' powers), where
/// torch's float32 sqrt and numpy's float32 log may differ from ours by an ulp.
const SIGMA_REL_TOL: f32 = 1e-6;

/// Replays recorded noise tensors in order and counts the draws.
struct ReplayNoise {
    queue: VecDeque<Tensor>,
    drawn: usize,
}

impl ReplayNoise {
    fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
            drawn: 0,
        }
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let Some(noise) = self.queue.pop_front() else {
            candle_core::bail!("no recorded noise left for draw {}", self.drawn);
        };
        if noise.shape() != shape {
            candle_core::bail!(
                "noise of shape {shape:?} drawn, {:?} recorded",
                noise.shape()
            );
        }
        self.drawn += 1;
        noise.to_dtype(dtype)?.to_device(device)
    }
}

fn assert_step_close(what: &str, actual: &Tensor, expected: &Tensor, input: &Tensor) {
    let largest = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let scale = largest(expected).max(largest(input));
    common::assert_close(what, actual, expected, STEP_ABS_TOL + STEP_REL_TOL * scale);
}

fn scheduler_cases() -> Vec<String> {
    let mut cases: Vec<String> = std::fs::read_dir(common::fixture("cases"))
        .expect("tests/fixtures/cases exists")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let case = name.strip_suffix(".json")?;
            case.starts_with("schedulers_").then(|| case.to_string())
        })
        .collect();
    cases.sort();
    assert!(
        cases.iter().any(|c| c.contains("ddim")) && cases.iter().any(|c| c.contains("ddpm")),
        "scheduler fixtures missing: {cases:?}"
    );
    cases
}

/// One recorded case: its config, sampler, step count, eta and tensors.
struct Case {
    name: String,
    config: SchedulerConfig,
    kind: SamplerKind,
    steps: usize,
    eta: f64,
    noise_drawn: Vec<bool>,
    init_noise_sigma: f64,
    tensors: std::collections::HashMap<String, Tensor>,
}

impl Case {
    fn load(name: &str) -> Self {
        let meta = common::load_case_json(name);
        let config: SchedulerConfig = serde_json::from_value(meta["scheduler_config"].clone())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let kind = match meta["scheduler_class"].as_str().unwrap() {
            "DDIMScheduler" => SamplerKind::Ddim,
            "DDPMScheduler" => SamplerKind::Ddpm,
            "EulerDiscreteScheduler" => SamplerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SamplerKind::EulerA,
            "DPMSolverMultistepScheduler" => {
                match meta["scheduler_config"]["algorithm_type"].as_str().unwrap() {
                    "sde-dpmsolver++" => SamplerKind::DpmPp2mSde,
                    _ => SamplerKind::DpmPp2m,
                }
            }
            other => panic!("{name}: unexpected scheduler class {other}"),
        };
        Self {
            name: name.to_string(),
            config,
            kind,
            steps: meta["num_inference_steps"].as_u64().unwrap() as usize,
            eta: meta["eta"].as_f64().unwrap_or(0.0),
            noise_drawn: serde_json::from_value(meta["noise_drawn"].clone()).unwrap(),
            init_noise_sigma: meta["init_noise_sigma"].as_f64().unwrap(),
            tensors: common::load_case(name),
        }
    }

    fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }

    /// Row `i` of a per-step tensor `[n, ...]`.
    fn at(&self, key: &str, i: usize) -> Tensor {
        self.tensor(key).get(i).unwrap()
    }

    fn build(&self) -> Box<dyn schedulers::Scheduler> {
        schedulers::build(self.kind, &self.config, self.steps, self.eta).unwrap()
    }

    fn recorded_noise(&self) -> Vec<Tensor> {
        (0..self.steps)
            .filter(|&i| self.noise_drawn[i])
            .map(|i| self.at("noise", i))
            .collect()
    }
}

#[test]
fn timesteps_equal_diffusers_exactly() {
    for name in scheduler_cases() {
        let case = Case::load(&name);
        let expected: Vec<f64> = case
            .tensor("timesteps")
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let scheduler = case.build();
        if case.config.sigma_sampler.sigma_spacing().unwrap() == SigmaSpacing::Karras {
            // Karras timesteps are read back through numpy's float32 log: an ulp may differ.
            for (ours, theirs) in scheduler.timesteps().iter().zip(&expected) {
                assert!(
                    (ours - theirs).abs() <= 1e-6 * theirs.abs(),
                    "{name}: {ours} vs {theirs}"
                );
            }
            assert_eq!(scheduler.timesteps().len(), expected.len());
        } else {
            assert_eq!(scheduler.timesteps(), expected, "{name}");
        }
        let init_sigma = scheduler.init_noise_sigma();
        assert!(
            (init_sigma - case.init_noise_sigma).abs() <= 1e-6 * case.init_noise_sigma,
            "{name}: init_noise_sigma {init_sigma} vs {}",
            case.init_noise_sigma
        );
    }
}

#[test]
fn sigma_samplers_img2img_noise_matches_diffusers() {
    let sigma_cases: Vec<String> = scheduler_cases()
        .into_iter()
        .filter(|name| name.contains("euler") || name.contains("dpmpp"))
        .collect();
    assert!(
        sigma_cases.len() >= 4,
        "Euler / DPM-Solver fixtures missing"
    );
    for name in sigma_cases {
        let case = Case::load(&name);
        let meta = common::load_case_json(&name);
        let step = meta["add_noise_step"].as_u64().unwrap() as usize;
        let sigmas: Vec<f32> = case.tensor("sigmas").to_vec1().unwrap();
        let scheduler = case.build();
        let (original, noise) = (
            case.tensor("add_noise_original"),
            case.tensor("add_noise_noise"),
        );
        let noisy = scheduler.add_noise(original, noise, step).unwrap();
        // Euler: x₀ + σ·ε; DPM-Solver: α·x₀ + σ_t·ε, with σ = sigmas[step]: compare at the
        // tolerance σ's own error allows.
        let tol = 1e-6 + SIGMA_REL_TOL * sigmas[step] * 5.0;
        common::assert_close(
            &format!("{name} add_noise"),
            &noisy,
            case.tensor("add_noise_out"),
            tol,
        );
        assert!(scheduler.add_noise(original, noise, case.steps).is_err());
    }
}

#[test]
fn schedule_matches_torch_float32() {
    for name in scheduler_cases() {
        let case = Case::load(&name);
        let schedule = NoiseSchedule::new(&case.config);
        let n = schedule.num_train_timesteps();
        let betas = Tensor::from_slice(schedule.betas(), n, &Device::Cpu).unwrap();
        let alphas = Tensor::from_slice(schedule.alphas_cumprod(), n, &Device::Cpu).unwrap();
        common::assert_close(
            &format!("{name} alphas_cumprod"),
            &alphas,
            case.tensor("alphas_cumprod"),
            SCHEDULE_TOL,
        );
        // Zero-SNR betas near 1 are ratios of tiny ᾱ, where torch's inexact sqrt shows.
        let betas_tol = if case.config.rescale_betas_zero_snr {
            ZERO_SNR_BETAS_TOL
        } else {
            SCHEDULE_TOL
        };
        common::assert_close(
            &format!("{name} betas"),
            &betas,
            case.tensor("betas"),
            betas_tol,
        );
    }
}

#[test]
fn add_noise_and_velocity_take_per_row_timesteps() {
    for name in scheduler_cases() {
        let case = Case::load(&name);
        if !case.tensors.contains_key("velocity") {
            continue; // sigma samplers: see sigma_samplers_img2img_noise_matches_diffusers
        }
        let schedule = NoiseSchedule::new(&case.config);
        let timesteps: Vec<usize> = case
            .tensor("add_noise_timesteps")
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|t| t as usize)
            .collect();
        let (original, noise) = (
            case.tensor("add_noise_original"),
            case.tensor("add_noise_noise"),
        );
        let noisy = schedule.add_noise(original, noise, &timesteps).unwrap();
        common::assert_close(
            &format!("{name} add_noise"),
            &noisy,
            case.tensor("add_noise_out"),
            1e-6,
        );
        let velocity = schedule.velocity(original, noise, &timesteps).unwrap();
        common::assert_close(
            &format!("{name} velocity"),
            &velocity,
            case.tensor("velocity"),
            1e-6,
        );
    }
}

#[test]
fn each_step_matches_diffusers() {
    for name in scheduler_cases() {
        let case = Case::load(&name);
        let mut scheduler = case.build();
        for i in 0..case.steps {
            let drawn = case.noise_drawn[i];
            let mut noise = ReplayNoise::new(drawn.then(|| case.at("noise", i)));
            assert_step_close(
                &format!("{name} step {i} scaled model input"),
                &scheduler
                    .scale_model_input(&case.at("sample", i), i)
                    .unwrap(),
                &case.at("scaled_input", i),
                &case.at("sample", i),
            );
            let out = scheduler
                .step(
                    &case.at("model_output", i),
                    i,
                    &case.at("sample", i),
                    &mut noise,
                )
                .unwrap();
            assert_eq!(
                noise.drawn,
                usize::from(drawn),
                "{name} step {i}: noise draws"
            );
            assert_step_close(
                &format!("{name} step {i} prev_sample"),
                &out.prev_sample,
                &case.at("prev_sample", i),
                &case.at("sample", i),
            );
            assert_step_close(
                &format!("{name} step {i} pred_original_sample"),
                &out.pred_original_sample.unwrap(),
                &case.at("pred_original_sample", i),
                &case.at("sample", i),
            );
        }
    }
}

#[test]
fn free_run_replaying_noise_matches_diffusers() {
    for name in scheduler_cases() {
        let case = Case::load(&name);
        let mut scheduler = case.build();
        let mut noise = ReplayNoise::new(case.recorded_noise());
        let mut sample = case.at("sample", 0);
        for i in 0..case.steps {
            sample = scheduler
                .step(&case.at("model_output", i), i, &sample, &mut noise)
                .unwrap()
                .prev_sample;
        }
        assert!(noise.queue.is_empty(), "{name}: recorded noise left over");
        let expected = case.at("prev_sample", case.steps - 1);
        let largest = expected.abs().unwrap().max_all().unwrap();
        let tol = FREE_RUN_TOL + FREE_RUN_REL_TOL * largest.to_scalar::<f32>().unwrap();
        common::assert_close(&format!("{name} free run"), &sample, &expected, tol);
    }
}

#[test]
fn scheduler_add_noise_uses_the_steps_timestep() {
    let case = Case::load("schedulers_ddim_sd15");
    let scheduler = case.build();
    let schedule = NoiseSchedule::new(&case.config);
    let (original, noise) = (
        case.tensor("add_noise_original"),
        case.tensor("add_noise_noise"),
    );
    for step in [0, 4, case.steps - 1] {
        let t = scheduler.timesteps()[step] as usize;
        let expected = schedule.add_noise(original, noise, &[t, t]).unwrap();
        let actual = scheduler.add_noise(original, noise, step).unwrap();
        assert_eq!(common::max_abs_diff(&actual, &expected), 0.0, "step {step}");
    }
    assert!(scheduler.add_noise(original, noise, case.steps).is_err());
}

#[test]
fn half_precision_steps_follow_float32() {
    let case = Case::load("schedulers_ddpm_sd15");
    let mut scheduler = case.build();
    let (model_output, sample) = (case.at("model_output", 3), case.at("sample", 3));
    let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    let mut noise = ReplayNoise::new([case.at("noise", 3)]);
    let out = scheduler
        .step(&half(&model_output), 3, &half(&sample), &mut noise)
        .unwrap();
    assert_eq!(out.prev_sample.dtype(), DType::F16);
    common::assert_close(
        "f16 step",
        &out.prev_sample,
        &case.at("prev_sample", 3),
        2e-2,
    );
}

#[test]
fn pipeline_scheduler_configs_parse() {
    for model in ["tiny-sd1", "tiny-sd2", "tiny-inpaint"] {
        let path = common::fixture(&format!("{model}/scheduler/scheduler_config.json"));
        let config = SchedulerConfig::from_file(&path).unwrap();
        for &kind in SamplerKind::value_variants() {
            let scheduler = schedulers::build(kind, &config, 10, 0.0).unwrap();
            assert_eq!(scheduler.timesteps().len(), 10, "{model} {kind}");
        }
    }
}

/// diffusers writes DPM-Solver configs with Python's bare `-Infinity` and `null` settings; the
/// sigma-sampler settings only matter (and only fail) when such a sampler is built.
#[test]
fn dpm_solver_configs_as_diffusers_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "lambda_min_clipped": -Infinity, "variance_type": null, "solver_order": 2,
            "use_karras_sigmas": false, "final_sigmas_type": "zero"}"#,
    );
    let config = SchedulerConfig::from_file(&path).unwrap();
    assert_eq!(config.sigma_sampler.lambda_min_clipped, f64::NEG_INFINITY);
    for &kind in SamplerKind::value_variants() {
        assert!(schedulers::build(kind, &config, 20, 0.0).is_ok(), "{kind}");
    }
    let path = write_config(&dir, r#"{"solver_order": 3, "use_beta_sigmas": true}"#);
    let config = SchedulerConfig::from_file(&path).unwrap();
    assert!(schedulers::build(SamplerKind::Ddim, &config, 20, 0.0).is_ok());
    let error = |kind| {
        format!(
            "{:#}",
            schedulers::build(kind, &config, 20, 0.0).err().unwrap()
        )
    };
    assert!(error(SamplerKind::DpmPp2m).contains("solver_order"));
    assert!(error(SamplerKind::Euler).contains("use_beta_sigmas"));
}

fn write_config(dir: &tempfile::TempDir, json: &str) -> PathBuf {
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, json).unwrap();
    path
}

#[test]
fn unsupported_configs_are_errors_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    for (json, field) in [
        (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
        (
            r#"{"prediction_type": "flow_prediction"}"#,
            "prediction_type",
        ),
        (r#"{"timestep_spacing": "karras"}"#, "timestep_spacing"),
        (r#"{"variance_type": "fixed_huge"}"#, "variance_type"),
        (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
        (
            r#"{"num_train_timesteps": 4, "trained_betas": [0.1]}"#,
            "trained_betas",
        ),
    ] {
        let path = write_config(&dir, json);
        let error = format!("{:#}", SchedulerConfig::from_file(&path).unwrap_err());
        assert!(error.contains(&format!("\"{field}\"")), "{json}: {error}");
        assert!(error.contains("scheduler_config.json"), "{json}: {error}");
    }
    let path = write_config(&dir, "{\"beta_start\": ");
    assert!(SchedulerConfig::from_file(&path).is_err());
    assert!(SchedulerConfig::from_file(&dir.path().join("missing.json")).is_err());
}

#[test]
fn invalid_sampler_settings_are_errors() {
    let config = SchedulerConfig::default();
    let error = |kind, config: &SchedulerConfig, steps, eta| {
        let result = schedulers::build(kind, config, steps, eta);
        format!("{:#}", result.err().expect("an error"))
    };
    for kind in [SamplerKind::Ddim, SamplerKind::Ddpm] {
        assert!(error(kind, &config, 0, 0.0).contains("at least 1"));
        assert!(error(kind, &config, 1001, 0.0).contains("num_train_timesteps"));
        let offset = SchedulerConfig {
            steps_offset: 1,
            ..config.clone()
        };
        assert!(error(kind, &offset, 1000, 0.0).contains("steps_offset"));
    }
    assert!(error(SamplerKind::Ddim, &config, 10, -0.5).contains("eta"));
    assert!(error(SamplerKind::Ddim, &config, 10, f64::NAN).contains("eta"));
    let large_log = SchedulerConfig {
        variance_type: schedulers::VarianceType::FixedLargeLog,
        ..config
    };
    assert!(error(SamplerKind::Ddpm, &large_log, 10, 0.0).contains("variance_type"));
    // DDIM ignores the variance type, as diffusers does.
    assert!(schedulers::build(SamplerKind::Ddim, &large_log, 10, 0.0).is_ok());
}

/// A one-timestep training schedule is a valid config: every sampler either runs on it or
/// refuses it with an error, never a panic (Karras sigmas interpolate between two timesteps).
#[test]
fn one_training_timestep_is_an_error_or_runs_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for karras in [false, true] {
        let json = format!(r#"{{"num_train_timesteps": 1, "use_karras_sigmas": {karras}}}"#);
        let config = SchedulerConfig::from_file(&write_config(&dir, &json)).unwrap();
        for &kind in SamplerKind::value_variants() {
            let built = std::panic::catch_unwind(|| schedulers::build(kind, &config, 1, 0.0))
                .unwrap_or_else(|_| panic!("{kind} (karras {karras}) panicked"));
            let needs_karras_error = karras
                && matches!(
                    kind,
                    SamplerKind::Euler | SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde
                );
            match built {
                Err(error) => {
                    if needs_karras_error {
                        let message = format!("{error:#}");
                        assert!(message.contains("num_train_timesteps"), "{kind}: {message}");
                    }
                }
                Ok(mut scheduler) => {
                    assert!(!needs_karras_error, "{kind} with Karras sigmas built");
                    let sample = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
                    let mut noise = ldm::rng::BatchNoise::from_seeds(&[0]);
                    for step in 0..scheduler.timesteps().len() {
                        let input = scheduler.scale_model_input(&sample, step).unwrap();
                        scheduler.step(&input, step, &sample, &mut noise).unwrap();
                    }
                }
            }
        }
    }
}
