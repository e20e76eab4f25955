//! The tensors of a checkpoint file, read as data: safetensors, or a PyTorch zip pickle
//! (`.ckpt`/`.pt`) through candle's pickle reader, which interprets the pickle's opcodes itself
//! and never imports or calls anything the pickle names.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};

use crate::weights_file::WeightsFile;

/// An open checkpoint file.
pub enum TensorSource {
    Safetensors(WeightsFile),
    /// The state dict of a PyTorch pickle, with every tensor's shape.
    Pickle {
        tensors: candle_core::pickle::PthTensors,
        shapes: HashMap<String, Vec<usize>>,
    },
}

/// The first bytes of a zip archive (PyTorch's format since 1.6).
const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

impl TensorSource {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(path)
            .and_then(|file| std::os::unix::fs::FileExt::read_at(&file, &mut magic, 0))
            .with_context(|| format!("cannot read {}", path.display()))?;
        if read == 4 && &magic == ZIP_MAGIC {
            return Self::open_pickle(path);
        }
        if has_pickle_extension(path) {
            bail!(
                "{} is not a zip-format PyTorch checkpoint (PyTorch >= 1.6); ldm reads pickles \
                 as data only in that format, and never runs them: convert the file to \
                 safetensors",
                path.display()
            );
        }
        Ok(Self::Safetensors(WeightsFile::open(path)?))
    }

    /// The state dict under `state_dict` (as Lightning and CompVis save it), else the whole
    /// pickle.
    fn open_pickle(path: &Path) -> anyhow::Result<Self> {
        let read = |key| candle_core::pickle::PthTensors::new(path, key);
        let tensors = match read(Some("state_dict")) {
            Ok(tensors) if !tensors.tensor_infos().is_empty() => tensors,
            _ => read(None)
                .with_context(|| format!("{}: unreadable PyTorch checkpoint", path.display()))?,
        };
        let shapes = tensors
            .tensor_infos()
            .iter()
            .map(|(name, info)| (name.clone(), info.layout.dims().to_vec()))
            .collect();
        Ok(Self::Pickle { tensors, shapes })
    }

    /// The names of the file's tensors.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Self::Safetensors(file) => file.names().collect(),
            Self::Pickle { shapes, .. } => shapes.keys().map(String::as_str).collect(),
        }
    }

    /// A tensor's shape, `None` when the file has no such tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        match self {
            Self::Safetensors(file) => file.shape(name),
            Self::Pickle { shapes, .. } => shapes.get(name).map(Vec::as_slice),
        }
    }

    /// One tensor, in the file's dtype, on the CPU.
    pub fn load(&self, name: &str) -> anyhow::Result<Tensor> {
        match self {
            Self::Safetensors(file) => Ok(file.load(name, &Device::Cpu)?),
            Self::Pickle { tensors, .. } => tensors
                .get(name)?
                .with_context(|| format!("the checkpoint has no tensor {name}")),
        }
    }
}

fn has_pickle_extension(path: &Path) -> bool {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    ["ckpt", "pt", "pth", "bin"].contains(&extension.to_ascii_lowercase().as_str())
}
