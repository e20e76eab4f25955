//! Data-parallel gradients on the CPU: a batch is split into shards of at most [`SHARD_ROWS`]
//! rows whose forward and backward passes run side by side on the thread pool, and the
//! shards' gradients are summed, each weighted by its share of the rows.
//!
//! Why: with the whole batch in one graph, every op's parallel loop ends in a join and candle's
//! bookkeeping between ops (gradient buffers, small elementwise ops) runs on one thread; a
//! profile of the default model's two-thread training step (2026-12-03) had the second thread
//! idle about 40% of the step. Shards share nothing but the weights, so each keeps a thread
//! busy, and the kernels' own loops still balance the load between them. The split depends
//! on the batch size only, never on the number of threads, so a run computes the same weights
//! on any machine. On a GPU the batch stays whole: one stream gains nothing from shards.

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use rayon::prelude::*;

/// Rows per shard at most: below ~16 images the small levels' (8×8, 4×4) products get too
/// narrow to run at full speed.
pub const SHARD_ROWS: usize = 16;

/// The shards of a `batch`-row batch: consecutive ranges, as equal as possible.
pub fn shards(batch: usize, device: &Device) -> Vec<Range<usize>> {
    let count = if device.is_cpu() {
        batch.div_ceil(SHARD_ROWS)
    } else {
        1
    };
    crate::threads::split_evenly(batch, count)
}

/// The batch's mean loss and its gradients with respect to `vars`, computed shard by shard:
/// `loss_of(rows)` is the mean loss of those rows of the batch (a scalar). The result equals
/// one backward pass over the whole batch up to the order of summation.
pub fn sharded_backward<F>(
    batch: usize,
    device: &Device,
    vars: &[Var],
    loss_of: F,
) -> Result<(f64, GradStore)>
where
    F: Fn(Range<usize>) -> Result<Tensor> + Sync,
{
    let parts = shards(batch, device)
        .into_par_iter()
        .map(|rows| {
            let share = rows.len() as f64 / batch as f64;
            let loss = loss_of(rows)?;
            let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
            let grads = (loss * share)?.backward()?;
            Ok((value * share, grads))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut parts = parts.into_iter();
    let Some((mut loss, mut total)) = parts.next() else {
        candle_core::bail!("an empty batch has no loss");
    };
    for (part_loss, part) in parts {
        loss += part_loss;
        for var in vars {
            let Some(grad) = part.get(var.as_tensor()) else {
                continue;
            };
            let sum = match total.remove(var.as_tensor()) {
                Some(sum) => (sum + grad)?,
                None => grad.clone(),
            };
            total.insert(var.as_tensor(), sum);
        }
    }
    Ok((loss, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        let cpu = Device::Cpu;
        assert_eq!(shards(1, &cpu), vec![0..1]);
        assert_eq!(shards(16, &cpu), vec![0..16]);
        assert_eq!(shards(17, &cpu), vec![0..9, 9..17]);
        assert_eq!(shards(32, &cpu), vec![0..16, 16..32]);
        assert_eq!(shards(64, &cpu).len(), 4);
    }

    /// The sharded gradients of a mean squared error equal the whole batch's.
    #[test]
    fn sharded_gradients_match_the_whole_batch() -> Result<()> {
        let cpu = Device::Cpu;
        let batch = 37;
        let weight = Var::from_tensor(&Tensor::arange(0f32, 6.0, &cpu)?.reshape((2, 3))?)?;
        let bias = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0], &cpu)?)?;
        let inputs = Tensor::arange(0f32, (batch * 3) as f32, &cpu)?
            .reshape((batch, 3))?
            .sin()?;
        let loss_of = |rows: Range<usize>| -> Result<Tensor> {
            let xs = inputs.narrow(0, rows.start, rows.len())?;
            xs.matmul(&weight.as_tensor().t()?)?
                .broadcast_add(bias.as_tensor())?
                .sqr()?
                .mean_all()
        };
        let vars = [weight.clone(), bias.clone()];
        let (loss, grads) = sharded_backward(batch, &cpu, &vars, loss_of)?;
        assert_eq!(shards(batch, &cpu).len(), 3);
        let whole = loss_of(0..batch)?;
        let expected = whole.backward()?;
        let whole = whole.to_scalar::<f32>()? as f64;
        assert!((loss - whole).abs() < 1e-5 * whole, "{loss} vs {whole}");
        for var in &vars {
            let got = grads.get(var.as_tensor()).expect("gradient");
            let want = expected.get(var.as_tensor()).expect("gradient");
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-5 * scale, "{diff} (scale {scale})");
        }
        Ok(())
    }
}
