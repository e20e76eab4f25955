//! AdamW (torch.optim.AdamW semantics) with named, saveable state; linear warm-up; global-norm
//! gradient clipping; an exponential moving average of the weights.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

use crate::kernels::optimizer::{adamw_update, ema_update, sum_squares, AdamWUpdate};
use crate::models::nn::internal_dtype;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The moment estimates of one variable, in f32 for half-precision variables (else their dtype).
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW as `torch.optim.AdamW` computes it, for update `t` (1-based) with gradient `g`:
///
/// ```text
/// θ ← θ · (1 − lr · weight_decay)                  decoupled weight decay
/// m ← β1 · m + (1 − β1) · g
/// v ← β2 · v + (1 − β2) · g²
/// θ ← θ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
/// ```
///
/// Variables without a gradient in a step are left untouched (as torch skips `grad is None`).
/// Its state is keyed by variable name, so a checkpoint loads into a freshly built model.
pub struct AdamW {
    vars: BTreeMap<String, Var>,
    moments: HashMap<String, Moments>,
    config: AdamWConfig,
    step: usize,
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";

impl AdamW {
    pub fn new(vars: &VarMap, cfg: AdamWConfig) -> Result<Self> {
        Ok(Self {
            vars: named_vars(vars),
            moments: HashMap::new(),
            config: cfg,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// How many updates have been applied (torch's `state["step"]`).
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr` (the config's `lr` is the base rate for schedules).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let cfg = self.config;
        let update = AdamWUpdate {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            decay: 1.0 - lr * cfg.weight_decay,
            step_size: lr / (1.0 - cfg.beta1.powi(t)),
            inv_bias_correction2_sqrt: 1.0 / (1.0 - cfg.beta2.powi(t)).sqrt(),
        };
        for (name, var) in &self.vars {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: candle's backward does not detach the gradients of variables, and a
            // weight fed straight into an op (a conv kernel) gets one that references the
            // step's forward graph; the moments would chain those graphs from step to step.
            let grad = grad.to_dtype(internal_dtype(var.dtype()))?.detach();
            let moments = match self.moments.remove(name) {
                Some(m) => m,
                None => Moments {
                    exp_avg: grad.zeros_like()?,
                    exp_avg_sq: grad.zeros_like()?,
                },
            };
            let (updated, exp_avg, exp_avg_sq) = adamw_update(
                var.as_tensor(),
                &grad,
                &moments.exp_avg,
                &moments.exp_avg_sq,
                &update,
            )?;
            var.set(&updated)?;
            self.moments.insert(
                name.clone(),
                Moments {
                    exp_avg,
                    exp_avg_sq,
                },
            );
        }
        Ok(())
    }

    /// `<var>.exp_avg` and `<var>.exp_avg_sq` for every variable updated so far.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        self.moments
            .iter()
            .flat_map(|(name, m)| {
                [
                    (format!("{name}.{EXP_AVG}"), m.exp_avg.clone()),
                    (format!("{name}.{EXP_AVG_SQ}"), m.exp_avg_sq.clone()),
                ]
            })
            .collect()
    }

    /// Restores what `state_tensors` returned after `step` updates. Every tensor must belong to
    /// a variable of this optimizer with that variable's shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let mut moments = HashMap::new();
        for (name, var) in &self.vars {
            let exp_avg = tensors.get(&format!("{name}.{EXP_AVG}"));
            let exp_avg_sq = tensors.get(&format!("{name}.{EXP_AVG_SQ}"));
            let (exp_avg, exp_avg_sq) = match (exp_avg, exp_avg_sq) {
                (Some(a), Some(b)) => (a, b),
                (None, None) => continue,
                _ => candle_core::bail!("optimizer state for {name} is incomplete"),
            };
            for tensor in [exp_avg, exp_avg_sq] {
                if tensor.shape() != var.shape() {
                    candle_core::bail!(
                        "optimizer state for {name} has shape {:?}, the variable {:?}",
                        tensor.shape(),
                        var.shape()
                    );
                }
            }
            let dtype = internal_dtype(var.dtype());
            let restore = |t: &Tensor| t.to_dtype(dtype)?.to_device(var.device());
            moments.insert(
                name.clone(),
                Moments {
                    exp_avg: restore(exp_avg)?,
                    exp_avg_sq: restore(exp_avg_sq)?,
                },
            );
        }
        if let Some(unknown) = tensors.keys().find(|key| {
            !key.rsplit_once('.')
                .is_some_and(|(var, _)| moments.contains_key(var))
        }) {
            candle_core::bail!("optimizer state {unknown} belongs to no variable of this model");
        }
        self.moments = moments;
        self.step = step;
        Ok(())
    }
}

fn named_vars(vars: &VarMap) -> BTreeMap<String, Var> {
    vars.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect()
}

/// The learning rate for update `step` (0-based: updates already applied): linear warm-up
/// `base · (step + 1) / warmup_steps` over the first `warmup_steps` updates, then constant.
/// (transformers' `get_constant_schedule_with_warmup` is the same ramp shifted by one update:
/// it starts at 0.)
pub fn warmup_lr(step: usize, base_lr: f64, warmup_steps: usize) -> f64 {
    if step >= warmup_steps {
        base_lr
    } else {
        base_lr * (step + 1) as f64 / warmup_steps as f64
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does: factor `min(1, max_norm / (norm + 1e-6))`, applied
/// on the device without reading anything back (a factor of 1 leaves the gradients exact).
/// Returns the norm before clipping, for reading once the update has been queued.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &VarMap, max_norm: f64) -> Result<GradNorm> {
    let vars = named_vars(vars);
    let squares = vars
        .values()
        .filter_map(|var| grads.get(var.as_tensor()))
        .map(sum_squares)
        .collect::<Result<Vec<_>>>()?;
    if squares.is_empty() {
        return Ok(GradNorm(None));
    }
    let norm = Tensor::stack(&squares, 0)?.sum_all()?.sqrt()?;
    let factor = ((&norm + 1e-6)?.recip()? * max_norm)?;
    let factor = factor.minimum(&factor.ones_like()?)?;
    for var in vars.values() {
        if let Some(g) = grads.remove(var.as_tensor()) {
            let clipped = g.broadcast_mul(&factor.to_dtype(g.dtype())?)?;
            grads.insert(var.as_tensor(), clipped);
        }
    }
    Ok(GradNorm(Some(norm)))
}

/// The global gradient norm [`clip_grad_norm`] found, still on the device.
pub struct GradNorm(Option<Tensor>);

impl GradNorm {
    /// The norm (0 without gradients); reading it waits for the device.
    pub fn value(&self) -> Result<f64> {
        match &self.0 {
            Some(norm) => Ok(norm.to_scalar::<f32>()? as f64),
            None => Ok(0.0),
        }
    }
}

/// An exponential moving average of the weights, as diffusers' `EMAModel` keeps it: after
/// update `t` (1-based), `shadow ← d · shadow + (1 − d) · θ` with
/// `d = min(decay, (1 + t) / (10 + t))`, so early updates are not dominated by the initial
/// weights. The shadow is keyed by variable name, in f32 for half-precision variables.
pub struct Ema {
    decay: f64,
    updates: usize,
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    pub fn new(vars: &VarMap, decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            candle_core::bail!("EMA decay must be in [0, 1), got {decay}");
        }
        let shadow = named_vars(vars)
            .into_iter()
            .map(|(name, var)| {
                let dtype = internal_dtype(var.dtype());
                Ok((name, var.as_tensor().to_dtype(dtype)?.copy()?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            decay,
            updates: 0,
            shadow,
        })
    }

    /// The decay the next update will use.
    pub fn current_decay(&self) -> f64 {
        let t = (self.updates + 1) as f64;
        self.decay.min((1.0 + t) / (10.0 + t))
    }

    pub fn update(&mut self, vars: &VarMap) -> Result<()> {
        let d = self.current_decay();
        for (name, var) in named_vars(vars) {
            let Some(shadow) = self.shadow.get_mut(&name) else {
                candle_core::bail!("variable {name} has no EMA shadow");
            };
            let current = var.as_tensor().to_dtype(shadow.dtype())?;
            // Detached: otherwise each shadow would keep the previous one alive through the
            // autograd graph (the variable is tracked), growing memory every update.
            *shadow = ema_update(shadow, &current, d)?.detach();
        }
        self.updates += 1;
        Ok(())
    }

    /// How many updates the average has seen (restored with `set_updates` on resume).
    pub fn updates(&self) -> usize {
        self.updates
    }

    pub fn set_updates(&mut self, updates: usize) {
        self.updates = updates;
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.shadow
            .iter()
            .map(|(name, t)| (name.clone(), t.clone()))
            .collect()
    }

    /// Replaces the shadow with saved tensors, which must cover exactly the same variables.
    pub fn load(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        if tensors.len() != self.shadow.len() {
            candle_core::bail!(
                "EMA state has {} tensors, the model {} variables",
                tensors.len(),
                self.shadow.len()
            );
        }
        for (name, shadow) in self.shadow.iter_mut() {
            let Some(saved) = tensors.get(name) else {
                candle_core::bail!("EMA state lacks {name}");
            };
            if saved.shape() != shadow.shape() {
                candle_core::bail!(
                    "EMA state for {name} has shape {:?}, the variable {:?}",
                    saved.shape(),
                    shadow.shape()
                );
            }
            *shadow = saved.to_dtype(shadow.dtype())?.to_device(shadow.device())?;
        }
        Ok(())
    }
}
