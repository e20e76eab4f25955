//! `train-vae`: the ELBO's gradients, a short run that learns, exact kill-and-resume, and the
//! exported diffusers folder.
//!
//! The closed-form KL against a Monte-Carlo estimate is tested with the model, in
//! tests/vae.rs (`closed_form_kl_matches_monte_carlo`).

mod common;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use image::{Rgb, RgbImage};
use ldm::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use ldm::training::metrics::{StepReport, TrainObserver};
use ldm::training::vae::{
    negative_elbo, train, ReconLoss, TrainVaeOptions, TrainVaeSummary, VaeArchitecture,
};

const CPU: Device = Device::Cpu;

/// `count` images of a square or a disc of one colour on another, at `size` px, each with a
/// `.txt` caption.
fn make_shapes(dir: &Path, count: usize, size: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let palette = [
        [230, 40, 40],
        [40, 200, 60],
        [40, 80, 230],
        [240, 220, 40],
        [250, 250, 250],
        [20, 20, 20],
    ];
    for i in 0..count {
        let background = palette[i % palette.len()];
        let foreground = palette[(i * 5 + 2) % palette.len()];
        let disc = i % 2 == 0;
        let (cx, cy) = (
            (size / 4 + (i as u32 * 3) % (size / 2)) as f32,
            (size / 3 + (i as u32 * 5) % (size / 3)) as f32,
        );
        let radius = size as f32 / 4.0;
        let image = RgbImage::from_fn(size, size, |x, y| {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let inside = if disc {
                dx * dx + dy * dy <= radius * radius
            } else {
                dx.abs() <= radius && dy.abs() <= radius
            };
            Rgb(if inside { foreground } else { background })
        });
        image.save(dir.join(format!("shape_{i:02}.png"))).unwrap();
        let kind = if disc { "disc" } else { "square" };
        std::fs::write(dir.join(format!("shape_{i:02}.txt")), format!("a {kind}")).unwrap();
    }
}

fn options(data: &Path, output: &Path) -> TrainVaeOptions {
    TrainVaeOptions {
        architecture: VaeArchitecture::Sizes {
            block_out_channels: vec![16, 32],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 8,
        },
        resolution: 16,
        batch_size: 4,
        lr: 2e-3,
        warmup_steps: 5,
        max_grad_norm: Some(1.0),
        ..TrainVaeOptions::new(data.to_path_buf(), output.to_path_buf())
    }
}

/// Records losses; can stop the run (as Ctrl-C does) or die (as a kill does) after a step.
#[derive(Default)]
struct Scripted {
    stop_after: Option<usize>,
    die_after: Option<usize>,
    reconstruction: Vec<f64>,
    last_step: usize,
}

impl TrainObserver for Scripted {
    fn on_start(&mut self, _: usize, _: usize) {}
    fn on_step(&mut self, report: &StepReport) {
        self.reconstruction.push(report.losses[0].1);
        self.last_step = report.step;
        if self.die_after == Some(report.step) {
            panic!("killed after step {}", report.step);
        }
    }
    fn on_message(&mut self, _: &str) {}
    fn should_stop(&mut self) -> bool {
        self.stop_after == Some(self.last_step)
    }
}

fn run(opts: &TrainVaeOptions, observer: &mut Scripted) -> TrainVaeSummary {
    train(opts, observer).unwrap_or_else(|e| panic!("training failed: {e:#}"))
}

fn load_exported(vae_dir: &Path) -> (AutoencoderKLConfig, AutoencoderKL) {
    let cfg = AutoencoderKLConfig::from_file(&vae_dir.join("config.json")).unwrap();
    let weights = vae_dir.join("diffusion_pytorch_model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &CPU).unwrap() };
    let vae = AutoencoderKL::new(vb, &cfg).unwrap();
    (cfg, vae)
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &CPU).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

// ------------------------------------------------------------------------------ gradients

fn tiny_f64_vae() -> (VarMap, AutoencoderKL, usize) {
    let cfg: AutoencoderKLConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [8, 8],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "norm_num_groups": 4,
        "latent_channels": 2,
    }))
    .unwrap();
    let varmap = VarMap::new();
    let vb = ldm::training::seeded_var_builder(&varmap, 3, DType::F64, &CPU);
    let vae = AutoencoderKL::new(vb, &cfg).unwrap();
    (varmap, vae, cfg.latent_channels)
}

/// Backprop through z = μ + σ·ε against central finite differences, for both reconstruction
/// losses, on weights of the encoder's mean/log-variance head and of the decoder.
#[test]
fn negative_elbo_gradients_match_finite_differences() {
    let (varmap, vae, latent_channels) = tiny_f64_vae();
    let images = (common::randn(1, &[2, 3, 8, 8], DType::F64) * 0.5).unwrap();
    let eps = common::randn(2, &[2, latent_channels, 4, 4], DType::F64);
    // A KL weight large enough that the KL's gradient matters next to the reconstruction's.
    let kl_weight = 0.05;
    let vars = varmap.data().lock().unwrap().clone();
    for recon in [ReconLoss::L2, ReconLoss::L1] {
        let loss = || {
            let (terms, _) = negative_elbo(&vae, &images, &eps, recon, kl_weight).unwrap();
            terms.total
        };
        let grads = loss().backward().unwrap();
        for (name, index) in [
            ("encoder.conv_out.weight", 7),
            ("quant_conv.bias", 3), // a log-variance channel: reaches the loss only via σ·ε and the KL
            ("quant_conv.weight", 1),
            ("decoder.conv_in.weight", 11),
            ("post_quant_conv.weight", 2),
        ] {
            let var: &Var = &vars[name];
            let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let analytic: f64 = analytic.get(index).unwrap().to_scalar().unwrap();
            let numeric = central_difference(var, index, || loss().to_scalar::<f64>().unwrap());
            let rel = (analytic - numeric).abs() / analytic.abs().max(1e-6);
            eprintln!(
                "{recon:?} d/d {name}[{index}]: backprop {analytic:.8e}, FD {numeric:.8e}, rel {rel:.1e}"
            );
            assert!(rel < 1e-5, "relative difference {rel:.1e} above 1e-5");
        }
    }
}

fn central_difference(var: &Var, index: usize, loss: impl Fn() -> f64) -> f64 {
    let original: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let at = |delta: f64| {
        let mut values = original.clone();
        values[index] += delta;
        var.set(&Tensor::from_vec(values, var.shape(), &CPU).unwrap())
            .unwrap();
        loss()
    };
    let h = 1e-6;
    let slope = (at(h) - at(-h)) / (2.0 * h);
    var.set(&Tensor::from_vec(original, var.shape(), &CPU).unwrap())
        .unwrap();
    slope
}

// ------------------------------------------------------------------------------- training

/// 100 CPU steps on 16 generated 16-px images must cut the reconstruction loss at least 5×, and
/// the exported folder must load with our AutoencoderKL and decode as the trained weights do.
/// The latents and our decode are left in `target/tmp/train_vae_check/` for
/// `scripts/check_trained_vae.py` (diffusers).
#[test]
fn a_short_run_learns_and_exports_a_loadable_vae() {
    let check_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("train_vae_check");
    let _ = std::fs::remove_dir_all(&check_dir);
    let data = check_dir.join("data");
    make_shapes(&data, 16, 16);
    std::fs::write(data.join("broken.png"), b"\x89PNG truncated").unwrap();
    std::fs::write(data.join("broken.txt"), "a broken file").unwrap();
    RgbImage::new(16, 16)
        .save(data.join("uncaptioned.png"))
        .unwrap();
    let out = check_dir.join("out");
    let opts = TrainVaeOptions {
        max_steps: 100,
        sample_every: Some(50),
        recon_loss: ReconLoss::L2,
        ..options(&data, &out)
    };

    let mut observer = Scripted::default();
    let summary = run(&opts, &mut observer);
    eprintln!("{summary:?}");
    assert_eq!((summary.step, summary.steps_run), (100, 100));
    assert_eq!((summary.images, summary.skipped_images), (16, 2));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let first = mean(&observer.reconstruction[..5]);
    let last = mean(&observer.reconstruction[90..]);
    eprintln!(
        "reconstruction MSE: first 5 steps {first:.4}, last 10 steps {last:.4} ({:.1}x lower) in {:.1} s",
        first / last,
        summary.seconds
    );
    assert!(
        first / last >= 5.0,
        "loss fell only {:.2}x (expected >= 5x)",
        first / last
    );

    let csv = std::fs::read_to_string(out.join("losses.csv")).unwrap();
    assert_eq!(csv.lines().count(), 101);
    assert!(out.join("loss.png").is_file());
    for step in [50, 100] {
        let grid = image::open(out.join(format!("samples/step-{step:06}.png"))).unwrap();
        assert_eq!((grid.width(), grid.height()), (8 * 16 + 7 * 2, 2 * 16 + 2));
    }

    // The export: diffusers layout, our loader, and the measured scaling factor.
    let vae_dir = summary.vae_dir.clone().unwrap();
    assert_eq!(vae_dir, out.join("vae"));
    let (cfg, vae) = load_exported(&vae_dir);
    let factor = summary.scaling_factor.unwrap();
    assert!((cfg.scaling_factor - factor).abs() < 1e-12);
    assert!(factor.is_finite() && factor > 0.0);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["_class_name"], "AutoencoderKL");
    assert_eq!(config["block_out_channels"], serde_json::json!([16, 32]));

    // The exported weights are the trained ones (no EMA): same as the final checkpoint.
    let exported = tensors(&vae_dir.join("diffusion_pytorch_model.safetensors"));
    let checkpoint = tensors(&out.join("checkpoint/model.safetensors"));
    assert_eq!(exported.len(), checkpoint.len());
    for (name, t) in &checkpoint {
        assert_eq!(bits(t), bits(&exported[name]), "{name}");
    }

    // 1/std of the loaded model's latents of the training images ≈ the factor (other ε).
    let folder = ldm::training::data::ImageFolder::open(&data, 16).unwrap();
    let all: Vec<usize> = (0..folder.len()).collect();
    let (images, _) = folder
        .load_batch(&all, &vec![false; all.len()], &CPU)
        .unwrap();
    let posterior = vae.encode(&images).unwrap();
    let eps = common::randn(3, posterior.mean.dims(), DType::F32);
    let z = posterior.sample(&eps).unwrap().flatten_all().unwrap();
    let n = z.elem_count() as f64;
    let mean_z = z.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let var_z = ((z
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64)
        - n * mean_z * mean_z)
        / (n - 1.0);
    let measured = 1.0 / var_z.sqrt();
    eprintln!("scaling_factor {factor:.5}; re-measured with fresh noise {measured:.5}");
    assert!((measured / factor - 1.0).abs() < 0.05);

    // Dump scaled latents and our decode for the diffusers cross-check.
    let latents = posterior.mode().get(0).unwrap().unsqueeze(0).unwrap();
    let decoded = vae.decode(&latents).unwrap();
    let dump: HashMap<String, Tensor> = [
        ("latents".to_string(), latents),
        ("decoded".to_string(), decoded),
    ]
    .into();
    candle_core::safetensors::save(&dump, check_dir.join("decode_check.safetensors")).unwrap();
}

/// Decoder-only fine-tuning from a trained VAE: it starts from that VAE's weights (its first
/// losses are far below a fresh run's), changes the decoder, and exports an encoder and a
/// scaling factor bit-identical to the pretrained ones, so latent models trained on the old
/// latents still fit.
#[test]
fn decoder_only_fine_tuning_keeps_the_encoder_and_scaling_factor() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    make_shapes(&data, 12, 16);
    let base_out = root.path().join("base");
    let mut base_observer = Scripted::default();
    let base = run(
        &TrainVaeOptions {
            max_steps: 60,
            ..options(&data, &base_out)
        },
        &mut base_observer,
    );

    let tuned_out = root.path().join("tuned");
    let tuned_opts = TrainVaeOptions {
        architecture: VaeArchitecture::Pretrained(base_out.clone()),
        decoder_only: true,
        max_steps: 20,
        ema_decay: Some(0.9),
        ..options(&data, &tuned_out)
    };
    let mut tuned_observer = Scripted::default();
    let tuned = run(&tuned_opts, &mut tuned_observer);

    let (fresh_start, tuned_start) = (
        base_observer.reconstruction[0],
        tuned_observer.reconstruction[0],
    );
    eprintln!(
        "first reconstruction loss: fresh {fresh_start:.4}, from pretrained {tuned_start:.4}; \
         pretrained's last {:.4}",
        base_observer.reconstruction.last().unwrap()
    );
    assert!(tuned_start < 0.5 * fresh_start);
    assert_eq!(tuned.scaling_factor, base.scaling_factor);

    let before = tensors(&base_out.join("vae/diffusion_pytorch_model.safetensors"));
    let after = tensors(&tuned_out.join("vae/diffusion_pytorch_model.safetensors"));
    assert_eq!(before.keys().len(), after.keys().len());
    let mut changed_decoder = 0;
    for (name, t) in &before {
        let same = bits(t) == bits(&after[name]);
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            changed_decoder += usize::from(!same);
        } else {
            assert!(same, "{name} changed in a decoder-only run");
        }
    }
    assert!(
        changed_decoder > 10,
        "only {changed_decoder} decoder tensors changed"
    );
    // Only the decoder is trained, so only it is checkpointed.
    let checkpoint = tensors(&tuned_out.join("checkpoint/model.safetensors"));
    assert!(checkpoint
        .keys()
        .all(|name| name.starts_with("decoder.") || name.starts_with("post_quant_conv.")));

    let err = train(
        &TrainVaeOptions {
            decoder_only: true,
            ..options(&data, &root.path().join("no-pretrained"))
        },
        &mut Scripted::default(),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("needs a pretrained VAE"),
        "{err:#}"
    );
}

/// A run stopped by Ctrl-C at step 3, resumed, killed at step 7 (last checkpoint: 6) and
/// resumed again ends bit-identical to an uninterrupted 8-step run: weights, EMA, optimizer
/// state and the loss log.
#[test]
fn interrupted_and_killed_runs_resume_bit_identically() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    make_shapes(&data, 10, 16);
    let base = TrainVaeOptions {
        max_steps: 8,
        flip: true,
        ema_decay: Some(0.9),
        save_every: Some(2),
        ..options(&data, &root.path().join("unused"))
    };

    let straight = root.path().join("straight");
    run(
        &TrainVaeOptions {
            output: straight.clone(),
            ..base.clone()
        },
        &mut Scripted::default(),
    );

    let resumed = root.path().join("resumed");
    let opts = TrainVaeOptions {
        output: resumed.clone(),
        ..base.clone()
    };
    let first = run(
        &opts,
        &mut Scripted {
            stop_after: Some(3),
            ..Default::default()
        },
    );
    assert!(first.interrupted);
    assert_eq!(first.step, 3);
    assert!(first.vae_dir.is_none() && !resumed.join("vae").exists());

    let resume = TrainVaeOptions {
        resume: true,
        ..opts.clone()
    };
    let killed = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut observer = Scripted {
            die_after: Some(7),
            ..Default::default()
        };
        let _ = train(&resume, &mut observer);
    }));
    assert!(killed.is_err(), "the observer kills the run");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(resumed.join("checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["train"]["step"], 6,
        "the last checkpoint before the kill"
    );

    let last = run(&resume, &mut Scripted::default());
    assert_eq!((last.step, last.steps_run), (8, 2));

    for file in [
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
    ] {
        let a = tensors(&straight.join("checkpoint").join(file));
        let b = tensors(&resumed.join("checkpoint").join(file));
        assert_eq!(a.len(), b.len(), "{file}");
        for (name, t) in &a {
            assert_eq!(bits(t), bits(&b[name]), "{file}: {name} differs");
        }
    }
    let exported = |dir: &Path| tensors(&dir.join("vae/diffusion_pytorch_model.safetensors"));
    let (a, b) = (exported(&straight), exported(&resumed));
    for (name, t) in &a {
        assert_eq!(bits(t), bits(&b[name]), "exported {name} differs");
    }
    let csv = |dir: &Path| std::fs::read_to_string(dir.join("losses.csv")).unwrap();
    assert_eq!(csv(&straight), csv(&resumed));
    let config = |dir: &Path| std::fs::read_to_string(dir.join("vae/config.json")).unwrap();
    assert_eq!(config(&straight), config(&resumed), "same scaling factor");
}

#[test]
fn resume_is_explicit_and_checks_the_settings() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    make_shapes(&data, 4, 16);
    let out = root.path().join("out");
    let opts = TrainVaeOptions {
        max_steps: 1,
        ..options(&data, &out)
    };
    let err = train(
        &TrainVaeOptions {
            resume: true,
            ..opts.clone()
        },
        &mut Scripted::default(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("no checkpoint"), "{err:#}");

    run(&opts, &mut Scripted::default());
    let err = train(&opts, &mut Scripted::default()).unwrap_err();
    assert!(format!("{err:#}").contains("--resume"), "{err:#}");

    let err = train(
        &TrainVaeOptions {
            resume: true,
            seed: 1,
            max_steps: 2,
            ..opts.clone()
        },
        &mut Scripted::default(),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("seed: checkpoint 0, now 1"),
        "{err:#}"
    );

    let err = train(
        &TrainVaeOptions {
            batch_size: 5,
            output: root.path().join("other"),
            ..opts.clone()
        },
        &mut Scripted::default(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("batch size (5)"), "{err:#}");
}

#[test]
fn cli_trains_a_vae() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    make_shapes(&data, 4, 16);
    let out = root.path().join("out");
    let output = assert_cmd::Command::cargo_bin("ldm")
        .unwrap()
        .args(["train-vae", "--data"])
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .args([
            "--block-out-channels",
            "8,16",
            "--norm-num-groups",
            "4",
            "--latent-channels",
            "2",
            "--resolution",
            "16",
            "--batch-size",
            "2",
            "--max-steps",
            "3",
            "--device",
            "cpu",
            "--quiet",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("trained to step 3"), "{stdout}");
    let (cfg, _) = load_exported(&out.join("vae"));
    assert_eq!(cfg.block_out_channels, [8, 16]);
    assert_eq!(cfg.latent_channels, 2);
}

/// Ctrl-C (SIGINT) saves a checkpoint and exits non-zero, so a script chaining stages stops
/// instead of going on with an unfinished VAE; the run trains on `--crop` windows (what a crop
/// is: `random_crops_are_windows_of_each_image`).
#[cfg(unix)]
#[test]
fn cli_ctrl_c_saves_and_fails() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    make_shapes(&data, 4, 16);
    let out = root.path().join("out");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(["train-vae", "--data"])
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .args(["--block-out-channels", "8,16", "--norm-num-groups", "4"])
        .args(["--resolution", "16", "--crop", "8", "--batch-size", "2"])
        .args(["--max-steps", "1000000", "--device", "cpu", "--quiet"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let losses = out.join("losses.csv");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&losses).map_or(0, |s| s.lines().count()) < 3 {
        assert!(std::time::Instant::now() < deadline, "no training steps");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: signals our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "an interrupted run is not a success"
    );
    assert!(stderr.contains("continue with --resume"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.join("checkpoint").is_dir());
}

/// A run with `crop` trains on crop windows: its first step's losses are, to the bit, those of
/// the initial VAE on the windows of the first batch cut by the "crops at step 0" stream, with
/// the run generator's first noise; the whole images would give other losses.
#[test]
fn a_cropped_run_trains_on_crop_windows() {
    use ldm::rng::TorchGenerator;
    use ldm::training::data::{next_batch, random_crops, DataCursor, ImageFolder};
    use ldm::training::{seeded_var_builder, SplitMix64};

    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    make_shapes(&data, 6, 16);
    let opts = TrainVaeOptions {
        crop: Some(8),
        max_steps: 1,
        ..options(&data, &root.path().join("out"))
    };
    let summary = run(&opts, &mut Scripted::default());
    let trained = summary.last_losses.unwrap();

    let (config, _) = load_exported(summary.vae_dir.as_deref().unwrap());
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, opts.seed, DType::F32, &CPU);
    let initial = AutoencoderKL::new(vb, &config).unwrap();
    let folder = ImageFolder::open(&data, opts.resolution).unwrap();
    let mut cursor = DataCursor::default();
    let (indices, flips) =
        next_batch(&mut cursor, folder.len(), opts.batch_size, opts.seed, false).unwrap();
    let (images, _) = folder.load_batch(&indices, &flips, &CPU).unwrap();
    let mut stream = SplitMix64::for_stream(opts.seed, "crops at step 0");
    let windows = random_crops(&images, 8, &mut stream).unwrap();
    let losses = |images: &Tensor| {
        let side = images.dim(2).unwrap() / config.vae_scale_factor();
        let shape = (opts.batch_size, config.latent_channels, side, side);
        let count = opts.batch_size * config.latent_channels * side * side;
        let eps = Tensor::from_vec(TorchGenerator::new(opts.seed).randn(count), shape, &CPU);
        let (terms, _) = negative_elbo(
            &initial,
            images,
            &eps.unwrap(),
            opts.recon_loss,
            opts.kl_weight,
        )
        .unwrap();
        terms.values().unwrap()
    };
    assert_eq!(trained, losses(&windows));
    assert_ne!(trained[0], losses(&images)[0], "whole images differ");
}

/// `--crop` windows: each crop is a `size`×`size` window of its own image, the positions vary
/// with the generator's stream (and between the images of a batch), the same stream gives the
/// same crops, and a window larger than the image is an error.
#[test]
fn random_crops_are_windows_of_each_image() {
    use ldm::training::data::random_crops;
    use ldm::training::SplitMix64;
    // Every pixel value unique, so a crop's first value tells where it was taken.
    let (batch, channels, side, size) = (3, 2, 12, 5);
    let count = batch * channels * side * side;
    let images = Tensor::arange(0f32, count as f32, &CPU)
        .unwrap()
        .reshape((batch, channels, side, side))
        .unwrap();
    let mut positions = std::collections::HashSet::new();
    for stream in 0..8 {
        let name = format!("crops at step {stream}");
        let crops = random_crops(&images, size, &mut SplitMix64::for_stream(1, &name)).unwrap();
        assert_eq!(crops.dims(), [batch, channels, size, size]);
        let again = random_crops(&images, size, &mut SplitMix64::for_stream(1, &name)).unwrap();
        assert_eq!(common::max_abs_diff(&crops, &again), 0.0, "same stream");
        for i in 0..batch {
            let crop = crops.get(i).unwrap();
            let first = crop.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as usize;
            let within = first - i * channels * side * side;
            let (top, left) = (within / side, within % side);
            assert!(
                top + size <= side && left + size <= side,
                "crop {i} at {top},{left}"
            );
            let window = images
                .get(i)
                .unwrap()
                .narrow(1, top, size)
                .unwrap()
                .narrow(2, left, size)
                .unwrap();
            assert_eq!(common::max_abs_diff(&crop, &window), 0.0, "crop {i}");
            positions.insert((top, left));
        }
    }
    assert!(
        positions.len() > 10,
        "crops land in {} places",
        positions.len()
    );
    let error = random_crops(&images, side + 1, &mut SplitMix64::new(0)).unwrap_err();
    assert!(format!("{error:#}").contains("crop size"), "{error:#}");
}
