//! The self-contained HTML report of `recall compare --out DIR`: the comparison table, an
//! R-matrix heatmap per method, per-task retrieval curves and zero-shot curves across stages,
//! and bars of the summary metrics. Charts are SVG drawn with plotters and inlined, so the
//! file needs nothing else to open.

use plotters::prelude::*;

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

/// R[t][i] as a heatmap: rows are stages (0 = before training), columns tasks.
fn heatmap(c: &Curves, title: &str, m: &[Vec<f64>]) -> String {
    let (stages, tasks) = (m.len(), c.tasks.len());
    svg(120 + 90 * tasks as u32, 80 + 40 * stages as u32, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0..tasks, 0..stages)
            .map_err(|e| e.to_string())?;
        let names = c.tasks.clone();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(tasks)
            .y_labels(stages)
            .x_label_formatter(&|i| names.get(*i).cloned().unwrap_or_default())
            .y_label_formatter(&|t| if *t == 0 { "before".into() } else { format!("after {t}") })
            .draw()
            .map_err(|e| e.to_string())?;
        for (t, row) in m.iter().enumerate() {
            for (i, &v) in row.iter().enumerate() {
                let shade = if v.is_finite() { (v / 100.0).clamp(0.0, 1.0) } else { 0.0 };
                let fill = RGBColor(255 - (200.0 * shade) as u8, 255 - (120.0 * shade) as u8, 255);
                // Stage 0 at the top, as the matrix is written.
                let y = stages - 1 - t;
                chart
                    .draw_series(std::iter::once(Rectangle::new([(i, y), (i + 1, y + 1)], fill.filled())))
                    .map_err(|e| e.to_string())?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        if v.is_finite() { format!("{v:.1}") } else { "-".into() },
                        (i, y),
                        ("sans-serif", 13),
                    )))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    })
}

/// One line per series over stages 0..=T.
fn lines(title: &str, y_label: &str, series: &[(String, Vec<f64>)]) -> String {
    let stages = series.iter().map(|(_, v)| v.len()).max().unwrap_or(1).max(2);
    svg(640, 320, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..(stages - 1) as f64, 0f64..100f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("tasks trained")
            .y_desc(y_label)
            .x_labels(stages)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| e.to_string())?;
        for (k, (name, v)) in series.iter().enumerate() {
            let c = color(k);
            chart
                .draw_series(LineSeries::new(
                    v.iter().enumerate().filter(|(_, y)| y.is_finite()).map(|(x, y)| (x as f64, *y)),
                    c.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())
    })
}

/// One bar per method: the mean over seeds, with a ±1 std error bar where there are several.
fn bars(title: &str, values: &[(String, f64, f64)]) -> String {
    let n = values.len().max(1);
    let lo = values.iter().map(|(_, m, s)| m - s).fold(0f64, f64::min);
    let hi = values.iter().map(|(_, m, s)| m + s).fold(0f64, f64::max);
    let pad = ((hi - lo) * 0.1).max(1.0);
    svg(120 + 90 * n as u32, 300, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(45)
            .build_cartesian_2d((0..n).into_segmented(), (lo - pad)..(hi + pad))
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = values.iter().map(|(m, _, _)| m.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
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
    if !c.missing.is_empty() {
        body.push_str("<p>Missing runs:</p><ul>");
        for m in &c.missing {
            body.push_str(&format!("<li>{}</li>", html_escape(m)));
        }
        body.push_str("</ul>\n");
    }
    // Bars of the summary metrics.
    body.push_str("<h2>Summary metrics</h2>\n<p>Bars: mean over seeds; whiskers: ±1 std.</p>\n<div class=\"row\">");
    for (j, h) in c.headers.iter().enumerate() {
        if h == "trainable params" {
            continue;
        }
        let values: Vec<(String, f64, f64)> =
            c.rows.iter().filter_map(|(m, _, cells)| cells[j].map(|(mean, std)| (m.clone(), mean, std))).collect();
        if !values.is_empty() {
            body.push_str(&bars(h, &values));
        }
    }
    body.push_str("</div>\n");
    // Curves across stages.
    body.push_str("<h2>Across the task sequence</h2>\n<div class=\"row\">");
    let avg_series: Vec<(String, Vec<f64>)> = c
        .curves
        .iter()
        .map(|k| (k.method.clone(), k.i2t.iter().zip(&k.t2i).map(|(a, b)| (row_mean(a) + row_mean(b)) / 2.0).collect()))
        .collect();
    body.push_str(&lines("mean R@1 over all tasks (both directions)", "R@1 %", &avg_series));
    if let Some(first) = c.curves.first() {
        for (s, set) in first.heldout_sets.iter().enumerate() {
            let series: Vec<(String, Vec<f64>)> = c
                .curves
                .iter()
                .map(|k| (k.method.clone(), k.zeroshot.iter().map(|r| r.get(s).copied().unwrap_or(f64::NAN)).collect()))
                .collect();
            body.push_str(&lines(&format!("zero-shot top-1: {set}"), "top-1 %", &series));
        }
    }
    body.push_str("</div>\n");
    // Per method: the R matrices and per-task curves.
    for k in &c.curves {
        body.push_str(&format!("<h2>{}</h2>\n<div class=\"row\">", html_escape(&k.method)));
        body.push_str(&heatmap(k, "I2T R@1: R[t][i]", &k.i2t));
        body.push_str(&heatmap(k, "T2I R@1: R[t][i]", &k.t2i));
        let per_task: Vec<(String, Vec<f64>)> = k
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), k.i2t.iter().map(|r| r.get(i).copied().unwrap_or(f64::NAN)).collect()))
            .collect();
        body.push_str(&lines("I2T R@1 per task", "R@1 %", &per_task));
        body.push_str("</div>\n");
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
         body{{font-family:sans-serif;margin:24px}} table{{border-collapse:collapse}} \
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}} \
         .row{{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}}</style></head>\n<body>\n{body}</body></html>\n",
        html_escape(title)
    )
}
