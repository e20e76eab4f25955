//! Every kernel on the GPU, in f32 and f16, against the CPU kernel in f32 on the same inputs,
//! then the tiny SD 1 U-Net the same way: the check that finds which op a GPU build gets wrong
//! (a GPU run's f16 images have differed from diffusers' while its f32 ones agree, and running
//! the GPU code paths on the CPU in f16 agreed with the CPU kernels, so the suspect is a GPU
//! kernel itself).
//!
//! Only in GPU builds (`--features cuda` or `metal`), and it needs the device: it fails without
//! one. `scripts/gpu_carry.sh` builds it for the GPU machine, where `scripts/gpu_all.sh` runs it
//! first. Inputs span SD's magnitudes (activations of ±4 and ±64, so half precision's range is
//! exercised); each op's relative error (max difference / max |CPU value|) is printed, then
//! held to 1e-4 in f32 and 1e-2 in f16 (half precision's unit roundoff is 4.9e-4; sums of
//! thousands of products lose a few bits more).
#![cfg(any(feature = "cuda", feature = "metal"))]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use common::{fixture, load_case, values};
use ldm::kernels::{self, Activation};
use ldm::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn gpu() -> Device {
    #[cfg(feature = "cuda")]
    let device = Device::new_cuda(0);
    #[cfg(all(feature = "metal", not(feature = "cuda")))]
    let device = Device::new_metal(0);
    device.expect("this test needs the GPU its build is for")
}

/// Runs `op` on the CPU in f32 and on the GPU in f32 and f16, inputs rounded to f16 first (so
/// that both sides see the same values), and checks the relative errors.
fn check(name: &str, inputs: &[Tensor], op: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let inputs: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F16)?.to_dtype(DType::F32))
        .collect::<Result<_>>()
        .unwrap();
    let reference = op(&inputs).unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap();
    let scale = scale.to_scalar::<f32>().unwrap().max(1e-6);
    let device = gpu();
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::F16, 1e-2)] {
        let on_gpu: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_device(&device)?.to_dtype(dtype))
            .collect::<Result<_>>()
            .unwrap();
        let out = op(&on_gpu).unwrap().to_dtype(DType::F32).unwrap();
        let out = out.to_device(&Device::Cpu).unwrap();
        assert_close(name, dtype, out, &reference, scale, tolerance);
    }
}

/// Prints the largest difference between `out` and `reference` relative to `scale` (the
/// reference's largest magnitude) and asserts it is under `tolerance`.
fn assert_close(
    name: &str,
    dtype: DType,
    out: Tensor,
    reference: &Tensor,
    scale: f32,
    tolerance: f32,
) {
    let diff = (out - reference).unwrap().abs().unwrap().max_all().unwrap();
    let error = diff.to_scalar::<f32>().unwrap() / scale;
    println!("{name:<40} {dtype:?}: relative error {error:.2e} (max |value| {scale:.3e})");
    assert!(
        error.is_finite() && error < tolerance,
        "{name} in {dtype:?}: {error:e}"
    );
}

#[test]
fn gpu_kernels_match_the_cpu_kernels() {
    for (scale, seed) in [(4.0, 1), (64.0, 2)] {
        let f32_values = |shape: &[usize], salt: u64, scale: f64| {
            values(shape, seed * 100 + salt, scale)
                .to_dtype(DType::F32)
                .unwrap()
        };
        let x = |shape: &[usize], salt: u64| f32_values(shape, salt, scale);
        let w = |shape: &[usize], salt: u64| f32_values(shape, salt, 0.1);
        let tag = |op: &str| format!("{op} (inputs ±{scale})");
        // Self-attention, cross-attention (77 text tokens) and CLIP's causal attention.
        for (salt, q_len, kv_len, width, heads, causal) in [
            (1, 1024, 1024, 320, 8, false),
            (4, 1024, 77, 320, 8, false),
            (7, 77, 77, 768, 12, true),
        ] {
            check(
                &tag(&format!(
                    "attention 2x{q_len}/{kv_len}x{width}, {heads} heads, causal {causal}"
                )),
                &[
                    x(&[2, q_len, width], salt),
                    x(&[2, kv_len, width], salt + 1),
                    x(&[2, kv_len, width], salt + 2),
                ],
                |t| kernels::attention(&t[0], &t[1], &t[2], heads, causal),
            );
        }
        check(
            &tag("layer norm 2x1024x320"),
            &[x(&[2, 1024, 320], 10), w(&[320], 11), w(&[320], 12)],
            |t| kernels::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        );
        for silu in [false, true] {
            check(
                &tag(&format!("group norm 2x320x32x32, silu {silu}")),
                &[x(&[2, 320, 32, 32], 13), w(&[320], 14), w(&[320], 15)],
                |t| kernels::group_norm(&t[0], &t[1], &t[2], 32, 1e-5, silu),
            );
        }
        check(
            &tag("conv 3x3 2x320x32x32 -> 320"),
            &[
                x(&[2, 320, 32, 32], 16),
                w(&[320, 320, 3, 3], 17),
                w(&[320], 18),
            ],
            |t| kernels::conv2d(&t[0], &t[1], &t[2], 1, 1),
        );
        check(
            &tag("conv 3x3 stride 2 2x320x32x32 -> 320"),
            &[
                x(&[2, 320, 32, 32], 19),
                w(&[320, 320, 3, 3], 20),
                w(&[320], 21),
            ],
            |t| kernels::conv2d(&t[0], &t[1], &t[2], 2, 1),
        );
        check(
            &tag("linear 2x1024x320 -> 1280"),
            &[x(&[2, 1024, 320], 22), w(&[1280, 320], 23), w(&[1280], 24)],
            |t| kernels::linear(&t[0], &t[1], Some(&t[2])),
        );
        check(&tag("geglu 2x1024x2560"), &[x(&[2, 1024, 2560], 25)], |t| {
            kernels::geglu(&t[0])
        });
        check(
            &tag("softmax 2x8x1024x77"),
            &[x(&[2, 8, 1024, 77], 26)],
            |t| kernels::softmax_last_dim(&t[0]),
        );
        for activation in [Activation::Silu, Activation::Gelu, Activation::QuickGelu] {
            check(
                &tag(&format!("{activation:?} 2x1024x1280")),
                &[x(&[2, 1024, 1280], 27)],
                |t| activation.apply(&t[0]),
            );
        }
    }
}

#[test]
fn gpu_unet_matches_the_cpu_unet() {
    let weights = fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let config = UNet2DConditionConfig::from_file(&fixture("tiny-sd1/unet/config.json")).unwrap();
    let case = load_case("unet_sd1");
    let run = |device: &Device, dtype: DType| {
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) };
        let unet = UNet2DConditionModel::new(vb.unwrap(), &config).unwrap();
        let input = |name: &str| case[name].to_dtype(dtype)?.to_device(device);
        let timesteps = case["timestep"].to_device(device).unwrap();
        let out = unet
            .forward(
                &input("sample").unwrap(),
                &timesteps,
                &input("encoder_hidden_states").unwrap(),
            )
            .unwrap();
        out.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let reference = run(&Device::Cpu, DType::F32);
    let scale = reference.abs().unwrap().max_all().unwrap();
    let scale = scale.to_scalar::<f32>().unwrap();
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::F16, 2e-2)] {
        assert_close(
            "tiny SD 1 U-Net",
            dtype,
            run(&gpu(), dtype),
            &reference,
            scale,
            tolerance,
        );
    }
}
