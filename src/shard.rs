//! Batch files split across workers: `--shard I/N`, a Slurm job array
//! (`SLURM_ARRAY_TASK_ID`/`SLURM_ARRAY_TASK_COUNT`) or a Kubernetes indexed Job
//! (`JOB_COMPLETION_INDEX` with `--shard-count N`).
//!
//! A shard takes whole forward-pass batches (`group_for_batching` over the whole file, as one
//! worker would form them), batch `b` going to shard `b % N`: the shares are disjoint, cover the
//! file, and every image is made in the same batch as a single worker makes it, so its bytes are
//! the same. Each shard records its images in its own manifest, and every run reads them all.

use std::fmt;

use anyhow::{bail, ensure, Context};

use crate::pipelines::batch::{group_for_batching, Job};

/// Shard `index` (from 0) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// Where a shard came from, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSource {
    Flag,
    Slurm,
    Kubernetes,
}

impl Shard {
    pub fn new(index: usize, count: usize) -> anyhow::Result<Self> {
        ensure!(count > 0, "the shard count must be at least 1");
        ensure!(
            index < count,
            "shard index {index} is out of range: with {count} shards, indices run from 0 to {}",
            count - 1
        );
        Ok(Self { index, count })
    }

    /// `I/N`, `I` from 0.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let (index, count) = text
            .split_once('/')
            .with_context(|| format!("--shard {text:?}: expected I/N, e.g. 0/4"))?;
        let number = |part: &str| {
            part.trim()
                .parse::<usize>()
                .with_context(|| format!("--shard {text:?}: {part:?} is not a whole number"))
        };
        // One line (clap shows only the top of an error chain).
        Self::new(number(index)?, number(count)?)
            .map_err(|error| anyhow::anyhow!("--shard {text:?}: {error}"))
    }

    /// The shard `--shard` gives, else the scheduler's environment (`var` reads it), else none.
    pub fn resolve(
        flag: Option<Shard>,
        shard_count: Option<usize>,
        var: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<(Self, ShardSource)>> {
        if let Some(shard) = flag {
            ensure!(
                shard_count.is_none(),
                "--shard-count goes with JOB_COMPLETION_INDEX, not with --shard I/N"
            );
            return Ok(Some((shard, ShardSource::Flag)));
        }
        let number = |name: &str| -> anyhow::Result<Option<usize>> {
            var(name)
                .map(|value| {
                    value
                        .trim()
                        .parse::<usize>()
                        .with_context(|| format!("{name}={value:?} is not a whole number"))
                })
                .transpose()
        };
        if let (Some(id), Some(count)) = (
            number("SLURM_ARRAY_TASK_ID")?,
            number("SLURM_ARRAY_TASK_COUNT")?,
        ) {
            // Arrays may start anywhere (--array=1-4): count from the array's first id.
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id
                .checked_sub(min)
                .context("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?;
            let shard = Self::new(index, count).context(
                "the Slurm array must be contiguous (--array=0-N or 1-N, no step): \
                 its task ids number the shards",
            )?;
            return Ok(Some((shard, ShardSource::Slurm)));
        }
        match (number("JOB_COMPLETION_INDEX")?, shard_count) {
            (Some(index), Some(count)) => Ok(Some((
                Self::new(index, count).context("JOB_COMPLETION_INDEX with --shard-count")?,
                ShardSource::Kubernetes,
            ))),
            (Some(_), None) => bail!(
                "JOB_COMPLETION_INDEX is set (a Kubernetes indexed Job) but --shard-count is not: \
                 give --shard-count with the Job's completions, or --shard I/N"
            ),
            (None, Some(_)) => bail!(
                "--shard-count needs JOB_COMPLETION_INDEX (a Kubernetes indexed Job); elsewhere use --shard I/N"
            ),
            (None, None) => Ok(None),
        }
    }

    /// This shard's jobs: the batches `b` with `b % count == index`, in file order.
    pub fn select(&self, jobs: &[Job], batch_size: usize) -> anyhow::Result<Vec<Job>> {
        let mut mine: Vec<usize> = group_for_batching(jobs, batch_size)?
            .into_iter()
            .enumerate()
            .filter(|(batch, _)| batch % self.count == self.index)
            .flat_map(|(_, members)| members)
            .collect();
        mine.sort_unstable();
        Ok(mine
            .into_iter()
            .map(|position| jobs[position].clone())
            .collect())
    }

    /// The manifest this shard writes (the others' are read, never written).
    pub fn manifest_file(&self) -> String {
        format!("manifest.shard-{}-of-{}.jsonl", self.index, self.count)
    }
}

impl fmt::Display for ShardSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flag => "--shard",
            Self::Slurm => "SLURM_ARRAY_TASK_ID",
            Self::Kubernetes => "JOB_COMPLETION_INDEX",
        })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn parses_flags_and_refuses_bad_ones() {
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1", "a/2", "0/0", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Shard::parse("0/3").unwrap().manifest_file(),
            "manifest.shard-0-of-3.jsonl"
        );
    }

    #[test]
    fn reads_slurm_and_kubernetes_environments() {
        let none = Shard::resolve(None, None, env(&[])).unwrap();
        assert_eq!(none, None);
        let flag = Shard::parse("1/2").unwrap();
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            Shard::resolve(Some(flag), None, &slurm).unwrap(),
            Some((flag, ShardSource::Flag))
        );
        assert_eq!(
            Shard::resolve(None, None, &slurm).unwrap(),
            Some((Shard { index: 3, count: 4 }, ShardSource::Slurm))
        );
        let one_based = env(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ]);
        assert_eq!(
            Shard::resolve(None, None, one_based)
                .unwrap()
                .unwrap()
                .0
                .index,
            3
        );
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "8"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert!(Shard::resolve(None, None, stepped).is_err());
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(
            Shard::resolve(None, Some(5), &k8s).unwrap(),
            Some((Shard { index: 2, count: 5 }, ShardSource::Kubernetes))
        );
        assert!(Shard::resolve(None, None, &k8s).is_err());
        assert!(Shard::resolve(None, Some(5), env(&[])).is_err());
        assert!(Shard::resolve(Some(flag), Some(5), env(&[])).is_err());
    }
}
