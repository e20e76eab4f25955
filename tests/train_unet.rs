//! `ldm train` (the text-conditioned latent U-Net): the loss falls on a tiny data set of
//! coloured shapes, an interrupted and killed run resumes to the same weights as an
//! uninterrupted one, the export is a pipeline the real pipeline loads and samples from, and
//! every trainable weight of the U-Net and the jointly trained text encoder gets a gradient.

mod common;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{assert_close, fixture, max_abs_diff};
use image::{Rgb, RgbImage};
use ldm::model_source::PipelineFolder;
use ldm::models::clip::{ClipTextConfig, ClipTextModel};
use ldm::models::nn::Activation;
use ldm::models::unet::UNet2DConditionModel;
use ldm::pipelines::{ImageJob, Sampling, StableDiffusion};
use ldm::schedulers::{NoiseSchedule, SamplerKind, SchedulerConfig};
use ldm::tokenizer::PromptTokenizer;
use ldm::training::export;
use ldm::training::metrics::{Silent, StepReport, TrainObserver};
use ldm::training::optim::AdamWConfig;
use ldm::training::unet::{
    self, PredictionTarget, TextEncoderSetup, TextEncoderSizes, TrainUNetOptions, UNetSetup,
    UNetSizes,
};

const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("green", [30, 180, 40]),
    ("blue", [30, 60, 220]),
    ("yellow", [230, 210, 30]),
];
const SHAPES: [&str; 4] = ["circle", "square", "triangle", "bar"];
const RESOLUTION: u32 = 32;

/// 16 images, one per colour and shape, on white, captioned "a red circle" etc.
fn shapes_data_set(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut metadata = String::new();
    for (colour, rgb) in COLOURS {
        for shape in SHAPES {
            let image = RgbImage::from_fn(RESOLUTION, RESOLUTION, |x, y| {
                let (dx, dy) = (x as f32 - 15.5, y as f32 - 15.5);
                let inside = match shape {
                    "circle" => dx * dx + dy * dy < 100.0,
                    "square" => dx.abs() < 9.0 && dy.abs() < 9.0,
                    "triangle" => dy < 10.0 && dy > 2.0 * dx.abs() - 12.0,
                    _ => dy.abs() < 4.0 && dx.abs() < 13.0,
                };
                Rgb(if inside { rgb } else { [255, 255, 255] })
            });
            let name = format!("{colour}_{shape}.png");
            image.save(dir.join(&name)).unwrap();
            metadata.push_str(&format!(
                "{{\"file_name\": \"{name}\", \"text\": \"a {colour} {shape}\"}}\n"
            ));
        }
    }
    std::fs::write(dir.join("metadata.jsonl"), metadata).unwrap();
}

fn text_sizes() -> TextEncoderSizes {
    TextEncoderSizes {
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        intermediate_size: 64,
        activation: Activation::QuickGelu,
    }
}

fn unet_sizes() -> UNetSizes {
    UNetSizes {
        channels: vec![32, 64],
        layers_per_block: 1,
        attention_heads: 4,
        norm_num_groups: 32,
    }
}

/// A tiny run: the fixture VAE (frozen), a U-Net and text encoder trained from scratch.
fn tiny_options(data: &Path, out: &Path) -> TrainUNetOptions {
    TrainUNetOptions {
        text_encoder: TextEncoderSetup::Scratch(text_sizes()),
        unet: UNetSetup::Sizes(unet_sizes()),
        resolution: Some(RESOLUTION as usize),
        batch_size: 8,
        optimizer: AdamWConfig {
            lr: 1e-3,
            ..AdamWConfig::default()
        },
        warmup_steps: 10,
        ema_decay: 0.99,
        save_every: 0,
        seed: 3,
        samples: unet::SampleSettings {
            every: 0,
            prompts: Vec::new(),
            steps: 4,
            guidance_scale: 3.0,
        },
        ..TrainUNetOptions::new(
            data.to_path_buf(),
            out.to_path_buf(),
            fixture("tiny-sd1/vae"),
            fixture("tiny-sd1/tokenizer"),
        )
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// The largest difference between two sets of named tensors, which must name the same ones.
fn max_diff_all(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, t)| max_abs_diff(t, &b[name]))
        .fold(0.0, f32::max)
}

#[test]
fn loss_falls_and_the_export_is_a_working_pipeline() {
    let temp = tempfile::tempdir().unwrap();
    let (data, out) = (temp.path().join("data"), temp.path().join("out"));
    shapes_data_set(&data);
    let steps = 100;
    let options = TrainUNetOptions {
        max_steps: steps,
        samples: unet::SampleSettings {
            every: steps,
            ..tiny_options(&data, &out).samples
        },
        ..tiny_options(&data, &out)
    };
    let started = std::time::Instant::now();
    let summary = unet::train(&options, &mut Silent).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!((summary.step, summary.interrupted), (steps, false));
    assert_eq!(summary.losses.len(), steps);
    let losses: Vec<f64> = summary.losses.iter().map(|(_, l)| *l).collect();
    let (first, last) = (mean(&losses[..20]), mean(&losses[steps - 20..]));
    eprintln!(
        "{steps} steps in {seconds:.1} s: mean loss of the first 20 steps {first:.4}, of the last 20 {last:.4} (ratio {:.2})",
        first / last
    );
    assert!(
        first / last > 3.0,
        "the loss fell only from {first} to {last}"
    );

    // Run outputs.
    for file in ["losses.csv", "loss.png", "samples/step-000100.png"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let grid = image::open(out.join("samples/step-000100.png")).unwrap();
    assert_eq!(
        grid.width(),
        2 * RESOLUTION,
        "4 default prompts in a 2x2 grid"
    );

    // The export holds the EMA weights, under diffusers / transformers names.
    let ema = load(&out.join("checkpoint/ema.safetensors"));
    let exported_unet = load(&out.join("unet/diffusion_pytorch_model.safetensors"));
    let exported_text = load(&out.join("text_encoder/model.safetensors"));
    assert_eq!(exported_unet.len() + exported_text.len(), ema.len());
    for (name, tensor) in exported_unet.iter() {
        assert_eq!(
            max_abs_diff(tensor, &ema[&format!("unet.{name}")]),
            0.0,
            "{name}"
        );
    }
    for (name, tensor) in exported_text.iter() {
        assert!(name.starts_with("text_model."), "{name}");
        assert_eq!(
            max_abs_diff(tensor, &ema[&format!("text_encoder.{name}")]),
            0.0
        );
    }
    let scheduler =
        SchedulerConfig::from_file(&out.join("scheduler/scheduler_config.json")).unwrap();
    assert_eq!(
        (
            scheduler.num_train_timesteps,
            scheduler.beta_start,
            scheduler.beta_end
        ),
        (1000, 0.00085, 0.012)
    );
    assert!(!scheduler.set_alpha_to_one && !scheduler.clip_sample && scheduler.steps_offset == 1);
    let text_config = ClipTextConfig::from_file(&out.join("text_encoder/config.json")).unwrap();
    assert_eq!(
        (text_config.hidden_size, text_config.vocab_size),
        (32, 49408)
    );

    // The real pipeline loads it, its U-Net is the EMA one, and it generates.
    let folder =
        PipelineFolder::resolve(Some(out.to_str().unwrap()), false, &Default::default()).unwrap();
    let pipeline = StableDiffusion::load(&folder, &Device::Cpu, DType::F32).unwrap();
    let sampling = Sampling {
        sampler: SamplerKind::Ddim,
        steps: 8,
        guidance_scale: 3.0,
        guidance_rescale: 0.0,
        eta: 0.0,
        width: RESOLUTION as usize,
        height: RESOLUTION as usize,
        strength: 1.0,
        micro: Default::default(),
    };
    let jobs: Vec<ImageJob> = ["a red circle", "a blue square"]
        .iter()
        .map(|prompt| ImageJob {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            seed: 11,
            source: None,
        })
        .collect();
    let generated = pipeline.generate(&sampling, &jobs, &mut |_, _| {}).unwrap();
    assert_eq!(generated.images.len(), 2);
    for image in &generated.images {
        assert_eq!(image.dimensions(), (RESOLUTION, RESOLUTION));
    }
    let latents = generated
        .latents
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(latents.iter().all(|v| v.is_finite()));
    assert_ne!(
        generated.images[0], generated.images[1],
        "the prompt changes the image"
    );
}

const KILLED: &str = "simulated kill";

/// Keeps the expected panic of a simulated kill out of the test output.
fn silence_simulated_kills() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.to_string().contains(KILLED) {
            default_hook(info)
        }
    }));
}

/// Stops before update `stop_before` (as Ctrl-C does), or panics after update `panic_after`
/// (a kill: nothing is saved beyond the last periodic checkpoint).
struct Interrupter {
    stop_before: Option<usize>,
    panic_after: Option<usize>,
    next: usize,
}

impl TrainObserver for Interrupter {
    fn on_start(&mut self, step: usize, _: usize) {
        self.next = step + 1;
    }
    fn on_step(&mut self, report: &StepReport) {
        if Some(report.step) == self.panic_after {
            panic!("{KILLED} after step {}", report.step);
        }
        self.next = report.step + 1;
    }
    fn on_message(&mut self, _: &str) {}
    fn should_stop(&mut self) -> bool {
        Some(self.next) == self.stop_before
    }
}

#[test]
fn interrupted_and_killed_runs_resume_to_the_uninterrupted_weights() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    shapes_data_set(&data);
    let steps = 8;
    let reference_out = temp.path().join("reference");
    let reference = TrainUNetOptions {
        max_steps: steps,
        ..tiny_options(&data, &reference_out)
    };
    unet::train(&reference, &mut Silent).unwrap();

    let out = temp.path().join("resumed");
    let options = TrainUNetOptions {
        max_steps: steps,
        save_every: 4,
        ..tiny_options(&data, &out)
    };
    // Ctrl-C before update 3: checkpoint at step 2.
    let mut ctrl_c = Interrupter {
        stop_before: Some(3),
        panic_after: None,
        next: 0,
    };
    let summary = unet::train(&options, &mut ctrl_c).unwrap();
    assert_eq!((summary.step, summary.interrupted), (2, true));
    // Resumed, then killed after update 6: the checkpoint of step 4 survives.
    let resume = TrainUNetOptions {
        resume: true,
        ..options.clone()
    };
    let mut kill = Interrupter {
        stop_before: None,
        panic_after: Some(6),
        next: 0,
    };
    silence_simulated_kills();
    let killed = catch_unwind(AssertUnwindSafe(|| unet::train(&resume, &mut kill)));
    assert!(killed.is_err());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["train"]["step"], 4);
    // Resumed again, to the end.
    let summary = unet::train(&resume, &mut Silent).unwrap();
    assert_eq!((summary.step, summary.interrupted), (steps, false));

    for file in ["model", "ema", "optimizer"] {
        let path = |dir: &PathBuf| dir.join(format!("checkpoint/{file}.safetensors"));
        let diff = max_diff_all(&load(&path(&out)), &load(&path(&reference_out)));
        eprintln!("{file}: resumed vs uninterrupted max abs diff {diff:.3e}");
        assert!(diff <= 1e-6, "{file} differs by {diff}");
    }
    let csv = |dir: &Path| std::fs::read_to_string(dir.join("losses.csv")).unwrap();
    assert_eq!(
        csv(&out),
        csv(&reference_out),
        "every step logged once, same losses"
    );
    assert!(
        unet::train(&options, &mut Silent).is_err(),
        "a new run refuses a folder holding a checkpoint"
    );
}

/// A fresh U-Net and text encoder in one `VarMap`, as the trainer builds them.
/// A batch of more than 16 rows is split into shards whose passes run side by side: the
/// weights come out the same with one thread as with two.
#[test]
fn sharded_steps_give_the_same_weights_on_any_number_of_threads() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    shapes_data_set(&data);
    // Four more images (copies under new names) for a batch of 20: two shards.
    let mut metadata = std::fs::read_to_string(data.join("metadata.jsonl")).unwrap();
    for (i, shape) in SHAPES.iter().enumerate() {
        let copy = format!("copy_{i}.png");
        std::fs::copy(data.join(format!("red_{shape}.png")), data.join(&copy)).unwrap();
        metadata.push_str(&format!(
            "{{\"file_name\": \"{copy}\", \"text\": \"a red {shape}\"}}\n"
        ));
    }
    std::fs::write(data.join("metadata.jsonl"), metadata).unwrap();
    let run = |threads: usize| {
        let out = temp.path().join(format!("threads-{threads}"));
        let options = TrainUNetOptions {
            batch_size: 20,
            max_steps: 2,
            ..tiny_options(&data, &out)
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| unet::train(&options, &mut Silent)).unwrap();
        load(&out.join("checkpoint/model.safetensors"))
    };
    let diff = max_diff_all(&run(1), &run(2));
    assert_eq!(diff, 0.0, "one vs two threads: max abs diff {diff}");
}

fn fresh_models(seed: u64) -> (VarMap, UNet2DConditionModel, ClipTextModel, PromptTokenizer) {
    let tokenizer = PromptTokenizer::from_dir(&fixture("tiny-sd1/tokenizer")).unwrap();
    let text_config = text_sizes().config(&tokenizer);
    let unet_config = unet_sizes().config(4, text_config.hidden_size, 8);
    let varmap = VarMap::new();
    let vb = ldm::training::seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(vb.pp(unet::UNET_PREFIX), &unet_config).unwrap();
    let text = ClipTextModel::new(vb.pp(unet::TEXT_ENCODER_PREFIX), &text_config).unwrap();
    (varmap, unet, text, tokenizer)
}

fn sd_schedule(prediction: PredictionTarget) -> NoiseSchedule {
    let json = export::ddim_scheduler_config(prediction.diffusers_name(), false);
    NoiseSchedule::new(&serde_json::from_value::<SchedulerConfig>(json).unwrap())
}

/// The trainer builds its f32 networks once and relies on their weights being the variables
/// themselves: an update of the variables (in place, as AdamW and a resume make it) must change
/// what the networks already built compute, exactly as networks built afresh would.
#[test]
fn networks_built_once_follow_updates_of_their_variables() {
    let (varmap, unet, text, tokenizer) = fresh_models(6);
    let ids = tokenizer
        .encode_batch(&["a red circle", ""], &Device::Cpu)
        .unwrap();
    let sample = common::randn(1, &[2, 4, 8, 8], DType::F32);
    let timesteps = Tensor::new(&[10f32, 900.], &Device::Cpu).unwrap();
    let run = |unet: &UNet2DConditionModel, text: &ClipTextModel| {
        let conditioning = text.forward(&ids).unwrap();
        unet.forward(&sample, &timesteps, &conditioning).unwrap()
    };
    let before = run(&unet, &text);
    for (i, var) in varmap.all_vars().iter().enumerate() {
        let shift = common::randn(100 + i as u64, var.dims(), DType::F32);
        var.set(&(var.as_tensor() + (shift * 0.01).unwrap()).unwrap())
            .unwrap();
    }
    let after = run(&unet, &text);
    assert!(max_abs_diff(&before, &after) > 1e-4, "the update is seen");
    let vb = ldm::training::compute_var_builder(&varmap, DType::F32, &Device::Cpu);
    let unet_config = unet.config().clone();
    let rebuilt_unet = UNet2DConditionModel::new(vb.pp(unet::UNET_PREFIX), &unet_config).unwrap();
    let text_config = text_sizes().config(&tokenizer);
    let rebuilt_text = ClipTextModel::new(vb.pp(unet::TEXT_ENCODER_PREFIX), &text_config).unwrap();
    assert_eq!(
        max_abs_diff(&after, &run(&rebuilt_unet, &rebuilt_text)),
        0.0,
        "networks built before the update compute what networks built after it do"
    );
}

#[test]
fn every_trainable_weight_gets_a_gradient() {
    let (varmap, unet, text, tokenizer) = fresh_models(5);
    let ids = tokenizer
        .encode_batch(&["a red circle", ""], &Device::Cpu)
        .unwrap();
    let conditioning = text.forward(&ids).unwrap();
    let loss = unet::diffusion_loss(
        &unet,
        &conditioning,
        &sd_schedule(PredictionTarget::Epsilon),
        PredictionTarget::Epsilon,
        &common::randn(1, &[2, 4, 8, 8], DType::F32),
        &common::randn(2, &[2, 4, 8, 8], DType::F32),
        &[10, 900],
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    let mut without = Vec::new();
    for (name, var) in vars.iter() {
        let largest = grads.get(var.as_tensor()).map(|g| {
            g.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        });
        if !largest.is_some_and(|g| g > 0.0 && g.is_finite()) {
            without.push(name.clone());
        }
    }
    let attention = vars.keys().filter(|n| n.contains("attn")).count();
    let norms = vars.keys().filter(|n| n.contains("norm")).count();
    eprintln!(
        "{} variables ({attention} attention, {norms} normalisation), {} without gradient",
        vars.len(),
        without.len()
    );
    assert!(attention > 0 && norms > 0);
    assert!(without.is_empty(), "no gradient for {without:?}");
}

#[test]
fn v_prediction_loss_targets_the_velocity() {
    let (_, unet, text, tokenizer) = fresh_models(6);
    let conditioning = text
        .forward(
            &tokenizer
                .encode_batch(&["a bar", "a square"], &Device::Cpu)
                .unwrap(),
        )
        .unwrap();
    let schedule = sd_schedule(PredictionTarget::VPrediction);
    let (x0, noise, timesteps) = (
        common::randn(3, &[2, 4, 8, 8], DType::F32),
        common::randn(4, &[2, 4, 8, 8], DType::F32),
        [0, 999],
    );
    let loss = unet::diffusion_loss(
        &unet,
        &conditioning,
        &schedule,
        PredictionTarget::VPrediction,
        &x0,
        &noise,
        &timesteps,
    )
    .unwrap();
    // By hand: x_t = √ᾱ x₀ + √(1−ᾱ) ε, v = √ᾱ ε − √(1−ᾱ) x₀, per row.
    let rows: Vec<(Tensor, Tensor)> = timesteps
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let a = schedule.alphas_cumprod()[t] as f64;
            let (x, e) = (x0.get(i).unwrap(), noise.get(i).unwrap());
            let noisy = ((&x * a.sqrt()).unwrap() + (&e * (1.0 - a).sqrt()).unwrap()).unwrap();
            let velocity = ((&e * a.sqrt()).unwrap() - (&x * (1.0 - a).sqrt()).unwrap()).unwrap();
            (noisy, velocity)
        })
        .collect();
    let noisy = Tensor::stack(&[&rows[0].0, &rows[1].0], 0).unwrap();
    let velocity = Tensor::stack(&[&rows[0].1, &rows[1].1], 0).unwrap();
    let t = Tensor::new(&[0f32, 999.0], &Device::Cpu).unwrap();
    let predicted = unet.forward(&noisy, &t, &conditioning).unwrap();
    let expected = (predicted - velocity)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    assert_close("v-prediction loss", &loss, &expected, 1e-6);
}

#[test]
fn half_precision_export_halves_the_weights_and_still_loads() {
    let (varmap, unet, _, tokenizer) = fresh_models(7);
    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    let part = |prefix: &str| -> HashMap<String, Tensor> {
        weights
            .iter()
            .filter_map(|(n, t)| Some((n.strip_prefix(prefix)?.to_string(), t.clone())))
            .collect()
    };
    let (unet_weights, text_weights) = (part("unet."), part("text_encoder."));
    let text_config = text_sizes().config(&tokenizer);
    let scheduler = export::ddim_scheduler_config("epsilon", false);
    let temp = tempfile::tempdir().unwrap();
    let sizes: Vec<u64> = [DType::F32, DType::F16]
        .into_iter()
        .map(|dtype| {
            let out = temp.path().join(format!("{dtype:?}"));
            export::export_pipeline(
                &out,
                &export::PipelineExport {
                    unet_config: unet.config(),
                    unet_weights: &unet_weights,
                    text_encoder: export::TextEncoderExport::Trained {
                        config: &text_config,
                        weights: &text_weights,
                        tokenizer: &tokenizer,
                    },
                    vae_dir: &fixture("tiny-sd1/vae"),
                    tokenizer_dir: &fixture("tiny-sd1/tokenizer"),
                    scheduler_config: &scheduler,
                    save_dtype: dtype,
                },
            )
            .unwrap();
            // Exporting again replaces the previous export whole.
            export::export_pipeline(
                &out,
                &export::PipelineExport {
                    unet_config: unet.config(),
                    unet_weights: &unet_weights,
                    text_encoder: export::TextEncoderExport::Copied(&fixture(
                        "tiny-sd1/text_encoder",
                    )),
                    vae_dir: &fixture("tiny-sd1/vae"),
                    tokenizer_dir: &fixture("tiny-sd1/tokenizer"),
                    scheduler_config: &scheduler,
                    save_dtype: dtype,
                },
            )
            .unwrap();
            let leftovers: Vec<_> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
            let folder =
                PipelineFolder::resolve(Some(out.to_str().unwrap()), false, &Default::default())
                    .unwrap();
            let pipeline = StableDiffusion::load(&folder, &Device::Cpu, DType::F32).unwrap();
            let x = common::randn(8, &[1, 4, 8, 8], DType::F32);
            let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
            let context = pipeline.encode_prompts(&["a red circle"]).unwrap();
            let loaded = pipeline.unet.forward(&x, &t, &context).unwrap();
            let original = unet.forward(&x, &t, &context).unwrap();
            let tolerance = if dtype == DType::F32 { 0.0 } else { 5e-2 };
            assert_close(
                &format!("{dtype:?} export U-Net output"),
                &loaded,
                &original,
                tolerance,
            );
            let unet_file = out.join("unet/diffusion_pytorch_model.safetensors");
            let stored = load(&unet_file);
            assert!(stored.values().all(|t| t.dtype() == dtype));
            std::fs::metadata(unet_file).unwrap().len()
                + std::fs::metadata(out.join("vae/diffusion_pytorch_model.safetensors"))
                    .unwrap()
                    .len()
        })
        .collect();
    let ratio = sizes[1] as f64 / sizes[0] as f64;
    eprintln!("f16 U-Net + VAE files are {ratio:.3} of the f32 ones");
    assert!((0.49..0.51).contains(&ratio), "ratio {ratio}");
}

#[test]
fn cli_trains_exports_and_explains_a_missing_tokenizer() {
    let temp = tempfile::tempdir().unwrap();
    let (data, out) = (temp.path().join("data"), temp.path().join("out"));
    shapes_data_set(&data);
    // A lone VAE folder: no tokenizer beside it.
    let lone_vae = temp.path().join("vae");
    std::fs::create_dir(&lone_vae).unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixture("tiny-sd1/vae").join(file), lone_vae.join(file)).unwrap();
    }
    let train = |vae: &Path| {
        let mut cmd = assert_cmd::Command::cargo_bin("ldm").unwrap();
        cmd.args(["train", "--data"])
            .arg(&data)
            .arg("--vae")
            .arg(vae)
            .arg("--output")
            .arg(&out)
            .args(["--train-text-encoder", "--text-hidden-size", "32"])
            .args([
                "--unet-channels",
                "32,64",
                "--resolution",
                "32",
                "--batch-size",
                "4",
            ])
            .args(["--device", "cpu", "--quiet"]);
        cmd
    };
    let failure = train(&lone_vae)
        .args(["--max-steps", "1"])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&failure.get_output().stderr).into_owned();
    assert!(stderr.contains("--tokenizer"), "{stderr}");
    let failure = train(&fixture("tiny-sd1"))
        .args(["--max-steps", "1", "--zero-terminal-snr"])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&failure.get_output().stderr).into_owned();
    assert!(stderr.contains("v_prediction"), "{stderr}");

    // A pipeline folder as --vae brings its vae/ and tokenizer/.
    let success = train(&fixture("tiny-sd1"))
        .args(["--prediction-type", "v_prediction", "--zero-terminal-snr"])
        .args([
            "--max-steps",
            "2",
            "--sample-every",
            "2",
            "--sample-steps",
            "2",
        ])
        .args([
            "--sample-prompts",
            "a red circle|a green bar",
            "--save-dtype",
            "f16",
        ])
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&success.get_output().stdout).into_owned();
    assert!(stdout.contains("trained to step 2"), "{stdout}");
    for file in [
        "model_index.json",
        "unet/config.json",
        "tokenizer/vocab.json",
        "checkpoint/state.json",
        "samples/step-000002.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let unet = load(&out.join("unet/diffusion_pytorch_model.safetensors"));
    assert!(unet.values().all(|t| t.dtype() == DType::F16));
    let scheduler: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(scheduler["prediction_type"], "v_prediction");
    assert_eq!(scheduler["rescale_betas_zero_snr"], true);
    assert_eq!(scheduler["timestep_spacing"], "trailing");
    let grid = image::open(out.join("samples/step-000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (2 * RESOLUTION, RESOLUTION));
}

#[test]
fn optimizer_and_ema_state_keep_no_autograd_graph() {
    // candle does not detach the gradients of variables: a conv kernel fed a tracked input
    // gets a gradient referencing the step's forward graph. Optimizer or EMA state built from
    // it would keep every step's graph alive (memory growing each step).
    use candle_core::Module;
    let varmap = VarMap::new();
    let vb = ldm::training::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu);
    let first = candle_nn::conv2d(4, 8, 3, Default::default(), vb.pp("first")).unwrap();
    let second = candle_nn::conv2d(8, 8, 3, Default::default(), vb.pp("second")).unwrap();
    let mut optim = ldm::training::optim::AdamW::new(&varmap, AdamWConfig::default()).unwrap();
    let mut ema = ldm::training::optim::Ema::new(&varmap, 0.9).unwrap();
    let x = common::randn(1, &[1, 4, 9, 9], DType::F32);
    let y = second.forward(&first.forward(&x).unwrap()).unwrap();
    let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let kernel_grad = grads.get(second.weight()).unwrap();
    assert!(
        kernel_grad.track_op(),
        "the hazard this test guards against"
    );
    optim.step(&grads, 1e-3).unwrap();
    ema.update(&varmap).unwrap();
    let tracked: Vec<String> = optim
        .state_tensors()
        .into_iter()
        .chain(ema.tensors())
        .filter(|(_, t)| t.track_op())
        .map(|(name, _)| name)
        .collect();
    assert!(tracked.is_empty(), "state holding a graph: {tracked:?}");
}

#[test]
fn a_pretrained_text_encoder_stays_frozen_and_is_copied() {
    let temp = tempfile::tempdir().unwrap();
    let (data, out) = (temp.path().join("data"), temp.path().join("out"));
    shapes_data_set(&data);
    let options = TrainUNetOptions {
        text_encoder: TextEncoderSetup::Pretrained(fixture("tiny-sd1")),
        max_steps: 3,
        ..tiny_options(&data, &out)
    };
    let summary = unet::train(&options, &mut Silent).unwrap();
    assert_eq!(summary.step, 3);
    assert!(summary.losses.iter().all(|(_, l)| l.is_finite()));
    let ema = load(&out.join("checkpoint/ema.safetensors"));
    assert!(
        ema.keys().all(|name| name.starts_with("unet.")),
        "only the U-Net is trained"
    );
    let file = "text_encoder/model.safetensors";
    let copied = std::fs::read(out.join(file)).unwrap();
    assert!(copied == std::fs::read(fixture(&format!("tiny-sd1/{file}"))).unwrap());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("unet/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["cross_attention_dim"], 32,
        "the text encoder's width"
    );
}
