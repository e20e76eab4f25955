//! Atomic training checkpoints: weights, optimizer moments, EMA, RNG and position, in
//! `OUT/checkpoint/`.
//!
//! A checkpoint is written whole into a fresh temporary folder (`OUT/.checkpoint-tmp-*`, every
//! file synced, `state.json` last), then swapped in by renames: the old `checkpoint/` becomes
//! `checkpoint.previous/`, the new folder becomes `checkpoint/`, and the previous one is removed.
//! A kill at any moment therefore leaves a complete checkpoint: `checkpoint/`, or — killed
//! between the two renames — `checkpoint.previous/`, which loading falls back to. Leftover
//! temporary folders are ignored by loading and removed by the next save.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::data::DataCursor;
use super::optim::{AdamW, Ema};
use crate::durable::{self, remove_dir_if_present, rename};
use crate::rng::TorchGenerator;

pub const CHECKPOINT_DIR: &str = "checkpoint";
const PREVIOUS_DIR: &str = "checkpoint.previous";
const TEMP_PREFIX: &str = ".checkpoint-tmp-";
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const EMA_FILE: &str = "ema.safetensors";
const STATE_FILE: &str = "state.json";

/// Where a run stands, beyond its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer updates completed.
    pub step: usize,
    pub epoch: usize,
    /// Images of `epoch` already consumed.
    pub position_in_epoch: usize,
    /// The noise generator's state (`TorchGenerator::state`), hex in the JSON.
    #[serde(with = "hex_bytes")]
    pub rng: Vec<u8>,
    /// Loop-specific settings a resume must agree with (model config, seed, batch size ...).
    pub extra: Value,
}

impl TrainState {
    /// A run at `step`, at `cursor` in its data, with `generator` as it stands.
    pub fn new(step: usize, cursor: DataCursor, generator: &TorchGenerator, extra: &Value) -> Self {
        Self {
            step,
            epoch: cursor.epoch,
            position_in_epoch: cursor.position_in_epoch,
            rng: generator.state(),
            extra: extra.clone(),
        }
    }

    /// Where the run is in its data.
    pub fn cursor(&self) -> DataCursor {
        DataCursor {
            epoch: self.epoch,
            position_in_epoch: self.position_in_epoch,
        }
    }
}

/// `state.json`: the run's state plus the counters of the optimizer and EMA.
#[derive(Serialize, Deserialize)]
struct StateFile {
    train: TrainState,
    optimizer_step: usize,
    ema_updates: Option<usize>,
}

/// Whether `out_dir` holds a checkpoint that `load_checkpoint` would read.
pub fn has_checkpoint(out_dir: &Path) -> bool {
    complete_checkpoint(out_dir).is_some()
}

fn complete_checkpoint(out_dir: &Path) -> Option<PathBuf> {
    [CHECKPOINT_DIR, PREVIOUS_DIR]
        .into_iter()
        .map(|name| out_dir.join(name))
        .find(|dir| dir.join(STATE_FILE).is_file())
}

pub fn save_checkpoint(
    out_dir: &Path,
    vars: &VarMap,
    optim: &AdamW,
    ema: Option<&Ema>,
    state: &TrainState,
) -> anyhow::Result<()> {
    let temp = durable::staging_dir(out_dir, TEMP_PREFIX)?;
    write_tensors(&temp.path().join(MODEL_FILE), &super::var_tensors(vars))?;
    write_tensors(&temp.path().join(OPTIMIZER_FILE), &optim.state_tensors())?;
    if let Some(ema) = ema {
        write_tensors(&temp.path().join(EMA_FILE), &ema.tensors())?;
    }
    let state_file = StateFile {
        train: state.clone(),
        optimizer_step: optim.step_count(),
        ema_updates: ema.map(Ema::updates),
    };
    durable::write_synced(
        &temp.path().join(STATE_FILE),
        serde_json::to_string_pretty(&state_file)?.as_bytes(),
    )?;
    durable::sync_dir(temp.path())?;
    swap_in(out_dir, temp.keep())
}

/// Replaces `checkpoint/` with the complete folder `fresh`, never leaving neither.
fn swap_in(out_dir: &Path, fresh: PathBuf) -> anyhow::Result<()> {
    let current = out_dir.join(CHECKPOINT_DIR);
    let previous = out_dir.join(PREVIOUS_DIR);
    if current.join(STATE_FILE).is_file() {
        remove_dir_if_present(&previous)?;
        rename(&current, &previous)?;
    } else {
        // A partial `checkpoint/` (not ours, or a crash from an older layout) is never kept.
        remove_dir_if_present(&current)?;
    }
    rename(&fresh, &current)?;
    durable::sync_dir(out_dir)?;
    remove_dir_if_present(&previous)
}

/// Refuses an output folder that does not fit `resume`: a checkpoint there is only continued
/// on request, and a resume needs one.
pub fn check_output(out_dir: &Path, resume: bool) -> anyhow::Result<()> {
    match (has_checkpoint(out_dir), resume) {
        (true, false) => anyhow::bail!(
            "{} already holds a training checkpoint: pass --resume to continue it, or choose another --output",
            out_dir.display()
        ),
        (false, true) => anyhow::bail!("--resume: no checkpoint in {}", out_dir.display()),
        _ => Ok(()),
    }
}

/// Where a run starts: step 0 with the noise generator of `seed`, or, with `resume`, the
/// checkpoint of `out_dir` (loaded into `vars`, `optim` and `ema`), which must have been written
/// by a run with the same `identity` (see [`check_same_run`]).
pub fn start(
    out_dir: &Path,
    resume: bool,
    seed: u64,
    identity: &Value,
    vars: &VarMap,
    optim: &mut AdamW,
    ema: Option<&mut Ema>,
) -> anyhow::Result<TrainState> {
    if !resume {
        let generator = TorchGenerator::new(seed);
        return Ok(TrainState::new(
            0,
            DataCursor::default(),
            &generator,
            identity,
        ));
    }
    let state = load_checkpoint(out_dir, vars, optim, ema)?;
    check_same_run(&state.extra, identity, out_dir)?;
    Ok(state)
}

/// Loads the last complete checkpoint of `out_dir` into `vars`, `optim` and `ema` (whose
/// variables must match by name and shape).
pub fn load_checkpoint(
    out_dir: &Path,
    vars: &VarMap,
    optim: &mut AdamW,
    ema: Option<&mut Ema>,
) -> anyhow::Result<TrainState> {
    let dir = complete_checkpoint(out_dir)
        .with_context(|| format!("no checkpoint in {}", out_dir.display()))?;
    let state_path = dir.join(STATE_FILE);
    let state: StateFile = crate::config::read_json(&state_path)?;
    let device = first_var_device(vars);
    let weights = read_tensors(&dir.join(MODEL_FILE), &device)?;
    set_vars(vars, &weights).with_context(|| format!("in {}", dir.display()))?;
    let moments = read_tensors(&dir.join(OPTIMIZER_FILE), &device)?;
    optim
        .load_state(&moments, state.optimizer_step)
        .with_context(|| format!("in {}", dir.join(OPTIMIZER_FILE).display()))?;
    if let Some(ema) = ema {
        let path = dir.join(EMA_FILE);
        anyhow::ensure!(
            path.is_file(),
            "{} has no EMA weights (the run was started without EMA)",
            dir.display()
        );
        ema.load(&read_tensors(&path, &device)?)
            .with_context(|| format!("in {}", path.display()))?;
        ema.set_updates(state.ema_updates.unwrap_or(state.optimizer_step));
    }
    Ok(state.train)
}

/// Refuses to resume the run in `out_dir` when `current` (a JSON object of the settings a
/// resume must keep: model config, seed, batch size, data size ...) differs from what its
/// checkpoint recorded, listing every difference.
pub fn check_same_run(saved: &Value, current: &Value, out_dir: &Path) -> anyhow::Result<()> {
    let Value::Object(current) = current else {
        anyhow::bail!("run settings must be a JSON object");
    };
    let differing: Vec<String> = current
        .iter()
        .filter_map(|(key, value)| {
            let before = saved.get(key).unwrap_or(&Value::Null);
            (before != value).then(|| format!("{key}: checkpoint {before}, now {value}"))
        })
        .collect();
    anyhow::ensure!(
        differing.is_empty(),
        "cannot resume the run in {}: resume with the settings and data it started with; these differ:\n  {}",
        out_dir.display(),
        differing.join("\n  ")
    );
    Ok(())
}

/// Sets every variable from `weights`, which must name exactly the same variables and shapes
/// (a checkpoint's, or a pretrained model's to start from).
pub fn set_vars(vars: &VarMap, weights: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    let vars = vars.data().lock().unwrap();
    anyhow::ensure!(
        vars.len() == weights.len(),
        "the weights have {} tensors, the model {} variables",
        weights.len(),
        vars.len()
    );
    for (name, var) in vars.iter() {
        let saved = weights
            .get(name)
            .with_context(|| format!("the weights lack {name}"))?;
        anyhow::ensure!(
            saved.shape() == var.shape(),
            "{name}: saved shape {:?}, model shape {:?}",
            saved.shape(),
            var.shape()
        );
        var.set(&saved.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn first_var_device(vars: &VarMap) -> Device {
    vars.data()
        .lock()
        .unwrap()
        .values()
        .next()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu)
}

/// Writes `tensors` as safetensors through a synced temporary file renamed over `path`, so
/// readers never see a partial file (exported model weights).
pub fn save_tensors_atomically(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    durable::write_atomically_with(path, |temp| write_tensors(temp, tensors))
}

fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    candle_core::safetensors::save(tensors, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    durable::sync_file(path)
}

fn read_tensors(path: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read {}", path.display()))
}

/// Bytes as a lowercase hex string in JSON.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&crate::hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let hex = String::deserialize(deserializer)?;
        crate::hex::decode(&hex).ok_or_else(|| serde::de::Error::custom("not a hex string"))
    }
}
