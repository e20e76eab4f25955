//! The loss curves as a PNG, drawn with plotters; text in an embedded font (DejaVu Sans, cut
//! to ASCII: `assets/fonts`, Bitstream Vera licence), so no system fonts are needed.

use std::sync::OnceLock;

use anyhow::Context;
use image::RgbImage;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

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

/// The embedded font, registered with plotters once as its "sans-serif".
static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans-ascii.ttf");
const FONT_FAMILY: &str = "sans-serif";
const FONT_SIZE: f64 = 13.0;

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok()
    });
    anyhow::ensure!(registered, "the embedded plot font cannot be read");
    Ok(())
}

/// Writes the loss curves of `rows` (one coloured line per column, step on x, a log-scale y
/// axis when every value is positive and they span more than a decade) as a PNG, atomically.
pub(super) fn write_plot(
    path: &std::path::Path,
    columns: &[String],
    rows: &[(usize, Vec<f64>)],
) -> anyhow::Result<()> {
    let image = plot_curves(columns, rows)?;
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(image)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("cannot encode the loss plot")?;
    crate::durable::write_atomically(path, &bytes, true)
}

/// The curves, grid, tick labels and legend.
fn plot_curves(columns: &[String], rows: &[(usize, Vec<f64>)]) -> anyhow::Result<RgbImage> {
    register_font()?;
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
    {
        let root =
            BitMapBackend::with_buffer(&mut buffer, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
        let font = (FONT_FAMILY, FONT_SIZE).into_font().color(&BLACK);
        let label = |text: &str, at: (i32, i32), h: HPos, v: VPos| {
            root.draw(&Text::new(text.to_string(), at, font.pos(Pos::new(h, v))))
                .map_err(plot_error)
        };
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
            label(&text, (px - 6, py), HPos::Right, VPos::Center)?;
        }
        for x in linear_ticks(x_lo, x_hi) {
            chart
                .draw_series(LineSeries::new([(x, y_lo), (x, y_hi)], grey))
                .map_err(plot_error)?;
            let (px, py) = chart.backend_coord(&(x, y_lo));
            label(&tick_label(x), (px, py + 6), HPos::Center, VPos::Top)?;
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
            label(name, (legend_x + 22, 14), HPos::Left, VPos::Center)?;
            let (width, _) = root.estimate_text_size(name, &font).map_err(plot_error)?;
            legend_x += 22 + width as i32 + 20;
        }
        let bottom = PLOT_HEIGHT as i32 - 4;
        label(
            "step",
            (PLOT_WIDTH as i32 / 2, bottom),
            HPos::Center,
            VPos::Bottom,
        )?;
        if log_y {
            label("log y", (6, 14), HPos::Left, VPos::Center)?;
        }
        root.present().map_err(plot_error)?;
    }
    RgbImage::from_raw(PLOT_WIDTH, PLOT_HEIGHT, buffer).context("plot buffer has the wrong size")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(linear_ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(y_ticks(-3.2, -0.5, true), vec![-3.0, -2.0, -1.0]);
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(0.001), "1e-3");
        assert_eq!(tick_label(200.0), "200");
    }
}
