//! Learning curves as a PNG: accuracy and loss per epoch, training dashed and validation
//! solid, one colour per model (the article's figure puts ResNet and PlainNet on one axes).

use std::path::Path;

use candle_functional::train::History;
use plotters::prelude::*;

const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Draws `runs` (name, history) into a two-panel PNG.
pub fn draw_curves(
    path: &Path,
    title: &str,
    runs: &[(String, History)],
) -> Result<(), Box<dyn std::error::Error>> {
    // The bitmap backend renders text with this embedded font (no system fonts needed).
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "cannot load the embedded font")?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 24))?;
    let panels = root.split_evenly((1, 2));
    let epochs = runs
        .iter()
        .map(|(_, h)| h.epochs().len())
        .max()
        .unwrap_or(1)
        .max(2);

    for (panel, metric) in panels.iter().zip(["accuracy", "loss"]) {
        let values = runs.iter().flat_map(|(_, h)| {
            h.epochs().iter().flat_map(move |e| {
                let train = e.metric(metric);
                let val = e.metric(&format!("val_{metric}"));
                train.into_iter().chain(val)
            })
        });
        // Only finite values set the range: a diverged run (NaN, inf) or no epoch at all
        // must still give a finite axis (an infinite one never finishes drawing).
        let hi = values.filter(|v| v.is_finite()).fold(f64::NAN, f64::max);
        let hi = if hi.is_finite() { hi } else { 1.0 };
        let (lo, hi) = if metric == "accuracy" {
            (0.0, hi.clamp(0.1, 1.0) * 1.05)
        } else {
            (0.0, hi.max(1e-3) * 1.05)
        };
        let mut chart = ChartBuilder::on(panel)
            .margin(20)
            .caption(metric, ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(1f64..epochs as f64, lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(metric)
            .draw()?;
        for (i, (name, history)) in runs.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let pick = |val: bool| -> Vec<(f64, f64)> {
                history
                    .epochs()
                    .iter()
                    .filter_map(|e| {
                        let v = if val {
                            e.metric(&format!("val_{metric}"))
                        } else {
                            e.metric(metric)
                        }
                        .filter(|v| v.is_finite());
                        v.map(|v| (e.epoch as f64, v))
                    })
                    .collect()
            };
            chart
                .draw_series(DashedLineSeries::new(
                    pick(false),
                    6,
                    4,
                    colour.stroke_width(2),
                ))?
                .label(format!("{name} train (dashed)"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(1))
                });
            chart
                .draw_series(LineSeries::new(pick(true), colour.stroke_width(3)))?
                .label(format!("{name} validation"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(if metric == "accuracy" {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            })
            .draw()?;
    }
    root.present()?;
    Ok(())
}
