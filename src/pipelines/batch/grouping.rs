//! Jobs grouped into batched forward passes: what jobs must share to run together, and the
//! batches of a run in file order.

use super::Job;
use crate::pipelines::Mode;

/// What must be equal for jobs to share one batched forward pass (prompts, negative prompts,
/// seeds and input images may differ).
#[derive(PartialEq)]
struct BatchShape<'a> {
    width: usize,
    height: usize,
    steps: usize,
    guidance_scale: u64,
    guidance_rescale: u64,
    eta: u64,
    scheduler: &'a str,
    model: &'a str,
    strength: Option<u64>,
    mode: Mode,
    clip_skip: usize,
    loras: &'a [String],
}

impl<'a> BatchShape<'a> {
    fn of(job: &'a Job) -> Self {
        Self {
            width: job.width,
            height: job.height,
            steps: job.steps,
            guidance_scale: job.guidance_scale.to_bits(),
            guidance_rescale: job.guidance_rescale.to_bits(),
            eta: job.eta.to_bits(),
            scheduler: &job.scheduler,
            model: &job.model,
            strength: job.strength.map(f64::to_bits),
            mode: job.mode(),
            clip_skip: job.clip_skip,
            loras: &job.loras,
        }
    }
}

/// Splits `jobs` into batches of positions in `jobs`: each batch holds jobs of one shape, at
/// most `batch_size` of them, in file order; batches are ordered by their first job, so work
/// follows the file as closely as batching allows. A batch size of 0 is an error.
pub fn group_for_batching(jobs: &[Job], batch_size: usize) -> anyhow::Result<Vec<Vec<usize>>> {
    anyhow::ensure!(batch_size > 0, "the batch size must be at least 1");
    let mut groups: Vec<(BatchShape, Vec<usize>)> = Vec::new();
    for (position, job) in jobs.iter().enumerate() {
        let shape = BatchShape::of(job);
        match groups.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, members)) => members.push(position),
            None => groups.push((shape, vec![position])),
        }
    }
    let mut batches: Vec<Vec<usize>> = groups
        .into_iter()
        .flat_map(|(_, members)| {
            members
                .chunks(batch_size)
                .map(<[usize]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect();
    batches.sort_by_key(|batch| batch[0]);
    Ok(batches)
}
