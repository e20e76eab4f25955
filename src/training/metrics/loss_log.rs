//! `losses.csv`: one row per step, flushed as it goes, cut back to the checkpoint on resume.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{TrainObserver, LOSS_CSV};

/// `out_dir/losses.csv` with header `step,<columns>`. On resume, rows after the checkpoint's
/// step (written by the interrupted run after its last checkpoint) are dropped, so every step
/// appears once, and so are lines that cannot be read (see [`LossLog::malformed_lines`]).
pub struct LossLog {
    path: PathBuf,
    columns: Vec<String>,
    rows: Vec<Row>,
    malformed_lines: Vec<usize>,
    file: File,
}

impl LossLog {
    pub fn open(
        out_dir: &Path,
        columns: &[&str],
        resume_from_step: Option<usize>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("cannot create {}", out_dir.display()))?;
        let path = out_dir.join(LOSS_CSV);
        let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        let (mut rows, malformed_lines) = match resume_from_step {
            Some(_) if path.exists() => read_rows(&path, &columns)?,
            _ => (Vec::new(), Vec::new()),
        };
        rows.retain(|(s, _)| resume_from_step.is_some_and(|step| *s <= step));
        let mut text = format!("step,{}\n", columns.join(","));
        for (step, values) in &rows {
            text.push_str(&csv_row(*step, values));
        }
        crate::durable::write_atomically(&path, text.as_bytes(), true)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self {
            path,
            columns,
            rows,
            malformed_lines,
            file,
        })
    }

    /// The 1-based numbers of the lines of the resumed file that could not be read and were
    /// left out (a line cut short by a kill is only ever the last one), for the caller to warn
    /// about.
    pub fn malformed_lines(&self) -> &[usize] {
        &self.malformed_lines
    }

    /// Tells `observer` of each malformed line left out.
    pub fn report_malformed(&self, observer: &mut dyn TrainObserver) {
        for line in &self.malformed_lines {
            observer.on_message(&format!(
                "warning: ignoring malformed line {line} of {}",
                self.path.display()
            ));
        }
    }

    /// All rows so far, including those kept from before a resume.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    pub fn record(&mut self, step: usize, values: &[f64]) -> anyhow::Result<()> {
        anyhow::ensure!(
            values.len() == self.columns.len(),
            "{} values for {} loss columns",
            values.len(),
            self.columns.len()
        );
        self.file
            .write_all(csv_row(step, values).as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.rows.push((step, values.to_vec()));
        Ok(())
    }

    /// Writes the loss curves as a PNG (atomically): one coloured line per column, step on x,
    /// a log-scale y axis when every value is positive and they span more than a decade.
    pub fn plot(&self, path: &Path) -> anyhow::Result<()> {
        super::plot::write_plot(path, &self.columns, &self.rows)
    }
}

/// A step and its values.
pub type Row = (usize, Vec<f64>);

fn csv_row(step: usize, values: &[f64]) -> String {
    let values: Vec<String> = values.iter().map(|v| format!("{v:e}")).collect();
    format!("{step},{}\n", values.join(","))
}

/// The rows of `path`, and the numbers of the lines that are not rows.
fn read_rows(path: &Path, columns: &[String]) -> anyhow::Result<(Vec<Row>, Vec<usize>)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines = BufReader::new(file).lines();
    let expected = format!("step,{}", columns.join(","));
    let header = lines.next().transpose()?.unwrap_or_default();
    anyhow::ensure!(
        header == expected,
        "{} has columns {header:?}, expected {expected:?}",
        path.display()
    );
    let (mut rows, mut malformed) = (Vec::new(), Vec::new());
    for (number, line) in lines.enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        let mut fields = line.split(',');
        let parsed = (|| {
            let step = fields.next()?.parse().ok()?;
            let values: Vec<f64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
            (values.len() == columns.len()).then_some((step, values))
        })();
        match parsed {
            Some(row) => rows.push(row),
            None => malformed.push(number + 2),
        }
    }
    Ok((rows, malformed))
}
