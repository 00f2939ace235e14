//! The reports of an evaluation: `eval.json` (every number, as
//! `{"results": [{"model", "evaluator", "metric", "category", "value", "n"}]}`),
//! `eval.md` (one table per evaluator and metric: models down, categories
//! across, the overall value first) and a chart, `eval.png` and `eval.svg`
//! (one panel per evaluator and metric, grouped bars per category, one colour
//! per model). Every file is written under a temporary name and renamed.

use crate::eval::EvalRow;
use crate::io::writer::write_atomic;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The font of the charts' text (DejaVu Sans Mono; see `assets/`).
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

/// The (evaluator, metric) panels in first-seen order, each with its categories
/// (overall first, then by name) and its models in first-seen order.
struct Panel<'a> {
    evaluator: &'a str,
    metric: &'a str,
    categories: Vec<Option<&'a str>>,
    models: Vec<&'a str>,
    values: BTreeMap<(&'a str, Option<&'a str>), (f64, u64)>,
}

fn panels(rows: &[EvalRow]) -> Vec<Panel<'_>> {
    let mut out: Vec<Panel<'_>> = Vec::new();
    for r in rows {
        let i = match out
            .iter()
            .position(|p| p.evaluator == r.evaluator && p.metric == r.metric)
        {
            Some(i) => i,
            None => {
                out.push(Panel {
                    evaluator: &r.evaluator,
                    metric: &r.metric,
                    categories: Vec::new(),
                    models: Vec::new(),
                    values: BTreeMap::new(),
                });
                out.len() - 1
            }
        };
        let p = &mut out[i];
        let c = r.category.as_deref();
        if !p.categories.contains(&c) {
            p.categories.push(c);
        }
        if !p.models.contains(&r.model.as_str()) {
            p.models.push(&r.model);
        }
        p.values.insert((&r.model, c), (r.value, r.n));
    }
    for p in &mut out {
        p.categories
            .sort_by_key(|c| (c.is_some(), c.map(str::to_string)));
    }
    out
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

/// The tables of `eval.md` (and what `fusechat run` prints).
pub fn markdown(rows: &[EvalRow]) -> String {
    let mut s = String::new();
    for p in panels(rows) {
        s.push_str(&format!("### {} · {}\n\n| model |", p.evaluator, p.metric));
        for c in &p.categories {
            s.push_str(&format!(" {} |", c.unwrap_or("overall")));
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(p.categories.len()));
        s.push('\n');
        for m in &p.models {
            s.push_str(&format!("| {m} |"));
            for c in &p.categories {
                let cell = p
                    .values
                    .get(&(*m, *c))
                    .map_or("".to_string(), |(v, _)| fmt_value(*v));
                s.push_str(&format!(" {cell} |"));
            }
            s.push('\n');
        }
        s.push('\n');
    }
    s
}

/// Write `eval.json`, `eval.md`, `eval.svg` and `eval.png` into `dir`; returns their paths.
pub fn write(dir: &Path, rows: &[EvalRow]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = serde_json::to_string_pretty(&serde_json::json!({ "results": rows })).expect("JSON");
    let files = [
        dir.join("eval.json"),
        dir.join("eval.md"),
        dir.join("eval.svg"),
        dir.join("eval.png"),
    ];
    write_atomic(&files[0], json.as_bytes())?;
    write_atomic(
        &files[1],
        format!("# Evaluation\n\n{}", markdown(rows)).as_bytes(),
    )?;
    let (w, h) = chart_size(rows);
    let mut svg = String::new();
    {
        let area = plotters::prelude::SVGBackend::with_string(&mut svg, (w, h));
        draw(area, rows).map_err(|e| Error::msg(format!("drawing the chart: {e}")))?;
    }
    write_atomic(&files[2], svg.as_bytes())?;
    // The bitmap backend names the format by the file's extension: draw into
    // a hidden `.png`, then rename.
    let tmp = dir.join(format!(".eval.{}.png", crate::io::writer::tmp_suffix()));
    let drawn = draw(plotters::prelude::BitMapBackend::new(&tmp, (w, h)), rows)
        .map_err(|e| Error::msg(format!("drawing the chart: {e}")))
        .and_then(|()| std::fs::rename(&tmp, &files[3]).map_err(|e| Error::io(&files[3], e)));
    if drawn.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    drawn?;
    Ok(files.to_vec())
}

/// Give plotters its `sans-serif` font (the bundled DejaVu Sans Mono) in
/// every style. Plotters draws text only with registered fonts here (no system
/// font lookup), and that holds for every user of plotters in the process, so
/// the benches call this before criterion draws its charts.
pub fn register_fonts() {
    use plotters::style::FontStyle;
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        for style in [
            FontStyle::Normal,
            FontStyle::Bold,
            FontStyle::Italic,
            FontStyle::Oblique,
        ] {
            let _ = plotters::style::register_font("sans-serif", style, FONT);
        }
    });
}

fn chart_size(rows: &[EvalRow]) -> (u32, u32) {
    let n = panels(rows).len().max(1) as u32;
    (960 + LEGEND_WIDTH, 360 * n)
}

/// Pixels to the right of each panel for its legend, clear of the bars.
const LEGEND_WIDTH: u32 = 220;

/// One colour per model (a colour-blind-safe palette, then more distinct
/// ones; repeated past 14 models).
const PALETTE: [(u8, u8, u8); 14] = [
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (213, 94, 0),
    (240, 228, 66),
    (0, 0, 0),
    (120, 120, 120),
    (150, 80, 40),
    (110, 70, 190),
    (150, 200, 70),
    (190, 30, 60),
    (40, 60, 110),
];

fn draw<DB: plotters::prelude::DrawingBackend>(
    backend: DB,
    rows: &[EvalRow],
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    register_fonts();
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let ps = panels(rows);
    if ps.is_empty() {
        return root.present().map_err(|e| e.to_string());
    }
    let areas = root.split_evenly((ps.len(), 1));
    let models: Vec<&str> = {
        let mut m: Vec<&str> = Vec::new();
        for r in rows {
            if !m.contains(&r.model.as_str()) {
                m.push(&r.model);
            }
        }
        m
    };
    let colour = |m: &str| {
        let i = models.iter().position(|x| *x == m).unwrap_or(0) % PALETTE.len();
        RGBColor(PALETTE[i].0, PALETTE[i].1, PALETTE[i].2)
    };
    for (p, panel) in ps.iter().zip(areas.iter()) {
        let (w, _) = panel.dim_in_pixel();
        let (area, key) = panel.split_horizontally(w.saturating_sub(LEGEND_WIDTH));
        let vals: Vec<f64> = p
            .values
            .values()
            .map(|v| v.0)
            .filter(|v| v.is_finite())
            .collect();
        let mut top = vals.iter().cloned().fold(0.0f64, f64::max);
        if p.metric == "accuracy" {
            top = top.max(1.0);
        }
        let bottom = vals.iter().cloned().fold(0.0f64, f64::min);
        if top - bottom < 1e-9 {
            top = bottom + 1.0;
        }
        let span = top - bottom;
        let (ncat, nmod) = (p.categories.len(), p.models.len().max(1));
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("{} · {}", p.evaluator, p.metric),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..ncat as f64, bottom..top + 0.15 * span)
            .map_err(|e| e.to_string())?;
        let labels: Vec<String> = p
            .categories
            .iter()
            .map(|c| c.unwrap_or("overall").to_string())
            .collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| e.to_string())?;
        // Category names under the middle of their group of bars (plotters'
        // own labels fall on round numbers of the axis, not on the groups).
        let style = TextStyle::from(("sans-serif", 13).into_font()).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ),
        );
        chart
            .draw_series(labels.iter().enumerate().map(|(i, l)| {
                EmptyElement::at((i as f64 + 0.5, bottom))
                    + Text::new(l.clone(), (0, 6), style.clone())
            }))
            .map_err(|e| e.to_string())?;
        let width = 0.8 / nmod as f64;
        for (mi, m) in p.models.iter().enumerate() {
            let c = colour(m);
            let bars: Vec<Rectangle<(f64, f64)>> = p
                .categories
                .iter()
                .enumerate()
                .filter_map(|(ci, cat)| {
                    let v = p.values.get(&(*m, *cat))?.0;
                    v.is_finite().then(|| {
                        let x0 = ci as f64 + 0.1 + mi as f64 * width;
                        Rectangle::new([(x0, bottom.min(0.0)), (x0 + width * 0.92, v)], c.filled())
                    })
                })
                .collect();
            chart.draw_series(bars).map_err(|e| e.to_string())?;
            // The legend, beside the plot: a swatch and the model's name.
            let y = 48 + 20 * mi as i32;
            key.draw(&Rectangle::new([(8, y - 5), (20, y + 5)], c.filled()))
                .map_err(|e| e.to_string())?;
            key.draw(&Text::new(m.to_string(), (26, y - 7), ("sans-serif", 13)))
                .map_err(|e| e.to_string())?;
        }
    }
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, metric: &str, category: Option<&str>, value: f64) -> EvalRow {
        EvalRow {
            model: model.into(),
            evaluator: "exact_match".into(),
            metric: metric.into(),
            category: category.map(str::to_string),
            value,
            n: 10,
        }
    }

    #[test]
    fn the_table_has_a_row_per_model_and_a_column_per_category_overall_first() {
        let rows = vec![
            row("pivot", "accuracy", Some("math"), 0.5),
            row("pivot", "accuracy", None, 0.25),
            row("merge:varm", "accuracy", None, 0.75),
            row("merge:varm", "accuracy", Some("math"), 1.0),
        ];
        let md = markdown(&rows);
        assert!(md.contains("| model | overall | math |"), "{md}");
        assert!(md.contains("| pivot | 0.2500 | 0.5000 |"), "{md}");
        assert!(md.contains("| merge:varm | 0.7500 | 1.0000 |"), "{md}");
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), &rows).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
        assert_eq!(json["results"].as_array().unwrap().len(), 4);
        assert_eq!(json["results"][1]["category"], serde_json::Value::Null);
        let svg = std::fs::read_to_string(&files[2]).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("merge:varm") && svg.contains("overall"));
        let png = std::fs::read(&files[3]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
