//! What a training run reports: `losses.csv` (one row per step, flushed as it goes), the loss
//! curve `loss.png`, and the progress display with Ctrl-C handling.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;

pub const LOSS_CSV: &str = "losses.csv";
pub const LOSS_PLOT: &str = "loss.png";

/// `out_dir/losses.csv` with header `step,<columns>`. On resume, rows after the checkpoint's
/// step (written by the interrupted run after its last checkpoint) are dropped, so every step
/// appears once.
pub struct LossLog {
    path: PathBuf,
    columns: Vec<String>,
    rows: Vec<(usize, Vec<f64>)>,
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
        let rows = match resume_from_step {
            Some(step) if path.exists() => read_rows(&path, &columns)?
                .into_iter()
                .filter(|(s, _)| *s <= step)
                .collect(),
            _ => Vec::new(),
        };
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
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All rows so far, including those kept from before a resume.
    pub fn rows(&self) -> &[(usize, Vec<f64>)] {
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
        let image = plot_curves(&self.columns, &self.rows)?;
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .context("cannot encode the loss plot")?;
        crate::durable::write_atomically(path, &bytes, true)
    }
}

fn csv_row(step: usize, values: &[f64]) -> String {
    let values: Vec<String> = values.iter().map(|v| format!("{v:e}")).collect();
    format!("{step},{}\n", values.join(","))
}

fn read_rows(path: &Path, columns: &[String]) -> anyhow::Result<Vec<(usize, Vec<f64>)>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines = BufReader::new(file).lines();
    let expected = format!("step,{}", columns.join(","));
    let header = lines.next().transpose()?.unwrap_or_default();
    anyhow::ensure!(
        header == expected,
        "{} has columns {header:?}, expected {expected:?}",
        path.display()
    );
    let mut rows = Vec::new();
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
            // A line cut short by a kill is only ever the last one.
            None => eprintln!(
                "warning: ignoring malformed line {} of {}",
                number + 2,
                path.display()
            ),
        }
    }
    Ok(rows)
}

const PLOT_WIDTH: u32 = 800;
const PLOT_HEIGHT: u32 = 480;
const MARGIN_LEFT: u32 = 70;
const MARGIN_BOTTOM: u32 = 36;
const MARGIN_TOP: u32 = 34;
const MARGIN_RIGHT: u32 = 20;
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The curves drawn with plotters; tick labels and the legend are stamped with a built-in pixel
/// font (plotters would need system fonts for text).
fn plot_curves(columns: &[String], rows: &[(usize, Vec<f64>)]) -> anyhow::Result<RgbImage> {
    let mut buffer = vec![255u8; (PLOT_WIDTH * PLOT_HEIGHT * 3) as usize];
    let finite: Vec<f64> = rows
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let log_y = lo > 0.0 && hi / lo > 10.0;
    let to_y = |v: f64| if log_y { v.log10() } else { v };
    let (y_lo, y_hi) = if finite.is_empty() {
        (0.0, 1.0)
    } else {
        padded_range(to_y(lo), to_y(hi))
    };
    let x_hi = rows.last().map_or(1, |(s, _)| *s).max(1) as f64;
    let x_lo = rows.first().map_or(0, |(s, _)| *s).min(x_hi as usize - 1) as f64;
    let mut labels = Vec::new();
    {
        let root =
            BitMapBackend::with_buffer(&mut buffer, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
        let mut chart = ChartBuilder::on(&root)
            .margin_left(MARGIN_LEFT)
            .margin_bottom(MARGIN_BOTTOM)
            .margin_top(MARGIN_TOP)
            .margin_right(MARGIN_RIGHT)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
            .map_err(plot_error)?;
        let grey = RGBColor(225, 225, 225);
        for y in y_ticks(y_lo, y_hi, log_y) {
            chart
                .draw_series(LineSeries::new([(x_lo, y), (x_hi, y)], grey))
                .map_err(plot_error)?;
            let (px, py) = chart.backend_coord(&(x_lo, y));
            let text = tick_label(if log_y { 10f64.powf(y) } else { y });
            labels.push((px - 6 - text_width(&text), py - 5, text));
        }
        for x in linear_ticks(x_lo, x_hi) {
            chart
                .draw_series(LineSeries::new([(x, y_lo), (x, y_hi)], grey))
                .map_err(plot_error)?;
            let (px, py) = chart.backend_coord(&(x, y_lo));
            let text = tick_label(x);
            labels.push((px - text_width(&text) / 2, py + 8, text));
        }
        let frame = [
            (x_lo, y_lo),
            (x_hi, y_lo),
            (x_hi, y_hi),
            (x_lo, y_hi),
            (x_lo, y_lo),
        ];
        chart
            .draw_series(LineSeries::new(frame, BLACK))
            .map_err(plot_error)?;
        let mut legend_x = MARGIN_LEFT as i32 + 10;
        for (i, name) in columns.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points = rows
                .iter()
                .filter(|(_, v)| v[i].is_finite() && (!log_y || v[i] > 0.0))
                .map(|(s, v)| (*s as f64, to_y(v[i])));
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(1)))
                .map_err(plot_error)?;
            root.draw(&Rectangle::new(
                [(legend_x, 12), (legend_x + 16, 16)],
                colour.filled(),
            ))
            .map_err(plot_error)?;
            labels.push((legend_x + 22, 9, name.clone()));
            legend_x += 22 + text_width(name) + 20;
        }
        labels.push((
            PLOT_WIDTH as i32 / 2 - 8,
            PLOT_HEIGHT as i32 - 14,
            "step".into(),
        ));
        if log_y {
            labels.push((6, 9, "log y".into()));
        }
        root.present().map_err(plot_error)?;
    }
    let mut image = RgbImage::from_raw(PLOT_WIDTH, PLOT_HEIGHT, buffer)
        .context("plot buffer has the wrong size")?;
    for (x, y, text) in labels {
        pixel_font::draw(&mut image, x, y, &text);
    }
    Ok(image)
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the loss plot: {e}")
}

fn padded_range(lo: f64, hi: f64) -> (f64, f64) {
    let pad = ((hi - lo) * 0.05).max(1e-6 * lo.abs().max(1.0));
    (lo - pad, hi + pad)
}

/// Decades for a log axis (when it spans at least two), else about five round values.
fn y_ticks(lo: f64, hi: f64, log: bool) -> Vec<f64> {
    let decades: Vec<f64> = (lo.ceil() as i64..=hi.floor() as i64)
        .map(|d| d as f64)
        .collect();
    if log && decades.len() >= 2 {
        decades
    } else if log {
        linear_ticks(10f64.powf(lo), 10f64.powf(hi))
            .into_iter()
            .filter(|v| *v > 0.0)
            .map(f64::log10)
            .collect()
    } else {
        linear_ticks(lo, hi)
    }
}

/// Multiples of 1, 2 or 5 × 10^k inside `[lo, hi]`, about five of them.
fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    if !raw.is_finite() || raw <= 0.0 {
        return vec![lo];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn tick_label(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude != 0.0 && !(1e-2..1e5).contains(&magnitude) {
        format!("{value:.0e}")
    } else {
        let text = format!("{value:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn text_width(text: &str) -> i32 {
    text.chars().count() as i32 * pixel_font::ADVANCE
}

/// A 3×5 pixel font, drawn at 2× scale, for plot labels without system fonts.
mod pixel_font {
    use image::{Rgb, RgbImage};

    const SCALE: i32 = 2;
    /// Pixels from one character's left edge to the next one's.
    pub const ADVANCE: i32 = 4 * SCALE;

    /// Five rows of three bits (most significant = left).
    fn glyph(c: char) -> [u8; 5] {
        match c.to_ascii_lowercase() {
            '0' => [7, 5, 5, 5, 7],
            '1' => [2, 6, 2, 2, 7],
            '2' => [7, 1, 7, 4, 7],
            '3' => [7, 1, 7, 1, 7],
            '4' => [5, 5, 7, 1, 1],
            '5' => [7, 4, 7, 1, 7],
            '6' => [7, 4, 7, 5, 7],
            '7' => [7, 1, 1, 1, 1],
            '8' => [7, 5, 7, 5, 7],
            '9' => [7, 5, 7, 1, 7],
            '.' => [0, 0, 0, 0, 2],
            '-' => [0, 0, 7, 0, 0],
            '+' => [0, 2, 7, 2, 0],
            ':' => [0, 2, 0, 2, 0],
            '_' => [0, 0, 0, 0, 7],
            ' ' => [0, 0, 0, 0, 0],
            'a' => [0, 3, 5, 5, 3],
            'b' => [4, 6, 5, 5, 6],
            'c' => [0, 3, 4, 4, 3],
            'd' => [1, 3, 5, 5, 3],
            'e' => [0, 2, 7, 4, 3],
            'f' => [3, 4, 6, 4, 4],
            'g' => [0, 3, 5, 3, 6],
            'h' => [4, 6, 5, 5, 5],
            'i' => [2, 0, 2, 2, 2],
            'j' => [1, 0, 1, 1, 6],
            'k' => [4, 5, 6, 5, 5],
            'l' => [6, 2, 2, 2, 7],
            'm' => [0, 7, 7, 5, 5],
            'n' => [0, 6, 5, 5, 5],
            'o' => [0, 2, 5, 5, 2],
            'p' => [0, 6, 5, 6, 4],
            'q' => [0, 3, 5, 3, 1],
            'r' => [0, 5, 6, 4, 4],
            's' => [0, 3, 6, 3, 6],
            't' => [2, 7, 2, 2, 3],
            'u' => [0, 5, 5, 5, 3],
            'v' => [0, 5, 5, 5, 2],
            'w' => [0, 5, 5, 7, 7],
            'x' => [0, 5, 2, 5, 5],
            'y' => [0, 5, 3, 1, 6],
            'z' => [0, 7, 3, 6, 7],
            _ => [7, 1, 3, 0, 2], // '?'
        }
    }

    /// Draws `text` in black with its top-left corner at `(x, y)`, clipped to the image.
    pub fn draw(image: &mut RgbImage, x: i32, y: i32, text: &str) {
        for (i, c) in text.chars().enumerate() {
            let left = x + i as i32 * ADVANCE;
            for (row, bits) in glyph(c).into_iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        fill_cell(image, left + col * SCALE, y + row as i32 * SCALE);
                    }
                }
            }
        }
    }

    fn fill_cell(image: &mut RgbImage, x: i32, y: i32) {
        for dy in 0..SCALE {
            for dx in 0..SCALE {
                let (px, py) = (x + dx, y + dy);
                if px >= 0 && py >= 0 && (px as u32) < image.width() && (py as u32) < image.height()
                {
                    image.put_pixel(px as u32, py as u32, Rgb([0, 0, 0]));
                }
            }
        }
    }
}

/// Equally sized images in a grid of `columns` columns, row by row, on white with `gutter`
/// pixels between cells (sample sheets).
pub fn image_grid(images: &[RgbImage], columns: usize, gutter: u32) -> RgbImage {
    let Some(first) = images.first() else {
        return RgbImage::new(1, 1);
    };
    let (width, height) = first.dimensions();
    let columns = columns.clamp(1, images.len()) as u32;
    let rows = (images.len() as u32).div_ceil(columns);
    let span = |cells: u32, size: u32| cells * size + (cells - 1) * gutter;
    let mut grid = RgbImage::from_pixel(
        span(columns, width),
        span(rows, height),
        image::Rgb([255, 255, 255]),
    );
    for (i, image) in images.iter().enumerate() {
        let (column, row) = (i as u32 % columns, i as u32 / columns);
        let x = column * (width + gutter);
        let y = row * (height + gutter);
        image::imageops::replace(&mut grid, image, x as i64, y as i64);
    }
    grid
}

/// One optimizer step as a training loop reports it.
pub struct StepReport<'a> {
    /// Updates completed, this one included.
    pub step: usize,
    pub max_steps: usize,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Named loss terms, the total among them.
    pub losses: &'a [(&'a str, f64)],
}

/// What a training loop tells the outside world, and how it is asked to stop.
pub trait TrainObserver {
    /// Called once, before the first step of this invocation (`step` > 0 when resuming).
    fn on_start(&mut self, step: usize, max_steps: usize);
    fn on_step(&mut self, report: &StepReport);
    /// Checkpoints written, samples saved, skipped images ...
    fn on_message(&mut self, message: &str);
    /// Polled before every step; `true` makes the loop checkpoint and return.
    fn should_stop(&mut self) -> bool;
}

/// An observer that reports nothing and never stops: for library use and tests.
pub struct Silent;

impl TrainObserver for Silent {
    fn on_start(&mut self, _: usize, _: usize) {}
    fn on_step(&mut self, _: &StepReport) {}
    fn on_message(&mut self, _: &str) {}
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// The command-line observer: an indicatif bar with the losses and steps/s on a terminal
/// (hidden otherwise or with `quiet`), messages on stderr unless `quiet`, and Ctrl-C.
pub struct ConsoleProgress {
    bar: ProgressBar,
    quiet: bool,
    interrupt: &'static AtomicBool,
}

impl ConsoleProgress {
    pub fn new(quiet: bool) -> anyhow::Result<Self> {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            // Draws to stderr, and only when it is a terminal.
            ProgressBar::new(0)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Ok(Self {
            bar,
            quiet,
            interrupt: super::interrupt_flag()?,
        })
    }
}

impl TrainObserver for ConsoleProgress {
    fn on_start(&mut self, step: usize, max_steps: usize) {
        self.bar.set_length(max_steps as u64);
        self.bar.set_position(step as u64);
        self.bar.reset_eta();
    }

    fn on_step(&mut self, report: &StepReport) {
        let losses: Vec<String> = report
            .losses
            .iter()
            .map(|(name, value)| format!("{name} {value:.4e}"))
            .collect();
        let status = format!("{} lr {:.2e}", losses.join(" "), report.lr);
        // Without a terminal (logs, CI) a line every 5% of the run replaces the bar.
        let period = (report.max_steps / 20).max(1);
        if self.bar.is_hidden() && !self.quiet && report.step.is_multiple_of(period) {
            eprintln!("step {}/{}: {status}", report.step, report.max_steps);
        }
        self.bar.set_message(status);
        self.bar.set_position(report.step as u64);
    }

    fn on_message(&mut self, message: &str) {
        if self.quiet {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{message}");
        } else {
            self.bar.println(message);
        }
    }

    fn should_stop(&mut self) -> bool {
        let stop = self.interrupt.load(Ordering::SeqCst);
        if stop {
            self.on_message("interrupted: saving a checkpoint");
        }
        stop
    }
}

impl Drop for ConsoleProgress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_images_row_by_row_with_gutters() {
        let images: Vec<RgbImage> = (0..5)
            .map(|i| RgbImage::from_pixel(4, 3, image::Rgb([i, 0, 0])))
            .collect();
        let grid = image_grid(&images, 3, 2);
        assert_eq!(grid.dimensions(), (3 * 4 + 2 * 2, 2 * 3 + 2));
        assert_eq!(grid.get_pixel(6, 0).0, [1, 0, 0]);
        assert_eq!(grid.get_pixel(4, 0).0, [255, 255, 255], "gutter");
        assert_eq!(grid.get_pixel(6, 5).0, [4, 0, 0]);
        assert_eq!(grid.get_pixel(15, 7).0, [255, 255, 255], "empty cell");
        assert_eq!(image_grid(&images, 0, 0).dimensions(), (4, 15));
    }

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(linear_ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(y_ticks(-3.2, -0.5, true), vec![-3.0, -2.0, -1.0]);
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(0.001), "1e-3");
        assert_eq!(tick_label(200.0), "200");
    }
}
