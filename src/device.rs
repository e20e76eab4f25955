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
    /// Opens the device, explaining when this build lacks the backend.
    pub fn open(self) -> anyhow::Result<Device> {
        let device = match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda(i) => Device::new_cuda(i).with_context(|| {
                format!(
                    "cannot open cuda:{i} (build with `--features cuda` on a machine with CUDA)"
                )
            })?,
            Self::Metal(i) => Device::new_metal(i).with_context(|| {
                format!("cannot open metal:{i} (build with `--features metal` on macOS)")
            })?,
        };
        Ok(device)
    }
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

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(2));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal(0));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }
}
