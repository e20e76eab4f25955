//! CPU threads: how many, and which pool runs what.
//!
//! ldm's kernels and candle's matrix products run on rayon's global pool. candle 0.11 also
//! runs its elementwise ops (≥ 64 Ki elements) on a second pool of its own, whose idle workers
//! spin and whose caller spins until every worker has finished. Next to rayon's workers that
//! oversubscribes the cores, and a descheduled worker leaves the caller spinning: on the 2-core
//! machine, with other work running, a two-thread training step spent 47% of its CPU time in
//! that wait (4.2× the CPU time of one thread). Those elementwise ops are a few percent of a
//! step, so candle's pool is kept to the calling thread unless `CANDLE_NUM_THREADS` says
//! otherwise.
//!
//! Above the ops, whole passes run side by side where one image's ops are too small to keep
//! the threads busy: the denoising loop's U-Net rows (`pipelines::denoise`) and training's
//! batch shards (`training::data_parallel`).

use anyhow::{bail, Context};

/// Sizes rayon's global pool (`threads`, else `RAYON_NUM_THREADS`, else one per core) and keeps
/// candle's elementwise pool to the calling thread. Call it once, before any tensor work and
/// before other threads start (it sets environment variables that candle reads once).
pub fn configure(threads: Option<usize>) -> anyhow::Result<()> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(threads) = threads {
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        // candle sizes its products' parallelism from this variable, not from the pool.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        pool = pool.num_threads(threads);
    }
    pool.build_global().context("starting the CPU thread pool")
}

/// Runs `work` on one of the pool's threads. The kernels' parallel loops inside it then fork and
/// join by work stealing; called from outside the pool, every loop would wake the pool and put
/// the caller to sleep until it finished (measured on the idle 2-core machine, default model,
/// 100 DDIM steps at 2 threads: 1.2 s -> 0.68 s, and system time 0.8 s -> 0.3 s).
pub fn in_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

/// `0..len` as `parts` consecutive ranges whose lengths differ by at most one (the first ones
/// longer); fewer when `len < parts`, none when `len` is 0.
pub fn split_evenly(len: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, len.max(1));
    let (base, extra) = (len / parts, len % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let rows = base + usize::from(i < extra);
            start += rows;
            start - rows..start
        })
        .filter(|range| !range.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_evenly_covers_the_range_in_order() {
        assert!(split_evenly(0, 2).is_empty());
        assert_eq!(split_evenly(1, 2), vec![0..1]);
        assert_eq!(split_evenly(2, 2), vec![0..1, 1..2]);
        assert_eq!(split_evenly(7, 1), vec![0..7]);
        assert_eq!(split_evenly(17, 2), vec![0..9, 9..17]);
        assert_eq!(split_evenly(50, 4), vec![0..13, 13..26, 26..38, 38..50]);
    }
}
