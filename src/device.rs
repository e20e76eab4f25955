//! Choosing where and in which precision the models run.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context};
use candle_core::{DType, Device};

/// A device as the user names it: `cpu`, `cuda`, `cuda:1`, `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((kind, index)) => {
                let index = index
                    .parse()
                    .with_context(|| format!("bad device index in {s:?}"))?;
                (kind, index)
            }
            None => (s, 0),
        };
        match kind {
            "cpu" if ordinal == 0 => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(ordinal)),
            "metal" | "mps" => Ok(Self::Metal(ordinal)),
            _ => bail!("unknown device {s:?} (expected cpu, cuda, cuda:N or metal)"),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device, explaining when this build lacks the backend or the machine the GPU.
    pub fn open(self) -> anyhow::Result<Device> {
        let device = match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda(i) => {
                full_precision_f32();
                Device::new_cuda(i)
            }
            .with_context(|| {
                if candle_core::utils::cuda_is_available() {
                    format!("cannot open cuda:{i}: no usable NVIDIA GPU or driver on this machine")
                } else {
                    format!("cannot open cuda:{i}: this build has no CUDA support (build with `--features cuda`)")
                }
            })?,
            Self::Metal(i) => Device::new_metal(i).with_context(|| {
                if candle_core::utils::metal_is_available() {
                    format!("cannot open metal:{i}: no usable Metal GPU on this machine")
                } else {
                    format!("cannot open metal:{i}: this build has no Metal support (build with `--features metal` on macOS)")
                }
            })?,
        };
        Ok(device)
    }

    /// The GPU this build was compiled for, if any: what runs when no device is named.
    fn preferred() -> Option<Self> {
        if candle_core::utils::cuda_is_available() {
            Some(Self::Cuda(0))
        } else if candle_core::utils::metal_is_available() {
            Some(Self::Metal(0))
        } else {
            None
        }
    }
}

/// f32 on a GPU is f32: cuBLAS and cuDNN may otherwise multiply f32 in TF32 on Ampere and
/// later (cuDNN does by default, and PyTorch lets it), 10-bit mantissas that move SD's latents
/// by ~1e-2 where the CPU and diffusers' fixtures agree to 1e-4. The libraries read this
/// variable when they start, so it is set before the first CUDA device opens; a value the user
/// set stays. Half precision is unaffected.
fn full_precision_f32() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() {
            std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
        }
    });
}

/// Opens the device the user named, or else the first GPU this build supports. A GPU build on
/// a machine without that GPU (or its driver) falls back to the CPU with a one-line notice on
/// stderr; a device named explicitly is never replaced, its failure is an error.
pub fn open(spec: Option<DeviceSpec>) -> anyhow::Result<Device> {
    if let Some(spec) = spec {
        return spec.open();
    }
    Ok(match DeviceSpec::preferred().map(|gpu| (gpu, gpu.open())) {
        None => Device::Cpu,
        Some((_, Ok(device))) => device,
        Some((gpu, Err(err))) => {
            eprintln!(
                "ldm: {gpu} unavailable ({}); running on the CPU",
                err.root_cause()
            );
            Device::Cpu
        }
    })
}

/// The precisions a pipeline runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(2));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal(0));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn the_default_device_opens_and_a_missing_backend_is_a_clear_error() {
        // Whatever this build and machine support, naming no device yields one that works.
        let device = open(None).unwrap();
        assert!(Tensor::ones(2, DType::F32, &device).is_ok());
        if !candle_core::utils::cuda_is_available() {
            let err = format!("{:#}", open(Some(DeviceSpec::Cuda(0))).unwrap_err());
            assert!(err.contains("no CUDA support"), "{err}");
        }
    }
}
