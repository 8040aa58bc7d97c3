//! `recall compare --out`'s report as a reader sees it: rendered by a real headless Chromium
//! (Debian's `chromium`, which `.ci/run` installs), the screenshot's R-matrix heatmap has the
//! stage-0 row on top in the colour of its value, and the HTML report draws it too.

use std::path::{Path, PathBuf};
use std::process::Command;

use recall_tests::recall_bin;

fn chromium() -> PathBuf {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().map(PathBuf::from).find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("`chromium` is missing: this test needs `apt-get install chromium` (.ci/run installs it)")
    })
}

/// A run directory with a finished run's summary: R@1 both ways over two tasks, in which
/// stage 0 (before training) on the first task holds the largest value.
fn run_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let cell = |i2t: f64| serde_json::json!({"retrieval/i2t_r1": i2t, "retrieval/t2i_r1": i2t / 2.0});
    let rows = [[90.0, 10.0], [50.0, 20.0], [30.0, 60.0]].map(|r| r.map(cell));
    let continual = serde_json::json!({"last": 45.0, "avg": 40.0, "avg_mtil": 40.0, "bwt": -20.0, "forgetting": 20.0, "fwt": null, "transfer": 0.0});
    let summary = serde_json::json!({
        "seed": 0, "trainable_parameters": 10, "batch_size": 8, "train_seconds": 1.0,
        "continual": {"retrieval/i2t_r1": continual, "retrieval/t2i_r1": continual},
        "results": {"tasks": ["digits", "textiles"], "rows": rows},
        "epoch_losses": [[3.0, 2.5], [2.8, 2.2]],
    });
    std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    std::fs::write(dir.join("run.json"), r#"{"method": "finetune", "seed": 0}"#).unwrap();
    dir
}

/// A PNG screenshot of `url` at `width` x `height` CSS pixels, one device pixel each.
fn screenshot(url: &str, width: u32, height: u32, tmp: &Path) -> image::RgbaImage {
    let out = tmp.join(format!("shot-{width}x{height}.png"));
    let profile = tempfile::tempdir().unwrap();
    let status = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--screenshot={}", out.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(out.is_file(), "no screenshot: {}", String::from_utf8_lossy(&status.stderr));
    image::open(&out).unwrap().to_rgba8()
}

/// Every `<rect ... />` of an SVG as (x, y, width, height, fill).
fn rects(svg: &str) -> Vec<(f64, f64, f64, f64, String)> {
    let attr = |tag: &str, name: &str| {
        tag.split(&format!(" {name}=\"")).nth(1).and_then(|v| v.split('"').next()).map(String::from)
    };
    svg.split("<rect")
        .skip(1)
        .filter_map(|t| {
            let tag = t.split("/>").next()?;
            let num = |n| attr(tag, n)?.parse::<f64>().ok();
            Some((num("x")?, num("y")?, num("width")?, num("height")?, attr(tag, "fill")?))
        })
        .collect()
}

/// The pixel that shows a heatmap cell's colour in an image drawn at `scale`: left of the
/// cell's centred value label, in its upper quarter.
fn cell_pixel(img: &image::RgbaImage, (x, y, w, h): (f64, f64, f64, f64), scale: f64) -> image::Rgba<u8> {
    *img.get_pixel((scale * (x + w / 2.0 - 12.0)) as u32, (scale * (y + h / 4.0)) as u32)
}

fn hex(c: &image::Rgba<u8>) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0[0], c.0[1], c.0[2])
}

#[test]
fn the_heatmap_as_chromium_draws_it_has_stage_0_on_top_in_its_colour() {
    let tmp = tempfile::tempdir().unwrap();
    let run = run_dir(tmp.path(), "finetune-seed0");
    let out = tmp.path().join("report");
    let status = Command::new(recall_bin()).arg("compare").arg(&run).arg("--out").arg(&out).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));

    // The standalone figure: the cells as the SVG places them, the pixels as Chromium draws them.
    let figure = out.join("figures/finetune-i2t-r1-matrix.svg");
    let svg = std::fs::read_to_string(&figure).unwrap();
    let cells: Vec<_> = rects(&svg).into_iter().skip(1).take(6).collect();
    let (x, y, w, h, fill) = cells[0].clone();
    assert!(cells.iter().all(|c| c.1 >= y), "the first cell (stage 0, digits) is the top row: {cells:?}");
    let shot = screenshot(&format!("file://{}", figure.display()), 700, 300, tmp.path());
    let centre = |x: f64, y: f64, w: f64, h: f64| cell_pixel(&shot, (x, y, w, h), 1.0);
    assert_eq!(hex(&centre(x, y, w, h)), fill.to_uppercase(), "the top-left cell as drawn");
    // 90 is the maximum: the top of the viridis scale, a yellow; the bottom-left (30) is not.
    let top = centre(x, y, w, h);
    assert!(top.0[0] > 200 && top.0[1] > 200 && top.0[2] < 100, "stage 0's 90.0 should be yellow: {}", hex(&top));
    let (bx, by, bw, bh, _) = cells[4].clone();
    assert_ne!(hex(&centre(bx, by, bw, bh)), hex(&top), "another value, another colour");

    // The HTML report draws the same heatmap: its top-left colour appears on the page.
    let page = screenshot(&format!("file://{}", out.join("compare.html").display()), 1400, 2400, tmp.path());
    let want = fill.to_uppercase();
    let hits = page.pixels().filter(|p| hex(p) == want).count();
    assert!(hits > 500, "the report's heatmap cell ({want}) is drawn: {hits} pixels");
}

/// Each standalone figure also comes as a PNG at twice the SVG's size: the heatmap's top-left
/// cell is drawn in stage 0's colour, and its text (title, values) is drawn in a font.
#[test]
fn png_figures_match_their_svgs_at_twice_the_size() {
    let tmp = tempfile::tempdir().unwrap();
    let run = run_dir(tmp.path(), "finetune-seed0");
    let out = tmp.path().join("report");
    let status = Command::new(recall_bin()).arg("compare").arg(&run).arg("--out").arg(&out).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let svgs: Vec<PathBuf> = std::fs::read_dir(out.join("figures"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .collect();
    assert!(svgs.len() >= 3, "{svgs:?}");
    for svg in &svgs {
        let png = image::open(svg.with_extension("png")).unwrap_or_else(|e| panic!("{}: {e}", svg.display()));
        let text = std::fs::read_to_string(svg).unwrap();
        let dim = |name: &str| -> u32 {
            text.split(&format!("{name}=\"")).nth(1).unwrap().split('"').next().unwrap().parse().unwrap()
        };
        assert_eq!((png.width(), png.height()), (2 * dim("width"), 2 * dim("height")), "{}", svg.display());
    }
    let figure = out.join("figures/finetune-i2t-r1-matrix.svg");
    let (x, y, w, h, fill) = rects(&std::fs::read_to_string(&figure).unwrap())[1].clone();
    let png = image::open(figure.with_extension("png")).unwrap().to_rgba8();
    let at = cell_pixel(&png, (x, y, w, h), 2.0);
    assert_eq!(hex(&at), fill.to_uppercase(), "the top-left cell as the PNG draws it");
    // Text: the title band above the cells holds dark (glyph) pixels.
    let dark = (0..png.width())
        .flat_map(|px| (0..(2.0 * y) as u32).map(move |py| (px, py)))
        .filter(|&(px, py)| png.get_pixel(px, py).0[..3].iter().all(|&c| c < 90))
        .count();
    assert!(dark > 50, "no text drawn above the heatmap ({dark} dark pixels): are fonts installed?");
}
