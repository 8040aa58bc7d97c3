//! The self-contained HTML report of `recall compare --out DIR`: the comparison table, an
//! R-matrix heatmap per method, per-task retrieval curves and zero-shot curves across stages,
//! and bars of the summary metrics. Charts are SVG drawn with plotters and inlined, so the
//! file needs nothing else to open.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{Comparison, Curves};

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

type Draw<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn svg(width: u32, height: u32, draw: impl FnOnce(&Draw) -> Result<(), String>) -> String {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        let result = root.fill(&WHITE).map_err(|e| e.to_string()).and_then(|_| draw(&root));
        if let Err(e) = result {
            return format!("<p>(chart failed: {})</p>", html_escape(&e));
        }
        if let Err(e) = root.present() {
            return format!("<p>(chart failed: {})</p>", html_escape(&e.to_string()));
        }
    }
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The colour of `v` on a scale from `lo` to `hi` (viridis: dark blue to yellow, readable in
/// grey and by colour-blind readers), and the text colour that reads on it.
fn shade(v: f64, lo: f64, hi: f64) -> (RGBColor, RGBColor) {
    use plotters::style::colors::colormaps::{ColorMap, ViridisRGB};
    if !v.is_finite() {
        return (RGBColor(230, 230, 230), BLACK);
    }
    let t = if hi > lo { ((v - lo) / (hi - lo)).clamp(0.0, 1.0) } else { 0.5 };
    let c: RGBColor = ViridisRGB.get_color(t as f32);
    let luminance = 0.299 * c.0 as f64 + 0.587 * c.1 as f64 + 0.114 * c.2 as f64;
    (c, if luminance > 140.0 { BLACK } else { WHITE })
}

/// The finite range of a matrix (0..100 when it has none).
fn range(m: &[Vec<f64>]) -> (f64, f64) {
    let v: Vec<f64> = m.iter().flatten().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 100.0);
    }
    (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(f64::NEG_INFINITY, f64::max))
}

/// The label of stage `t`: the model before training, or after task t.
fn stage_label(t: usize) -> String {
    if t == 0 {
        "before training".into()
    } else {
        format!("after task {t}")
    }
}

/// R[t][i] as a heatmap: rows are stages, stage 0 (before training) on top as the matrix is
/// written, columns tasks; each cell's value printed in a colour that reads on it; a colour
/// bar of the range beside it.
fn heatmap(c: &Curves, title: &str, m: &[Vec<f64>]) -> String {
    let (stages, tasks) = (m.len(), c.tasks.len());
    let (lo, hi) = range(m);
    let width = 200 + 90 * tasks as u32;
    svg(width + 80, 80 + 40 * stages as u32, |root| {
        let (left, right) = root.split_horizontally(width);
        let mut chart = ChartBuilder::on(&left)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(110)
            // A segmented `0..n` has n + 1 segments (its ends inclusive): one per task and stage.
            .build_cartesian_2d((0..tasks.max(1) - 1).into_segmented(), (0..stages.max(1) - 1).into_segmented())
            .map_err(|e| e.to_string())?;
        let names = c.tasks.clone();
        // Row y (from the bottom) holds stage `stages - 1 - y`.
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(tasks)
            .y_labels(stages)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_label_formatter(&|y| match y {
                SegmentValue::CenterOf(y) if *y < stages => stage_label(stages - 1 - y),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| e.to_string())?;
        let cell = |t: usize, i: usize| (SegmentValue::Exact(i), SegmentValue::Exact(stages - 1 - t));
        let next = |t: usize, i: usize| (SegmentValue::Exact(i + 1), SegmentValue::Exact(stages - t));
        // Every cell first, then every value, so no cell covers a neighbour's text.
        for (t, row) in m.iter().enumerate() {
            for (i, &v) in row.iter().enumerate() {
                let rect = Rectangle::new([cell(t, i), next(t, i)], shade(v, lo, hi).0.filled());
                chart.draw_series(std::iter::once(rect)).map_err(|e| e.to_string())?;
            }
        }
        let centre = Pos::new(HPos::Center, VPos::Center);
        for (t, row) in m.iter().enumerate() {
            for (i, &v) in row.iter().enumerate() {
                let text = if v.is_finite() { format!("{v:.1}") } else { "-".into() };
                let style = ("sans-serif", 13).into_font().color(&shade(v, lo, hi).1).pos(centre);
                let at = (SegmentValue::CenterOf(i), SegmentValue::CenterOf(stages - 1 - t));
                chart.draw_series(std::iter::once(Text::new(text, at, style))).map_err(|e| e.to_string())?;
            }
        }
        colour_bar(&right, lo, hi)
    })
}

/// A vertical colour bar from `lo` (bottom) to `hi`, labelled.
fn colour_bar(area: &Draw, lo: f64, hi: f64) -> Result<(), String> {
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let mut bar = ChartBuilder::on(area)
        .margin_top(36)
        .margin_bottom(38)
        .margin_right(8)
        .y_label_area_size(40)
        .build_cartesian_2d(0.0..1.0, lo..hi)
        .map_err(|e| e.to_string())?;
    bar.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(5)
        .y_label_style(("sans-serif", 12))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    let steps = 64;
    let strips = (0..steps).map(|k| {
        let (a, b) = (lo + (hi - lo) * k as f64 / steps as f64, lo + (hi - lo) * (k + 1) as f64 / steps as f64);
        Rectangle::new([(0.0, a), (1.0, b)], shade((a + b) / 2.0, lo, hi).0.filled())
    });
    bar.draw_series(strips).map_err(|e| e.to_string())?;
    Ok(())
}

/// An axis range around `values` (finite ones), padded so markers are not cut.
fn auto_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 100.0);
    }
    let (lo, hi) =
        (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    let pad = ((hi - lo) * 0.1).max(1.0);
    ((lo - pad).max(if lo >= 0.0 { 0.0 } else { f64::NEG_INFINITY }), hi + pad)
}

/// One line per series over stages 0..=T, each point marked; the y axis fits the data.
fn lines(title: &str, y_label: &str, series: &[(String, Vec<f64>)]) -> String {
    line_chart(title, "tasks trained", 0, y_label, series)
}

/// One line per series, point k at x = `first_x` + k, each point marked; the y axis fits
/// the data.
fn line_chart(title: &str, x_label: &str, first_x: usize, y_label: &str, series: &[(String, Vec<f64>)]) -> String {
    let stages = series.iter().map(|(_, v)| v.len()).max().unwrap_or(1).max(2);
    let (lo, hi) = auto_range(series.iter().flat_map(|(_, v)| v.iter().copied()));
    svg(640, 340, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(34)
            .y_label_area_size(50)
            .build_cartesian_2d(first_x as f64 - 0.2..(first_x + stages - 1) as f64 + 0.2, lo..hi)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_labels(stages)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-9 && *x >= 0.0 {
                    format!("{x:.0}")
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(|e| e.to_string())?;
        for (k, (name, v)) in series.iter().enumerate() {
            let c = color(k);
            let points: Vec<(f64, f64)> =
                v.iter().enumerate().filter(|(_, y)| y.is_finite()).map(|(x, y)| ((first_x + x) as f64, *y)).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled()))).map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())
    })
}

/// One bar per method: the mean over seeds, with a ±1 std error bar where there are several;
/// the metric as the y axis' title, each method's name under its own bar.
fn bars(title: &str, values: &[(String, f64, f64)]) -> String {
    let n = values.len().max(1);
    let lo = values.iter().map(|(_, m, s)| m - s).fold(0f64, f64::min);
    let hi = values.iter().map(|(_, m, s)| m + s).fold(0f64, f64::max);
    let pad = ((hi - lo) * 0.1).max(1.0);
    let longest = values.iter().map(|(m, _, _)| m.chars().count()).max().unwrap_or(4) as u32;
    // Each bar as wide as its label needs, so labels never run together.
    let per_bar = (7 * longest + 16).max(70);
    svg(110 + per_bar * n as u32, 320, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n - 1).into_segmented(), (lo - pad)..(hi + pad))
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = values.iter().map(|(m, _, _)| m.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(title)
            .x_labels(n + 1)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (_, mean, std)) in values.iter().enumerate() {
            let bar = Rectangle::new(
                [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *mean)],
                color(i).mix(0.8).filled(),
            );
            chart.draw_series(std::iter::once(bar)).map_err(|e| e.to_string())?;
            if *std > 0.0 {
                let whisker = ErrorBar::new_vertical(
                    SegmentValue::CenterOf(i),
                    mean - std,
                    *mean,
                    mean + std,
                    BLACK.stroke_width(1),
                    12,
                );
                chart.draw_series(std::iter::once(whisker)).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    })
}

fn row_mean(row: &[f64]) -> f64 {
    let v: Vec<f64> = row.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Charts per method: two R matrices, the per-task curves, the training loss.
const FIGURES_PER_METHOD: usize = 4;

/// A chart of the report, also written on its own (`figures/NAME.svg`).
pub struct Figure {
    /// A file name without extension: lower-case letters, digits and dashes.
    pub name: String,
    pub svg: String,
}

/// How much larger than the SVG's own size a PNG figure is drawn (a 700 px chart becomes
/// 1,400 px: sharp in print at a column's width).
pub const PNG_SCALE: f32 = 2.0;

impl Figure {
    /// The figure rasterised (resvg) at [`PNG_SCALE`] on white, text in the system's fonts.
    pub fn png(&self) -> Result<Vec<u8>, String> {
        let options = resvg::usvg::Options { fontdb: system_fonts(), ..Default::default() };
        let tree = resvg::usvg::Tree::from_str(&self.svg, &options).map_err(|e| format!("{}: {e}", self.name))?;
        let size =
            tree.size().to_int_size().scale_by(PNG_SCALE).ok_or_else(|| format!("{}: empty figure", self.name))?;
        let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
            .ok_or_else(|| format!("{}: cannot allocate {}x{} pixels", self.name, size.width(), size.height()))?;
        pixmap.fill(resvg::tiny_skia::Color::WHITE);
        resvg::render(&tree, resvg::tiny_skia::Transform::from_scale(PNG_SCALE, PNG_SCALE), &mut pixmap.as_mut());
        pixmap.encode_png().map_err(|e| format!("{}: {e}", self.name))
    }
}

/// The system's fonts, loaded once; a machine without any gets PNGs without text, and a
/// warning that says which package gives them.
fn system_fonts() -> std::sync::Arc<resvg::usvg::fontdb::Database> {
    static FONTS: std::sync::OnceLock<std::sync::Arc<resvg::usvg::fontdb::Database>> = std::sync::OnceLock::new();
    FONTS
        .get_or_init(|| {
            let mut db = resvg::usvg::fontdb::Database::new();
            db.load_system_fonts();
            // The charts ask for "sans-serif": the first family that says it is one (DejaVu
            // Sans, Liberation Sans, ...), else any.
            let families: Vec<String> =
                db.faces().flat_map(|f| f.families.iter().map(|(name, _)| name.clone())).collect();
            let sans = families.iter().find(|f| f.contains("Sans") && !f.contains("Mono")).or(families.first());
            if let Some(family) = sans.cloned() {
                db.set_sans_serif_family(family);
            }
            if db.is_empty() {
                tracing::warn!(
                    "no system fonts: PNG figures are drawn without text (install one, e.g. Debian's fonts-dejavu-core; \
                     the SVG figures are unaffected)"
                );
            }
            std::sync::Arc::new(db)
        })
        .clone()
}

fn file_stem(parts: &[&str]) -> String {
    let joined = parts.join("-").to_lowercase().replace('@', "");
    let mut out = String::new();
    for c in joined.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Every chart of the comparison, grouped as the report shows them: the summary bars, the
/// curves across the task sequence, then each method's R matrices and per-task curves.
pub fn figures(c: &Comparison) -> [Vec<Figure>; 3] {
    let mut summary = Vec::new();
    for (j, h) in c.headers.iter().enumerate() {
        if h == "trainable params" {
            continue;
        }
        let values: Vec<(String, f64, f64)> =
            c.rows.iter().filter_map(|(m, _, cells)| cells[j].map(|(mean, std)| (m.clone(), mean, std))).collect();
        if !values.is_empty() {
            summary.push(Figure { name: file_stem(&["bars", h]), svg: bars(h, &values) });
        }
    }
    let mut sequence = Vec::new();
    let avg_series: Vec<(String, Vec<f64>)> = c
        .curves
        .iter()
        .map(|k| (k.method.clone(), k.i2t.iter().zip(&k.t2i).map(|(a, b)| (row_mean(a) + row_mean(b)) / 2.0).collect()))
        .collect();
    let svg = lines("mean R@1 over all tasks (both directions)", "R@1 %", &avg_series);
    sequence.push(Figure { name: "mean-r1-across-tasks".into(), svg });
    if let Some(first) = c.curves.first() {
        for (s, set) in first.heldout_sets.iter().enumerate() {
            let series: Vec<(String, Vec<f64>)> = c
                .curves
                .iter()
                .map(|k| (k.method.clone(), k.zeroshot.iter().map(|r| r.get(s).copied().unwrap_or(f64::NAN)).collect()))
                .collect();
            let svg = lines(&format!("zero-shot top-1: {set}"), "top-1 %", &series);
            sequence.push(Figure { name: file_stem(&["zeroshot", set]), svg });
        }
    }
    let mut methods = Vec::new();
    for k in &c.curves {
        methods.push(Figure {
            name: file_stem(&[&k.method, "i2t-r1-matrix"]),
            svg: heatmap(k, "I2T R@1: R[t][i]", &k.i2t),
        });
        methods.push(Figure {
            name: file_stem(&[&k.method, "t2i-r1-matrix"]),
            svg: heatmap(k, "T2I R@1: R[t][i]", &k.t2i),
        });
        let per_task: Vec<(String, Vec<f64>)> = k
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), k.i2t.iter().map(|r| r.get(i).copied().unwrap_or(f64::NAN)).collect()))
            .collect();
        let svg = lines("I2T R@1 per task", "R@1 %", &per_task);
        methods.push(Figure { name: file_stem(&[&k.method, "i2t-r1-per-task"]), svg });
        // The training loss of each task, epoch by epoch (mean over seeds).
        let losses: Vec<(String, Vec<f64>)> = k.tasks.iter().cloned().zip(k.losses.iter().cloned()).collect();
        let svg = line_chart("training loss per epoch", "epoch", 1, "loss", &losses);
        methods.push(Figure { name: file_stem(&[&k.method, "training-loss"]), svg });
    }
    [summary, sequence, methods]
}

/// The whole report as one HTML document.
pub fn render(c: &Comparison, title: &str) -> String {
    let mut body = String::new();
    body.push_str(&format!("<h1>{}</h1>\n", html_escape(title)));
    // The table.
    body.push_str("<table>\n<tr><th>method</th><th>seeds</th>");
    for h in &c.headers {
        body.push_str(&format!("<th>{}</th>", html_escape(h)));
    }
    body.push_str("</tr>\n");
    for (i, (m, n, _)) in c.rows.iter().enumerate() {
        let name = if c.baseline == Some(i) { format!("{m} (baseline)") } else { m.clone() };
        body.push_str(&format!("<tr><td>{}</td><td>{n}</td>", html_escape(&name)));
        for j in 0..c.headers.len() {
            let cell = html_escape(&c.cell(i, j));
            if c.best[j] == Some(i) && c.rows.len() > 1 {
                body.push_str(&format!("<td><b>{cell}</b></td>"));
            } else {
                body.push_str(&format!("<td>{cell}</td>"));
            }
        }
        body.push_str("</tr>\n");
    }
    body.push_str("</table>\n");
    for (label, items) in [("Note: these rows may not be comparable", &c.notes), ("Missing runs", &c.missing)] {
        if !items.is_empty() {
            body.push_str(&format!("<p>{label}:</p><ul>"));
            for m in items {
                body.push_str(&format!("<li>{}</li>", html_escape(m)));
            }
            body.push_str("</ul>\n");
        }
    }
    let [summary, sequence, methods] = figures(c);
    let row = |figs: &[Figure]| figs.iter().map(|f| f.svg.as_str()).collect::<String>();
    body.push_str("<h2>Summary metrics</h2>\n<p>Bars: mean over seeds; whiskers: ±1 std.</p>\n<div class=\"row\">");
    body.push_str(&row(&summary));
    body.push_str("</div>\n<h2>Across the task sequence</h2>\n<div class=\"row\">");
    body.push_str(&row(&sequence));
    body.push_str("</div>\n");
    for (k, figs) in c.curves.iter().zip(methods.chunks(FIGURES_PER_METHOD)) {
        body.push_str(&format!("<h2>{}</h2>\n<div class=\"row\">{}</div>\n", html_escape(&k.method), row(figs)));
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
         body{{font-family:sans-serif;margin:24px}} table{{border-collapse:collapse}} \
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}} \
         .row{{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}}</style></head>\n<body>\n{body}</body></html>\n",
        html_escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The y coordinate of the first `<text>` element whose content is `label`.
    fn text_y(svg: &str, label: &str) -> Option<f64> {
        attr_of_text(svg, label, "y")
    }

    /// Attribute `attr` of the first `<text>` element whose content (trimmed) is `label`.
    fn attr_of_text(svg: &str, label: &str, attr: &str) -> Option<f64> {
        svg.split("<text").skip(1).find_map(|t| {
            let (tag, rest) = t.split_once('>')?;
            let content = rest.split("</text>").next()?.trim();
            (content == label).then(|| tag.split(&format!(" {attr}=\"")).nth(1)?.split('"').next()?.parse().ok())?
        })
    }

    fn curves() -> Curves {
        Curves {
            method: "finetune".into(),
            tasks: vec!["digits".into(), "textiles".into()],
            // Stage 0 (before training) is high on digits, so its colour is the bright end.
            i2t: vec![vec![90.0, 10.0], vec![50.0, 20.0], vec![30.0, 60.0]],
            t2i: vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]],
            heldout_sets: Vec::new(),
            zeroshot: Vec::new(),
            losses: Vec::new(),
        }
    }

    #[test]
    fn the_heatmap_puts_stage_0_on_top_labels_each_row_once_and_prints_every_value_over_its_cell() {
        let c = curves();
        let svg = heatmap(&c, "I2T", &c.i2t);
        let (before, after1, after2) = (
            text_y(&svg, "before training").expect("a row labelled before training"),
            text_y(&svg, "after task 1").unwrap(),
            text_y(&svg, "after task 2").unwrap(),
        );
        assert!(before < after1 && after1 < after2, "stage 0 on top: {before} {after1} {after2}");
        assert!(!svg.contains("after task 3"), "no label beyond the last stage");
        // The value 90.0 (stage 0, digits) sits on the top row, beside its row label.
        let v = text_y(&svg, "90.0").unwrap();
        assert!((v - before).abs() < 2.0, "90.0 at y {v}, its row's label at {before}");
        // Every value is drawn after every cell, so none is covered: the background, then the
        // six cells, then the values.
        let rects: Vec<usize> = svg.match_indices("<rect").map(|(k, _)| k).collect();
        let first_value = svg.split("<text").scan(0, |at, t| {
            let here = *at;
            *at += t.len() + 5;
            Some((here, t))
        });
        let first_value =
            first_value.filter(|(_, t)| t.contains(">\n90.0\n<") || t.contains(">90.0<")).map(|(k, _)| k).next();
        assert!(first_value.is_some_and(|v| v > rects[6]), "values after the cells");
        // The top-left cell (stage 0, digits: 90.0, the maximum) is the first cell, on top, in
        // the colour of the top of the scale.
        let (top, _) = shade(90.0, 10.0, 90.0);
        let hex = format!("#{:02X}{:02X}{:02X}", top.0, top.1, top.2);
        let first_cell = &svg[rects[1]..svg[rects[1]..].find("/>").unwrap() + rects[1]];
        assert!(first_cell.to_uppercase().contains(&hex), "{first_cell} should be {hex}");
        let cell_y = |r: &str| -> f64 { r.split(" y=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap() };
        assert!((2..7).all(|k| cell_y(&svg[rects[k]..]) >= cell_y(first_cell)), "the first cell is on top");
        // A colour bar: at least 64 strips beside the 6 cells.
        assert!(svg.matches("<rect").count() >= 6 + 64, "{}", svg.matches("<rect").count());
    }

    #[test]
    fn line_charts_fit_their_data_and_mark_each_point() {
        let svg = lines("t", "R@1 %", &[("a".into(), vec![20.0, 25.0, 30.0])]);
        assert_eq!(svg.matches("<circle").count(), 3, "a marker per point");
        assert!(text_y(&svg, "100").is_none(), "the axis fits 20-30, not 0-100");
    }

    #[test]
    fn bars_name_their_axis_and_keep_labels_apart() {
        let names = ["c-clip-authors-code", "c-clip-code-no-ckc"];
        let svg = bars("Avg I2T R@1", &names.iter().map(|n| (n.to_string(), 20.0, 1.0)).collect::<Vec<_>>());
        let texts: Vec<&str> =
            svg.split("<text").skip(1).filter_map(|t| t.split_once('>')?.1.split("</text>").next()).collect();
        assert!(texts.iter().filter(|t| t.trim() == "Avg I2T R@1").count() >= 2, "a caption and a y-axis title");
        let x = |label: &str| attr_of_text(&svg, label, "x").unwrap();
        // Labels are centred under bars at least as wide as the longer label (~7 px a char).
        assert!(x(names[1]) - x(names[0]) >= 7.0 * names[0].len() as f64, "{} {}", x(names[0]), x(names[1]));
    }
}
