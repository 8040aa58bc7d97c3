//! The evaluator plugins on splits larger than one block of similarities: retrieval and
//! zero-shot scores computed block by block equal those of the whole matrix, ranked here
//! independently, so bounding evaluation's memory changed no number.

use candle_core::{DType, Device, Tensor};
use recall_host::loader::load_plugin;
use recall_host::plugin::EvaluatorInstance;
use recall_host::runtime::Runtime;
use recall_tests::cdylib;

fn evaluator(name: &str) -> EvaluatorInstance {
    let p = load_plugin(&cdylib(name)).unwrap();
    let rt = Runtime::new(Device::Cpu, DType::F32, 0);
    EvaluatorInstance::create(&p, &rt, "ks = [1, 5, 10]").unwrap()
}

/// Four of `d` positions set to one, chosen by `seed`: every such vector has norm 2, so
/// normalised similarities are multiples of 1/4, exact in any summation order (the plugin's
/// GEMM and the plain loops here agree bit for bit, ties included).
fn pattern(seed: u64, d: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    let mut v = vec![0f32; d];
    let mut set = 0;
    while set < 4 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let k = (state % d as u64) as usize;
        if v[k] == 0.0 {
            v[k] = 1.0;
            set += 1;
        }
    }
    v
}

fn rows(seeds: impl Iterator<Item = u64>, d: usize) -> Tensor {
    let v: Vec<Vec<f32>> = seeds.map(|s| pattern(s, d)).collect();
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn normalized(x: &Tensor) -> Vec<Vec<f32>> {
    let n = x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    x.broadcast_div(&n).unwrap().to_vec2().unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Percent of queries whose best right answer has fewer than k wrong answers at or above it.
fn recall(ranks: &[usize], k: usize) -> f64 {
    100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
}

fn get(m: &[(String, f64)], name: &str) -> f64 {
    m.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name} in {m:?}")).1
}

#[test]
fn retrieval_in_blocks_equals_ranking_the_whole_matrix() {
    // 1,500 images x 6,000 texts: 9M similarities, more than one block (8M) either way.
    let (n_img, per_image, d) = (1_500usize, 4usize, 24usize);
    // Each image's first caption has the image's pattern; the others are unrelated.
    let img = rows(0..n_img as u64, d);
    let txt = rows(
        (0..n_img * per_image).map(|t| if t % per_image == 0 { (t / per_image) as u64 } else { 1 << 32 | t as u64 }),
        d,
    );
    let index: Vec<u32> = (0..n_img * per_image).map(|t| (t / per_image) as u32).collect();
    // Images in groups of three (as class captions group them).
    let group: Vec<u32> = (0..n_img as u32).map(|i| i - i % 3).collect();
    let e = evaluator("recall-plugin-retrieval");
    let idx = Tensor::from_vec(index.clone(), index.len(), &Device::Cpu).unwrap();
    let grp = Tensor::from_vec(group.clone(), group.len(), &Device::Cpu).unwrap();
    let got = e
        .evaluate(&[("image_embeds", &img), ("text_embeds", &txt), ("text_image_index", &idx), ("image_group", &grp)])
        .unwrap();

    let (a, b) = (normalized(&img), normalized(&txt));
    let sims: Vec<Vec<f32>> = a.iter().map(|x| b.iter().map(|y| dot(x, y)).collect()).collect();
    let same = |i: usize, t: usize| group[i] == group[index[t] as usize];
    let i2t: Vec<usize> = (0..n_img)
        .map(|i| {
            let best = (0..b.len()).filter(|&t| same(i, t)).map(|t| sims[i][t]).fold(f32::MIN, f32::max);
            (0..b.len()).filter(|&t| !same(i, t) && sims[i][t] >= best).count()
        })
        .collect();
    let t2i: Vec<usize> = (0..b.len())
        .map(|t| {
            let best = (0..n_img).filter(|&i| same(i, t)).map(|i| sims[i][t]).fold(f32::MIN, f32::max);
            (0..n_img).filter(|&i| !same(i, t) && sims[i][t] >= best).count()
        })
        .collect();
    for k in [1, 5, 10] {
        let (want_i2t, want_t2i) = (recall(&i2t, k), recall(&t2i, k));
        assert!((get(&got, &format!("i2t_r{k}")) - want_i2t).abs() < 1e-9, "i2t R@{k}: {got:?} vs {want_i2t}");
        assert!((get(&got, &format!("t2i_r{k}")) - want_t2i).abs() < 1e-9, "t2i R@{k}: {got:?} vs {want_t2i}");
    }
    assert!(get(&got, "i2t_r1") > 5.0 && get(&got, "i2t_r1") < 95.0, "a test that can tell blocks apart: {got:?}");

    // A NaN in the last block is still refused, named by its place in the whole matrix.
    let mut poisoned = img.to_vec2::<f32>().unwrap();
    poisoned[n_img - 1][0] = f32::NAN;
    let poisoned = Tensor::new(poisoned, &Device::Cpu).unwrap();
    let e2 = e.evaluate(&[("image_embeds", &poisoned), ("text_embeds", &txt), ("text_image_index", &idx)]);
    let msg = e2.unwrap_err().to_string();
    assert!(
        msg.contains("6000 of 9000000 similarities are not finite") && msg.contains("image 1499 and text 0"),
        "{msg}"
    );
}

#[test]
fn zero_shot_in_blocks_equals_scoring_the_whole_matrix() {
    // 9,000 images x 1,000 classes: more than one block.
    let (n, classes, d) = (9_000usize, 1_000usize, 16usize);
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7) % classes as u32).collect();
    // Two images in three carry their class's pattern; the rest are unrelated.
    let img = rows((0..n).map(|i| if i % 3 == 0 { 1 << 32 | i as u64 } else { labels[i] as u64 }), d);
    let cls = rows(0..classes as u64, d);
    let lab = Tensor::from_vec(labels.clone(), n, &Device::Cpu).unwrap();
    let got = evaluator("recall-plugin-zeroshot")
        .evaluate(&[("image_embeds", &img), ("class_embeds", &cls), ("labels", &lab)])
        .unwrap();
    let (a, c) = (normalized(&img), normalized(&cls));
    let ranks: Vec<usize> = (0..n)
        .map(|i| {
            let right = dot(&a[i], &c[labels[i] as usize]);
            (0..classes).filter(|&k| k != labels[i] as usize && dot(&a[i], &c[k]) >= right).count()
        })
        .collect();
    for k in [1, 5, 10] {
        assert!((get(&got, &format!("top{k}")) - recall(&ranks, k)).abs() < 1e-9, "top{k}: {got:?}");
    }
}
