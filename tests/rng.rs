//! The seeded noise equals PyTorch's `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s))`,
//! recorded by scripts/make_fixtures.py in the `rng` case.

mod common;

use candle_core::{DType, Device, Shape, Tensor};
use ldm::rng::{BatchNoise, NoiseSource, TorchGenerator};

/// torch's vectorised path uses AVX2 polynomial approximations of log/sin/cos in f32 (cephes,
/// via avx_mathfun); ours uses libm's, so values agree to float32 rounding: measured up to
/// 2.03e-6 on values up to |4.6|, i.e. a few ulp (one ulp at 4 is 4.8e-7).
const TOL: f32 = 5e-6;

/// Parses `seed{S}_shape{AxBxC}` names.
fn parse_name(name: &str) -> Option<(u64, Vec<usize>)> {
    let rest = name.strip_prefix("seed")?;
    let (seed, shape) = rest.split_once("_shape")?;
    let dims = shape
        .split('x')
        .map(|d| d.parse().ok())
        .collect::<Option<Vec<usize>>>()?;
    Some((seed.parse().ok()?, dims))
}

#[test]
fn randn_matches_torch_for_every_recorded_seed_and_shape() {
    let case = common::load_case("rng");
    let mut checked = 0;
    for (name, expected) in &case {
        let Some((seed, dims)) = parse_name(name) else {
            continue;
        };
        let values = TorchGenerator::new(seed).randn(dims.iter().product());
        let actual = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu).unwrap();
        common::assert_close(name, &actual, expected, TOL);
        checked += 1;
    }
    assert!(
        checked >= 20,
        "only {checked} recorded seed/shape pairs found"
    );
}

#[test]
fn generator_state_carries_across_draws_like_torch() {
    let case = common::load_case("rng");
    let json = common::load_case_json("rng");
    let draws = json["sequence"]["draws"]
        .as_array()
        .expect("sequence draws in rng.json");
    let seed = json["sequence"]["seed"].as_u64().unwrap();
    let mut generator = TorchGenerator::new(seed);
    for (i, draw) in draws.iter().enumerate() {
        let dims: Vec<usize> = serde_json::from_value(draw["shape"].clone()).unwrap();
        let name = draw["name"].as_str().unwrap();
        let values = generator.randn(dims.iter().product());
        let actual = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu).unwrap();
        common::assert_close(
            &format!("sequence draw {i} ({name})"),
            &actual,
            &case[name],
            TOL,
        );
    }
}

#[test]
fn batch_noise_gives_each_image_its_own_seed() {
    let shape = Shape::from((3, 4, 8, 8));
    let batch = BatchNoise::from_seeds(&[7, 8, 9])
        .randn(&shape, DType::F32, &Device::Cpu)
        .unwrap();
    for (i, seed) in [7u64, 8, 9].into_iter().enumerate() {
        let alone = BatchNoise::from_seeds(&[seed])
            .randn(&Shape::from((1, 4, 8, 8)), DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(
            common::max_abs_diff(&batch.narrow(0, i, 1).unwrap(), &alone),
            0.0
        );
    }
    let err = BatchNoise::from_seeds(&[1, 2]).randn(&shape, DType::F32, &Device::Cpu);
    assert!(err.is_err(), "3 rows from 2 generators must fail");
}
