//! Model weights from a safetensors file, into a candle `VarBuilder`.
//!
//! Tensors are buffers over the file's mapped pages where the binary installs
//! [`crate::mapped_memory::MappingAwareAllocator`] (no copy: loading costs page-table entries),
//! else read tensor by tensor in parallel. candle's own memory-mapped reader copies every tensor
//! out of the mapping, and the pages it touched stay resident until the whole builder is
//! dropped: SD 1.5's 3.4 GB U-Net counted twice in the peak RSS. Either way here the process
//! holds the weights once.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::Deserialize;

use crate::mapped_memory::MappedFile;

/// One tensor's entry in the safetensors header.
#[derive(Debug, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// An open safetensors file and its parsed header.
pub struct WeightsFile {
    path: PathBuf,
    file: File,
    /// Start of the data section (after the 8-byte length and the JSON header).
    data_start: u64,
    entries: HashMap<String, Entry>,
    /// The whole file mapped, when tensors can be buffers over its pages.
    mapped: Option<MappedFile>,
}

impl WeightsFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_len = file.metadata()?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact_at(&mut len_bytes, 0)
            .with_context(|| format!("{}: too short for a safetensors file", path.display()))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > file_len.saturating_sub(8) {
            bail!(
                "{}: not a safetensors file (header length {header_len})",
                path.display()
            );
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)?;
        let mut raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .with_context(|| format!("{}: unreadable safetensors header", path.display()))?;
        raw.remove("__metadata__");
        let data_start = 8 + header_len;
        let mut entries = HashMap::with_capacity(raw.len());
        for (name, value) in raw {
            let entry: Entry = serde_json::from_value(value)
                .with_context(|| format!("{}: malformed header entry {name}", path.display()))?;
            if data_start + entry.data_offsets.1 > file_len
                || entry.data_offsets.0 > entry.data_offsets.1
            {
                bail!(
                    "{}: tensor {name} lies outside the file (truncated download?)",
                    path.display()
                );
            }
            entries.insert(name, entry);
        }
        let mapped = MappedFile::map(&file, file_len as usize);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
            entries,
            mapped,
        })
    }

    /// A `VarBuilder` over every tensor of the file, converted to `dtype`. The tensors are
    /// read in parallel up front: reading is dominated by page-faulting the fresh buffers in,
    /// which one thread did at a fraction of the machine's speed.
    pub fn into_var_builder(
        self,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<VarBuilder<'static>> {
        self.into_var_builder_where(dtype, device, |_| true)
    }

    /// [`Self::into_var_builder`] over the tensors whose names `keep` selects.
    pub fn into_var_builder_where(
        self,
        dtype: DType,
        device: &Device,
        keep: impl Fn(&str) -> bool + Sync,
    ) -> candle_core::Result<VarBuilder<'static>> {
        let tensors = self
            .entries
            .par_iter()
            .filter(|(name, _)| keep(name))
            .map(|(name, _)| Ok((name.clone(), self.load(name, device)?.to_dtype(dtype)?)))
            .collect::<candle_core::Result<HashMap<String, Tensor>>>()?;
        Ok(VarBuilder::from_tensors(tensors, dtype, device))
    }

    /// The names of the file's tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// A tensor's shape, `None` when the file has no such tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|entry| entry.shape.as_slice())
    }

    /// One tensor, in the file's dtype.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let Some(entry) = self.entries.get(name) else {
            return Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt());
        };
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "U32" => DType::U32,
            "U8" => DType::U8,
            other => candle_core::bail!(
                "{}: tensor {name} has unsupported dtype {other}",
                self.path.display()
            ),
        };
        let (start, end) = entry.data_offsets;
        let shape = Shape::from(entry.shape.clone());
        if (end - start) as usize != shape.elem_count() * dtype.size_in_bytes() {
            candle_core::bail!(
                "{}: tensor {name} has {} bytes for shape {shape:?}",
                self.path.display(),
                end - start
            );
        }
        let offset = self.data_start + start;
        let mapped = self.mapped.as_ref().map(|file| (file, offset as usize));
        let read = |bytes: &mut [u8]| {
            self.file.read_exact_at(bytes, offset).map_err(|err| {
                candle_core::Error::Msg(format!("{}: reading {name}: {err}", self.path.display()))
            })
        };
        match dtype {
            DType::F32 => read_vec::<f32>(shape, device, mapped, read),
            DType::F16 => read_vec::<half::f16>(shape, device, mapped, read),
            DType::BF16 => read_vec::<half::bf16>(shape, device, mapped, read),
            DType::F64 => read_vec::<f64>(shape, device, mapped, read),
            DType::I64 => read_vec::<i64>(shape, device, mapped, read),
            DType::U32 => read_vec::<u32>(shape, device, mapped, read),
            _ => read_vec::<u8>(shape, device, mapped, read),
        }
    }
}

/// A tensor over the mapped file's pages at `mapped`'s offset when it can be, else its
/// little-endian bytes read straight into its final buffer (no zero-fill, no second copy:
/// loading was otherwise dominated by memset and memmove of gigabytes).
fn read_vec<T: candle_core::WithDType + Copy>(
    shape: Shape,
    device: &Device,
    mapped: Option<(&MappedFile, usize)>,
    read: impl FnOnce(&mut [u8]) -> candle_core::Result<()>,
) -> candle_core::Result<Tensor> {
    const {
        assert!(
            cfg!(target_endian = "little"),
            "safetensors data is little-endian"
        )
    };
    let count = shape.elem_count();
    if let Some(values) = mapped.and_then(|(file, offset)| file.vec::<T>(offset, count)) {
        return Tensor::from_vec(values, shape, device);
    }
    let mut values: Vec<T> = Vec::with_capacity(count);
    // SAFETY: the spare capacity holds `count` elements of plain-old-data type T (floats and
    // integers: every bit pattern is valid); `read` fills all of its bytes before `set_len`.
    unsafe {
        let bytes = std::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<u8>(),
            count * std::mem::size_of::<T>(),
        );
        read(bytes)?;
        values.set_len(count);
    }
    Tensor::from_vec(values, shape, device)
}
