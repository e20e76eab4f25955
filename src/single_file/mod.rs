//! Single-file checkpoints: the original CompVis / A1111 layout of a whole SD 1.x/2.x pipeline
//! in one `.safetensors` (or zip-pickle `.ckpt`) file: `model.diffusion_model.*` (U-Net),
//! `first_stage_model.*` (VAE), `cond_stage_model.*` (text encoder).
//!
//! A [`Checkpoint`] recognises what the file holds from its tensors' names and shapes (as
//! diffusers' `infer_diffusers_model_type` does) and yields each component's tensors under
//! diffusers' names (splitting OpenCLIP's fused q/k/v, reshaping the VAE's 1x1-convolution
//! attention), so the models are built by the same code as from a diffusers folder. The
//! tokenizer, and the configs where it has them, come from a diffusers folder (see
//! `model_source`); the component configs it lacks are inferred from the tensors (`infer`).

mod architecture;
mod clip_names;
mod infer;
mod source;
mod unet_names;
mod vae_names;

pub use architecture::{Architecture, TextEncoderKind};
pub use source::TensorSource;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rayon::prelude::*;

use architecture::recognise;
use clip_names::{CLIP_PREFIX, OPEN_CLIP_PREFIX};

/// The prefix of the U-Net's tensors.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// The prefix of the VAE's tensors.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// The prefix of the U-Net's EMA copy, whose names are flattened (`model_ema.` + the name
/// after `model.` with its dots removed).
const EMA_PREFIX: &str = "model_ema.";
/// diffusers reads the EMA weights only from a file holding more than this many.
const EMA_MIN_TENSORS: usize = 100;

/// Which part of a checkpoint tensor a diffusers tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    Whole,
    /// A 1x1 convolution kernel `[out, in, 1, 1]` read as a linear weight `[out, in]`.
    ConvAsLinear,
    /// Third `i` along the first axis (q, k, v of a fused projection).
    Third(usize),
}

/// One diffusers tensor of a component and where it lies in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    pub target: String,
    pub source: String,
    pub transform: Transform,
}

/// An open single-file checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    source: TensorSource,
    architecture: Architecture,
}

impl Checkpoint {
    /// Opens `path` and recognises its architecture; anything but an SD 1.x/2.x checkpoint is
    /// a clear error.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let source = TensorSource::open(path)?;
        let architecture = recognise(&source)
            .with_context(|| format!("{} is not an SD 1.x/2.x checkpoint", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            source,
            architecture,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    /// The U-Net's tensors (its `layers_per_block` numbers the original's blocks): the
    /// `model.diffusion_model.*` weights, or with `extract_ema` their EMA copy, as diffusers'
    /// `extract_ema` reads it.
    pub fn unet(&self, layers_per_block: usize, extract_ema: bool) -> anyhow::Result<Vec<Renamed>> {
        let names = self.source.names();
        if extract_ema {
            let ema = names.iter().filter(|n| n.starts_with(EMA_PREFIX)).count();
            if ema <= EMA_MIN_TENSORS {
                bail!(
                    "{}: --extract-ema, but the checkpoint holds no EMA weights ({ema} {EMA_PREFIX}* \
                     tensors)",
                    self.path.display()
                );
            }
        }
        let mut renamed = Vec::new();
        for name in names {
            let Some(rest) = name.strip_prefix(UNET_PREFIX) else {
                continue;
            };
            let Some(target) = unet_names::diffusers_name(rest, layers_per_block) else {
                continue;
            };
            let source = if extract_ema {
                let flat: String = format!("diffusion_model.{rest}").replace('.', "");
                let ema = format!("{EMA_PREFIX}{flat}");
                if self.source.shape(&ema).is_none() {
                    bail!(
                        "{}: --extract-ema, but {name} has no EMA copy {ema}",
                        self.path.display()
                    );
                }
                ema
            } else {
                name.to_string()
            };
            renamed.push(Renamed {
                target,
                source,
                transform: Transform::Whole,
            });
        }
        Ok(renamed)
    }

    /// The VAE's tensors (`up_blocks`: its number of decoder levels).
    pub fn vae(&self, up_blocks: usize) -> Vec<Renamed> {
        self.source
            .names()
            .into_iter()
            .filter_map(|name| {
                let rest = name.strip_prefix(VAE_PREFIX)?;
                let (target, conv) = vae_names::diffusers_name(rest, up_blocks)?;
                Some(Renamed {
                    target,
                    source: name.to_string(),
                    transform: if conv {
                        Transform::ConvAsLinear
                    } else {
                        Transform::Whole
                    },
                })
            })
            .collect()
    }

    /// The text encoder's tensors, under transformers' `text_model.*` names.
    pub fn text_encoder(&self) -> Vec<Renamed> {
        let mut renamed = Vec::new();
        for name in self.source.names() {
            match self.architecture.text_encoder {
                TextEncoderKind::Clip => {
                    let Some(target) = name
                        .strip_prefix(CLIP_PREFIX)
                        .and_then(clip_names::clip_name)
                    else {
                        continue;
                    };
                    renamed.push(Renamed {
                        target,
                        source: name.to_string(),
                        transform: Transform::Whole,
                    });
                }
                TextEncoderKind::OpenClip => {
                    let Some(rest) = name.strip_prefix(OPEN_CLIP_PREFIX) else {
                        continue;
                    };
                    for (target, transform) in clip_names::open_clip_names(rest) {
                        renamed.push(Renamed {
                            target,
                            source: name.to_string(),
                            transform,
                        });
                    }
                }
            }
        }
        renamed
    }

    /// The tensors of `renamed` whose diffusers names `keep` selects, read in parallel, in
    /// the file's dtype.
    pub fn load(
        &self,
        renamed: &[Renamed],
        keep: impl Fn(&str) -> bool + Sync,
    ) -> anyhow::Result<HashMap<String, Tensor>> {
        renamed
            .par_iter()
            .filter(|r| keep(&r.target))
            .map(|r| {
                let tensor = self
                    .source
                    .load(&r.source)
                    .and_then(|t| apply(t, r.transform))
                    .with_context(|| {
                        format!("{}: cannot read {}", self.path.display(), r.source)
                    })?;
                Ok((r.target.clone(), tensor))
            })
            .collect()
    }
}

/// A tensor's part named by `transform`.
fn apply(tensor: Tensor, transform: Transform) -> anyhow::Result<Tensor> {
    Ok(match transform {
        Transform::Whole => tensor,
        Transform::ConvAsLinear => match tensor.dims() {
            [out, inp, 1, 1] | [out, inp, 1] => tensor.reshape((*out, *inp))?,
            _ => tensor,
        },
        Transform::Third(i) => {
            let rows = tensor.dim(0)?;
            if rows % 3 != 0 {
                bail!("a fused q/k/v projection with {rows} rows (not a multiple of 3)");
            }
            tensor.narrow(0, i * rows / 3, rows / 3)?.contiguous()?
        }
    })
}

/// A `VarBuilder` over a component's renamed tensors whose errors say that the checkpoint
/// lacks a tensor, or holds it in another shape than the config asks for.
pub fn var_builder(
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(ComponentTensors(tensors)), dtype, device.clone())
}

/// A component's tensors under diffusers' names.
struct ComponentTensors(HashMap<String, Tensor>);

impl SimpleBackend for ComponentTensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "the checkpoint's {name} (diffusers' name) is {:?}, but the config asks for {:?} \
                 (a config of another model?)",
                tensor.dims(),
                shape.dims()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(tensor) = self.0.get(name) else {
            candle_core::bail!("the checkpoint lacks {name} (diffusers' name)");
        };
        tensor.to_device(device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}
