//! The training infrastructure: AdamW, warm-up, clipping, EMA, checkpoints, data order, the
//! image folder and the loss log.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use image::{Rgb, RgbImage, Rgba, RgbaImage};
use ldm::rng::TorchGenerator;
use ldm::training::checkpoint::{self, TrainState};
use ldm::training::data::{epoch_flips, epoch_order, ImageFolder};
use ldm::training::metrics::LossLog;
use ldm::training::optim::{clip_grad_norm, warmup_lr, AdamW, AdamWConfig, Ema};
use ldm::training::SplitMix64;

const CPU: Device = Device::Cpu;

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn var_values(varmap: &VarMap, name: &str) -> Vec<f64> {
    values(varmap.data().lock().unwrap()[name].as_tensor())
}

/// A VarMap holding `w` and `b` with the given values and dtype.
fn two_vars(w: &[f64], b: &[f64], dtype: DType) -> VarMap {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, v) in [("w", w), ("b", b)] {
            let t = Tensor::new(v, &CPU).unwrap().to_dtype(dtype).unwrap();
            data.insert(name.to_string(), Var::from_tensor(&t).unwrap());
        }
    }
    varmap
}

/// The toy objective: Σ c·(w − target)² + 3·(Σ b)³.
fn toy_loss(varmap: &VarMap) -> Tensor {
    let data = varmap.data().lock().unwrap();
    let (w, b) = (data["w"].as_tensor(), data["b"].as_tensor());
    let dtype = w.dtype();
    let target = Tensor::new(&[0.3f64, 0.1, -0.7], &CPU)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let c = Tensor::new(&[1f64, 2., 3.], &CPU)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let quadratic = (w - target).unwrap().sqr().unwrap().mul(&c).unwrap();
    let cubic = (b.sum_all().unwrap().powf(3.0).unwrap() * 3.0).unwrap();
    (quadratic.sum_all().unwrap() + cubic).unwrap()
}

fn toy_config() -> AdamWConfig {
    AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

fn run_adamw(varmap: &VarMap, optim: &mut AdamW, steps: usize) {
    for _ in 0..steps {
        let grads = toy_loss(varmap).backward().unwrap();
        optim.step(&grads, optim.config().lr).unwrap();
    }
}

/// torch.optim.AdamW semantics, per element, for update t with gradient g:
///   θ ← θ(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
///   θ ← θ − lr/(1−β1^t) · m / (√v/√(1−β2^t) + eps).
#[test]
fn adamw_matches_torch() {
    let varmap = two_vars(&[1.0, -2.0, 0.5], &[0.25], DType::F64);
    let mut optim = AdamW::new(&varmap, toy_config()).unwrap();
    run_adamw(&varmap, &mut optim, 3);
    // torch 2.15: AdamW([w, b], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    // three steps on the same loss, float64.
    let torch_w = [0.6764708103, -1.6443210671, 0.1894388847];
    let torch_b = [-0.0133304768];
    for (ours, theirs) in [
        (var_values(&varmap, "w"), &torch_w[..]),
        (var_values(&varmap, "b"), &torch_b[..]),
    ] {
        for (a, b) in ours.iter().zip(theirs) {
            assert!((a - b).abs() < 1e-9, "ours {a}, torch {b}");
        }
    }
    assert_eq!(optim.step_count(), 3);
}

#[test]
fn adamw_matches_the_formula_by_hand() {
    let cfg = toy_config();
    let (w0, target, c) = ([1.0f64, -2.0, 0.5], [0.3, 0.1, -0.7], [1.0, 2.0, 3.0]);
    let varmap = two_vars(&w0, &[0.25], DType::F32);
    let mut optim = AdamW::new(&varmap, cfg).unwrap();
    run_adamw(&varmap, &mut optim, 4);

    let mut w = w0;
    let (mut m, mut v) = ([0.0; 3], [0.0; 3]);
    for t in 1..=4 {
        for i in 0..3 {
            let g = 2.0 * c[i] * (w[i] - target[i]);
            w[i] *= 1.0 - cfg.lr * cfg.weight_decay;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g;
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g * g;
            let m_hat = m[i] / (1.0 - cfg.beta1.powi(t));
            let v_hat = v[i] / (1.0 - cfg.beta2.powi(t));
            w[i] -= cfg.lr * m_hat / (v_hat.sqrt() + cfg.eps);
        }
    }
    let ours = var_values(&varmap, "w");
    for (a, b) in ours.iter().zip(&w) {
        // f32 variables against f64 arithmetic.
        assert!((a - b).abs() < 2e-6, "ours {a}, by hand {b}");
    }
}

#[test]
fn adamw_state_round_trip_continues_identically() {
    let uninterrupted = two_vars(&[1.0, -2.0, 0.5], &[0.25], DType::F32);
    let mut optim = AdamW::new(&uninterrupted, toy_config()).unwrap();
    run_adamw(&uninterrupted, &mut optim, 5);

    let first = two_vars(&[1.0, -2.0, 0.5], &[0.25], DType::F32);
    let mut optim = AdamW::new(&first, toy_config()).unwrap();
    run_adamw(&first, &mut optim, 2);
    let state = optim.state_tensors();
    assert_eq!(state.len(), 4, "exp_avg and exp_avg_sq of w and b");

    let resumed = two_vars(
        &var_values(&first, "w"),
        &var_values(&first, "b"),
        DType::F32,
    );
    let mut optim = AdamW::new(&resumed, toy_config()).unwrap();
    optim.load_state(&state, 2).unwrap();
    run_adamw(&resumed, &mut optim, 3);
    for name in ["w", "b"] {
        assert_eq!(var_values(&resumed, name), var_values(&uninterrupted, name));
    }

    let mut bad = state.clone();
    bad.insert(
        "nope.exp_avg".into(),
        Tensor::zeros(3, DType::F32, &CPU).unwrap(),
    );
    assert!(optim.load_state(&bad, 2).is_err());
}

#[test]
fn adamw_leaves_variables_without_gradients_alone() {
    let varmap = two_vars(&[1.0, -2.0, 0.5], &[0.25], DType::F32);
    let mut optim = AdamW::new(&varmap, toy_config()).unwrap();
    let w = varmap.data().lock().unwrap()["w"].as_tensor().clone();
    let grads = w.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    optim.step(&grads, 0.1).unwrap();
    assert_eq!(
        var_values(&varmap, "b"),
        [0.25],
        "no decay without a gradient either"
    );
    assert_ne!(var_values(&varmap, "w")[0], 1.0);
}

#[test]
fn warmup_is_linear_then_constant() {
    assert_eq!(warmup_lr(0, 1e-3, 4), 2.5e-4);
    assert_eq!(warmup_lr(1, 1e-3, 4), 5e-4);
    assert_eq!(warmup_lr(3, 1e-3, 4), 1e-3);
    assert_eq!(warmup_lr(100, 1e-3, 4), 1e-3);
    assert_eq!(warmup_lr(0, 1e-3, 0), 1e-3);
}

#[test]
fn clipping_scales_to_the_global_norm() {
    let varmap = two_vars(&[1.5, 2.0], &[-6.0], DType::F32);
    // loss = Σ w² + Σ b² → gradients 2w = (3, 4) and 2b = (−12): global norm 13.
    let loss = || {
        let data = varmap.data().lock().unwrap();
        (data["w"].as_tensor().sqr().unwrap().sum_all().unwrap()
            + data["b"].as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap()
    };
    let grad_values = |grads: &candle_core::backprop::GradStore| {
        let data = varmap.data().lock().unwrap();
        let mut all = values(grads.get(data["w"].as_tensor()).unwrap());
        all.extend(values(grads.get(data["b"].as_tensor()).unwrap()));
        all
    };

    let mut grads = loss().backward().unwrap();
    let norm = clip_grad_norm(&mut grads, &varmap, 6.5)
        .unwrap()
        .value()
        .unwrap();
    assert!((norm - 13.0).abs() < 1e-5, "norm {norm}");
    let scale = 6.5 / (13.0 + 1e-6);
    for (got, want) in grad_values(&grads).iter().zip([3.0, 4.0, -12.0]) {
        assert!(
            (got - want * scale).abs() < 1e-5,
            "{got} vs {}",
            want * scale
        );
    }

    let mut grads = loss().backward().unwrap();
    let norm = clip_grad_norm(&mut grads, &varmap, 100.0)
        .unwrap()
        .value()
        .unwrap();
    assert!((norm - 13.0).abs() < 1e-5);
    assert_eq!(
        grad_values(&grads),
        [3.0, 4.0, -12.0],
        "below the limit: untouched"
    );
}

#[test]
fn ema_follows_diffusers_decay_schedule() {
    let varmap = two_vars(&[0.0], &[1.0], DType::F32);
    let mut ema = Ema::new(&varmap, 0.5).unwrap();
    let mut expected = 0.0f64;
    for (t, value) in [(1, 10.0f64), (2, 20.0), (3, 30.0)] {
        varmap.data().lock().unwrap()["w"]
            .set(&Tensor::new(&[value as f32], &CPU).unwrap())
            .unwrap();
        // decay_t = min(0.5, (1 + t) / (10 + t)): 2/11, 3/12, then 0.5 from t = 3 (4/13 < 0.5!)
        let decay = 0.5f64.min((1.0 + t as f64) / (10.0 + t as f64));
        assert!((ema.current_decay() - decay).abs() < 1e-12);
        ema.update(&varmap).unwrap();
        expected = decay * expected + (1.0 - decay) * value;
    }
    let shadow = values(&ema.tensors()["w"])[0];
    assert!((shadow - expected).abs() < 1e-4, "{shadow} vs {expected}");
    assert_eq!(
        values(&ema.tensors()["b"]),
        [1.0],
        "constant weights stay put"
    );
    assert_eq!(ema.updates(), 3);
}

/// A small VarMap + optimizer + EMA after two updates, and a train state.
fn trained_state(seed: f64) -> (VarMap, AdamW, Ema, TrainState) {
    let varmap = two_vars(&[1.0, -2.0, seed], &[0.25], DType::F32);
    let mut optim = AdamW::new(&varmap, toy_config()).unwrap();
    let mut ema = Ema::new(&varmap, 0.9).unwrap();
    for _ in 0..2 {
        run_adamw(&varmap, &mut optim, 1);
        ema.update(&varmap).unwrap();
    }
    let mut generator = TorchGenerator::new(7);
    generator.randn(5);
    let state = TrainState {
        step: 2,
        epoch: 1,
        position_in_epoch: 4,
        rng: generator.state(),
        extra: serde_json::json!({"seed": 7}),
    };
    (varmap, optim, ema, state)
}

fn assert_same_tensors(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (name, t) in a {
        assert_eq!(values(t), values(&b[name]), "{name}");
    }
}

#[test]
fn checkpoint_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, optim, ema, state) = trained_state(0.5);
    checkpoint::save_checkpoint(dir.path(), &varmap, &optim, Some(&ema), &state).unwrap();

    let (fresh, mut fresh_optim, mut fresh_ema, _) = trained_state(9.0);
    let loaded =
        checkpoint::load_checkpoint(dir.path(), &fresh, &mut fresh_optim, Some(&mut fresh_ema))
            .unwrap();
    assert_eq!(loaded, state);
    for name in ["w", "b"] {
        assert_eq!(var_values(&fresh, name), var_values(&varmap, name));
    }
    assert_same_tensors(&fresh_optim.state_tensors(), &optim.state_tensors());
    assert_eq!(fresh_optim.step_count(), optim.step_count());
    assert_same_tensors(&fresh_ema.tensors(), &ema.tensors());
    assert_eq!(fresh_ema.updates(), 2);
    let mut restored = TorchGenerator::from_state(&loaded.rng).unwrap();
    let mut original = TorchGenerator::from_state(&state.rng).unwrap();
    assert_eq!(restored.randn(20), original.randn(20));

    // A model with another variable set is refused, naming the problem.
    let other = two_vars(&[1.0, 2.0], &[0.0], DType::F32);
    let mut other_optim = AdamW::new(&other, toy_config()).unwrap();
    let err = checkpoint::load_checkpoint(dir.path(), &other, &mut other_optim, None).unwrap_err();
    assert!(format!("{err:#}").contains("shape"), "{err:#}");
}

fn load_step(dir: &Path) -> usize {
    let (varmap, mut optim, mut ema, _) = trained_state(0.0);
    checkpoint::load_checkpoint(dir, &varmap, &mut optim, Some(&mut ema))
        .unwrap()
        .step
}

/// A save killed at any point leaves the previous checkpoint loadable.
#[test]
fn interrupted_saves_keep_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let (varmap, optim, ema, mut state) = trained_state(0.5);
    checkpoint::save_checkpoint(out, &varmap, &optim, Some(&ema), &state).unwrap();
    assert_eq!(load_step(out), 2);

    // Killed while writing the temporary folder: partial files, no state.json.
    let stale = out.join(".checkpoint-tmp-killed");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"\x08\x00\x00\x00partial").unwrap();
    assert_eq!(load_step(out), 2);

    // Killed between the two renames: only checkpoint.previous/ exists.
    std::fs::rename(out.join("checkpoint"), out.join("checkpoint.previous")).unwrap();
    assert!(checkpoint::has_checkpoint(out));
    assert_eq!(load_step(out), 2);

    // ... and a half-written checkpoint/ (no state.json) beside it is not trusted.
    std::fs::create_dir(out.join("checkpoint")).unwrap();
    std::fs::write(out.join("checkpoint/model.safetensors"), b"garbage").unwrap();
    assert_eq!(load_step(out), 2);

    // The next save cleans up and becomes the checkpoint.
    state.step = 3;
    checkpoint::save_checkpoint(out, &varmap, &optim, Some(&ema), &state).unwrap();
    assert_eq!(load_step(out), 3);
    let mut names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint"]);
}

/// The generator behind data order, flips, crops and initial weights is the published
/// SplitMix64 (Vigna's reference stream for seed 1234567), and named streams XOR the seed with
/// the FNV-1a hash of the name rotated left by 17 (FNV-1a's published values for "" and "a").
#[test]
fn splitmix64_is_the_reference_generator() {
    let mut rng = SplitMix64::new(1234567);
    let stream: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
    assert_eq!(
        stream,
        [
            6457827717110365317,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821
        ]
    );
    for (name, fnv1a) in [("", 0xcbf2_9ce4_8422_2325u64), ("a", 0xaf63_dc4c_8601_ec8c)] {
        let seed = 99;
        assert_eq!(
            SplitMix64::for_stream(seed, name).next_u64(),
            SplitMix64::new(seed ^ fnv1a.rotate_left(17)).next_u64(),
            "stream {name:?}"
        );
    }
}

#[test]
fn epoch_order_is_a_deterministic_permutation() {
    let order = epoch_order(10, 42, 0);
    assert_eq!(order, epoch_order(10, 42, 0));
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_ne!(order, epoch_order(10, 42, 1), "each epoch reshuffles");
    assert_ne!(order, epoch_order(10, 43, 0), "the seed matters");
    // The documented shuffle: Fisher-Yates from the end, j = (x * (i + 1)) >> 64 with x from
    // the "epoch order {epoch}" stream.
    let mut rng = SplitMix64::for_stream(42, "epoch order 0");
    let mut expected: Vec<usize> = (0..10).collect();
    for i in (1..10).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        expected.swap(i, j);
    }
    assert_eq!(order, expected);
    // Pinned (the same shuffle transcribed to Python gives it): a change here would make old
    // checkpoints resume on other batches.
    assert_eq!(order, [3, 2, 4, 8, 7, 9, 1, 5, 0, 6]);
    assert_eq!(epoch_flips(6, 42, 0), epoch_flips(6, 42, 0));
    let flips = epoch_flips(1000, 42, 0).iter().filter(|f| **f).count();
    assert!((400..600).contains(&flips), "{flips} of 1000 flipped");
}

fn write_png(path: &Path, image: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.save(path).unwrap();
}

#[test]
fn image_folder_reads_captions_and_skips_what_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let red = RgbImage::from_pixel(8, 4, Rgb([255, 0, 0]));
    write_png(&root.join("a.png"), &red);
    std::fs::write(root.join("b.png"), b"not a png at all").unwrap();
    write_png(
        &root.join("c.png"),
        &RgbImage::from_pixel(4, 4, Rgb([0, 0, 255])),
    );
    std::fs::write(root.join("c.txt"), "a blue square\n").unwrap();
    write_png(&root.join("d.png"), &red); // no caption anywhere
    let half_transparent = RgbaImage::from_fn(2, 2, |x, _| {
        if x < 1 {
            Rgba([0, 0, 0, 0])
        } else {
            Rgba([0, 255, 0, 255])
        }
    });
    std::fs::create_dir(root.join("sub")).unwrap();
    half_transparent.save(root.join("sub/e.png")).unwrap();
    let metadata = [
        r#"{"file_name": "a.png", "text": ["a red rectangle", "a rectangle"]}"#,
        r#"{"file_name": "b.png", "text": "broken"}"#,
        r#"{"file_name": "sub/e.png", "text": "green on the right"}"#,
        r#"{"file_name": "gone.png", "text": "missing"}"#,
        r#"{"file_name": "x.png""#,
        r#"{"file_name": "c.png", "text": []}"#,
    ];
    std::fs::write(root.join("metadata.jsonl"), metadata.join("\n")).unwrap();

    let folder = ImageFolder::open(root, 2).unwrap();
    let items: Vec<(String, &str)> = folder
        .items
        .iter()
        .map(|i| {
            let rel = i
                .path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, i.caption())
        })
        .collect();
    assert_eq!(
        items,
        [
            ("a.png".to_string(), "a red rectangle"),
            ("c.png".to_string(), "a blue square"),
            ("sub/e.png".to_string(), "green on the right"),
        ]
    );
    let skipped: Vec<(String, &str)> = folder
        .skipped
        .iter()
        .map(|(p, reason)| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                reason.as_str(),
            )
        })
        .collect();
    assert_eq!(skipped.len(), 5, "{skipped:?}");
    let reason_of = |name: &str| {
        skipped
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not skipped: {skipped:?}"))
            .1
    };
    assert!(
        reason_of("b.png").contains("cannot decode"),
        "{}",
        reason_of("b.png")
    );
    assert!(reason_of("d.png").contains("no caption"));
    assert!(reason_of("gone.png").contains("missing"));
    let metadata_reasons: Vec<&str> = skipped
        .iter()
        .filter(|(n, _)| n == "metadata.jsonl")
        .map(|(_, reason)| *reason)
        .collect();
    assert!(
        metadata_reasons[0].starts_with("line 5"),
        "{metadata_reasons:?}"
    );
    assert_eq!(metadata_reasons[1], "line 6: an empty caption list");
    assert_eq!(
        folder.items[0].captions,
        ["a red rectangle", "a rectangle"],
        "every alternative is kept"
    );

    let (batch, captions) = folder.load_batch(&[2, 0], &[true, false], &CPU).unwrap();
    assert_eq!(batch.dims(), [2, 3, 2, 2]);
    assert_eq!(captions, ["green on the right", "a red rectangle"]);
    // sub/e.png (2x2, no resize): left column transparent → white, right column green; flipped.
    let e = values(&batch.get(0).unwrap());
    let (red_channel, green_channel) = (&e[0..4], &e[4..8]);
    assert_eq!(
        red_channel,
        [-1.0, 1.0, -1.0, 1.0],
        "white moved to the right by the flip"
    );
    assert_eq!(green_channel, [1.0, 1.0, 1.0, 1.0]);
    let a = values(&batch.get(1).unwrap());
    assert_eq!(a, [1., 1., 1., 1., -1., -1., -1., -1., -1., -1., -1., -1.]);
    assert!(folder.load_batch(&[9], &[false], &CPU).is_err());
}

/// The plot of the log above (steps 1-4: "reconstruction" 1, 0.5, 1/3, 0.2 falls, "kl" 10, 20,
/// 30, 41 rises): each column's curve in its colour, going the way its values go, a legend
/// swatch per column, and text (tick labels, legend names) beside the plot area.
fn check_loss_plot(image: &RgbImage) {
    // matplotlib's first two "tab10" colours, the plot's first two series colours.
    let (blue, orange) = (Rgb([31, 119, 180]), Rgb([255, 127, 14]));
    // Mean row of a curve's pixels (anti-aliased: any shade of its hue) in the leftmost and
    // rightmost columns where it appears inside the plot area (below the legend).
    let ends = |what: &str, hue: fn(i32, i32, i32) -> bool| {
        let points: Vec<(u32, u32)> = image
            .enumerate_pixels()
            .filter(|(_, y, p)| *y > 40 && hue(p.0[0].into(), p.0[1].into(), p.0[2].into()))
            .map(|(x, y, _)| (x, y))
            .collect();
        assert!(points.len() > 300, "{what}: {} pixels", points.len());
        let mean_y_at = |x: u32| {
            let ys: Vec<f64> = points
                .iter()
                .filter(|p| p.0 == x)
                .map(|p| p.1 as f64)
                .collect();
            ys.iter().sum::<f64>() / ys.len() as f64
        };
        let first = points.iter().map(|p| p.0).min().unwrap();
        let last = points.iter().map(|p| p.0).max().unwrap();
        assert!(last - first > 500, "{what} spans columns {first}..{last}");
        (mean_y_at(first), mean_y_at(last))
    };
    let (start, end) = ends("reconstruction", |r, _, b| b - r > 60);
    assert!(
        end > start + 50.0,
        "reconstruction falls: row {start} -> {end}"
    );
    let (start, end) = ends("kl", |r, _, b| r - b > 80);
    assert!(end < start - 50.0, "kl rises: row {start} -> {end}");
    for colour in [blue, orange] {
        let swatch = image
            .enumerate_pixels()
            .filter(|(_, y, p)| *y < 30 && **p == colour)
            .count();
        assert!(
            swatch >= 16 * 4,
            "legend swatch of {colour:?}: {swatch} pixels"
        );
    }
    // Text is dark and only stands outside the plot frame: left of it (y tick labels) and at
    // the top (legend names).
    let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
        (x0..x1)
            .flat_map(|x| (y0..y1).map(move |y| (x, y)))
            .filter(|&(x, y)| image.get_pixel(x, y).0.iter().all(|&v| v < 110))
            .count()
    };
    // Measured: 32 dark pixels for the labels "10" and "1", 186 for the two names.
    assert!(dark(0, 60, 40, 440) > 15, "y tick labels");
    assert!(dark(90, 400, 0, 30) > 100, "legend names");
}

#[test]
fn loss_log_resume_drops_rows_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let columns = ["reconstruction", "kl"];
    let mut log = LossLog::open(dir.path(), &columns, None).unwrap();
    for step in 1..=5 {
        log.record(step, &[1.0 / step as f64, 10.0 * step as f64])
            .unwrap();
    }
    drop(log);
    // A kill mid-line leaves a partial last row; it is dropped too.
    let csv = dir.path().join("losses.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("6,0.1");
    std::fs::write(&csv, text).unwrap();

    let mut log = LossLog::open(dir.path(), &columns, Some(3)).unwrap();
    assert_eq!(log.rows().len(), 3);
    assert_eq!(
        log.malformed_lines(),
        [7],
        "the cut line, reported to the caller"
    );
    log.record(4, &[0.2, 41.0]).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "step,reconstruction,kl");
    let steps: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(steps, ["1", "2", "3", "4"]);
    assert_eq!(lines[4], "4,2e-1,4.1e1");

    let plot = dir.path().join("loss.png");
    log.plot(&plot).unwrap();
    let image = image::open(&plot).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (800, 480));
    check_loss_plot(&image);

    // Different columns than the file's: refused rather than mixed.
    assert!(LossLog::open(dir.path(), &["total"], Some(3)).is_err());
    // A fresh run (no resume) starts the file over.
    let log = LossLog::open(dir.path(), &columns, None).unwrap();
    assert!(log.rows().is_empty());
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap(),
        "step,reconstruction,kl\n"
    );
}
