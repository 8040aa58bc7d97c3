//! The embedded default dataset: coloured geometric shapes with captions, generated from a
//! seed. It needs no download, so the quickstart runs offline on any machine.
//!
//! Each image shows one shape of one colour at one of four positions on a noisy dark
//! background, e.g. "a red circle on the left". The test split holds exactly one image per
//! (colour, shape, position) combination, so every test caption is unique and retrieval has a
//! single right answer; the training split holds `train_per_combo` jittered images per
//! combination. Different shape sets or styles make distinct tasks.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::image::ImageSource;
use super::TaskSection;
use super::{Example, TaskData};

/// Shape names the generator draws.
pub const SHAPES: [&str; 8] = ["circle", "square", "triangle", "cross", "ring", "diamond", "star", "heart"];
/// Colour names and their RGB values.
pub const COLORS: [(&str, [f32; 3]); 8] = [
    ("red", [0.9, 0.12, 0.1]),
    ("green", [0.1, 0.8, 0.2]),
    ("blue", [0.15, 0.3, 0.95]),
    ("yellow", [0.95, 0.9, 0.1]),
    ("magenta", [0.9, 0.1, 0.85]),
    ("cyan", [0.1, 0.85, 0.9]),
    ("white", [0.95, 0.95, 0.95]),
    ("orange", [0.95, 0.55, 0.05]),
];
/// Positions: caption phrase and centre offset as a fraction of the image side.
pub const POSITIONS: [(&str, [f32; 2]); 4] = [
    ("on the left", [-0.22, 0.0]),
    ("on the right", [0.22, 0.0]),
    ("at the top", [0.0, -0.22]),
    ("at the bottom", [0.0, 0.22]),
];

/// Whether a point (in units of the shape's radius, centred) lies inside the shape.
fn inside(shape: &str, x: f32, y: f32) -> bool {
    let r = (x * x + y * y).sqrt();
    match shape {
        "circle" => r < 1.0,
        "square" => x.abs().max(y.abs()) < 0.8,
        "triangle" => y < 0.8 && y > -0.9 && x.abs() < (y + 0.9) / 1.7 * 0.95,
        "cross" => (x.abs() < 0.3 && y.abs() < 0.95) || (y.abs() < 0.3 && x.abs() < 0.95),
        "ring" => r < 1.0 && r > 0.55,
        "diamond" => x.abs() + y.abs() < 1.0,
        "star" => {
            let a = y.atan2(x);
            r < 0.45 + 0.55 * (0.5 + 0.5 * (5.0 * a + std::f32::consts::FRAC_PI_2).cos()).powf(3.0)
        }
        "heart" => {
            let (x, y) = (x * 1.1, -y * 1.1 + 0.2);
            let v = x * x + y * y - 0.6;
            v * v * v - x * x * y * y * y < 0.0
        }
        _ => false,
    }
}

/// Check a task's shape/colour/style names.
pub fn validate(t: &TaskSection) -> Result<(), String> {
    if t.shapes.is_empty() {
        return Err(format!("task `{}` lists no shapes; available: {}", t.name, SHAPES.join(", ")));
    }
    for s in &t.shapes {
        if !SHAPES.contains(&s.as_str()) {
            return Err(format!("unknown shape `{s}` in task `{}`; available: {}", t.name, SHAPES.join(", ")));
        }
    }
    for c in &t.colors {
        if !COLORS.iter().any(|(n, _)| n == c) {
            let names: Vec<&str> = COLORS.iter().map(|(n, _)| *n).collect();
            return Err(format!("unknown colour `{c}` in task `{}`; available: {}", t.name, names.join(", ")));
        }
    }
    if t.colors.is_empty() {
        return Err(format!("task `{}` lists no colours", t.name));
    }
    if !matches!(t.style.as_str(), "filled" | "outline") {
        return Err(format!("unknown style `{}` in task `{}`; available: filled, outline", t.style, t.name));
    }
    if t.train_per_combo == 0 {
        return Err(format!("task `{}`: train_per_combo must be at least 1", t.name));
    }
    Ok(())
}

fn render(
    shape: &str,
    rgb: [f32; 3],
    offset: [f32; 2],
    style: &str,
    size: usize,
    jitter: bool,
    rng: &mut StdRng,
) -> Vec<f32> {
    let s = size as f32;
    let (mut cx, mut cy) = (s / 2.0 + offset[0] * s, s / 2.0 + offset[1] * s);
    let mut radius = s * 0.2;
    let mut color = rgb;
    if jitter {
        cx += rng.random_range(-0.05..0.05) * s;
        cy += rng.random_range(-0.05..0.05) * s;
        radius *= rng.random_range(0.8..1.15);
        for c in &mut color {
            *c = (*c + rng.random_range(-0.08..0.08)).clamp(0.0, 1.0);
        }
    }
    let bg = if jitter { rng.random_range(0.05..0.2) } else { 0.12 };
    let mut px = vec![0f32; 3 * size * size];
    for yi in 0..size {
        for xi in 0..size {
            // Four sub-samples per pixel for soft edges.
            let mut cover = 0.0;
            for (sx, sy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let x = (xi as f32 + sx - cx) / radius;
                let y = (yi as f32 + sy - cy) / radius;
                let hit = inside(shape, x, y) && (style == "filled" || !inside(shape, x / 0.6, y / 0.6));
                cover += if hit { 0.25 } else { 0.0 };
            }
            let noise = if jitter { rng.random_range(-0.04..0.04) } else { 0.0 };
            for c in 0..3 {
                let v = bg * (1.0 - cover) + color[c] * cover + noise;
                px[c * size * size + yi * size + xi] = v.clamp(0.0, 1.0);
            }
        }
    }
    px
}

/// Generate a task's splits. Deterministic in (`seed`, task config).
pub fn generate(t: &TaskSection, image_size: usize, seed: u64) -> TaskData {
    let name_hash = t.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut rng = StdRng::seed_from_u64(seed ^ name_hash);
    let mut train = Vec::new();
    let mut test = Vec::new();
    for color in &t.colors {
        let rgb = COLORS.iter().find(|(n, _)| n == color).map(|(_, c)| *c).unwrap_or([1.0; 3]);
        for shape in &t.shapes {
            for (pos, offset) in POSITIONS {
                let caption = if t.style == "outline" {
                    format!("a {color} outlined {shape} {pos}")
                } else {
                    format!("a {color} {shape} {pos}")
                };
                test.push(Example {
                    image: bytes(&render(shape, rgb, offset, &t.style, image_size, false, &mut rng), image_size),
                    captions: vec![caption.clone()],
                    class: Some(shape.clone()),
                    id: format!("shapes:{}/test/{}", t.name, test.len()),
                    shard: None,
                });
                for _ in 0..t.train_per_combo {
                    train.push(Example {
                        image: bytes(&render(shape, rgb, offset, &t.style, image_size, true, &mut rng), image_size),
                        captions: vec![caption.clone()],
                        class: Some(shape.clone()),
                        id: format!("shapes:{}/train/{}", t.name, train.len()),
                        shard: None,
                    });
                }
            }
        }
    }
    let templates = if t.templates.is_empty() { vec!["a {}".to_string()] } else { t.templates.clone() };
    TaskData {
        name: t.name.clone(),
        image_size,
        train,
        val: Vec::new(),
        test,
        classes: t.shapes.clone(),
        templates,
        skipped: Vec::new(),
        on_error: t.on_error,
        order: t.epoch_order(),
    }
}

/// CHW values in [0, 1] -> an RGB image held in memory, rounded to bytes as a saved PNG
/// would be.
fn bytes(chw: &[f32], size: usize) -> ImageSource {
    let plane = size * size;
    let byte = |v: f32| (v * 255.0).round().clamp(0.0, 255.0) as u8;
    let img = image::RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let i = y as usize * size + x as usize;
        image::Rgb([byte(chw[i]), byte(chw[plane + i]), byte(chw[2 * plane + i])])
    });
    ImageSource::Memory(std::sync::Arc::new(img))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskSection {
        let mut t: TaskSection = toml::from_str("name = \"t\"").unwrap();
        t.shapes = vec!["circle".into(), "cross".into()];
        t.colors = vec!["red".into(), "blue".into()];
        t.train_per_combo = 2;
        t
    }

    #[test]
    fn deterministic_unique_test_captions() {
        let a = generate(&task(), 32, 7);
        let b = generate(&task(), 32, 7);
        assert_eq!(a.train.len(), 2 * 2 * 4 * 2);
        assert_eq!(a.test.len(), 16);
        assert_eq!(a.train[3].eval_pixels(32).unwrap(), b.train[3].eval_pixels(32).unwrap());
        let mut caps: Vec<&String> = a.test.iter().map(|e| &e.captions[0]).collect();
        caps.sort();
        caps.dedup();
        assert_eq!(caps.len(), 16);
    }

    #[test]
    fn shapes_are_drawn() {
        for s in SHAPES {
            let mut rng = StdRng::seed_from_u64(0);
            let px = render(s, [1.0, 0.0, 0.0], [0.0, 0.0], "filled", 32, false, &mut rng);
            let lit = px[..32 * 32].iter().filter(|&&v| v > 0.5).count();
            assert!(lit > 20, "{s} drew only {lit} pixels");
        }
    }
}
