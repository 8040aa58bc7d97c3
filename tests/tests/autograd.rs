//! Cross-boundary autograd: a loss composed through cdylib plugins backpropagates into host
//! parameters, with the same gradients as the computation written directly against candle.

use candle_core::Tensor;
use recall_host::bench::both_paths;
use recall_host::config;
use recall_host::data;
use recall_host::loader::{search_path, Registry};
use recall_host::model::Model;
use recall_host::reference::TowerShape;
use recall_host::runtime::ops;
use recall_tests::SMALL_EXPERIMENT;

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f64> = a.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap();
    let scale = a.iter().chain(&b).fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).fold(0.0, f64::max)
}

#[test]
fn plugin_gradients_equal_direct_candle_gradients() {
    let cfg = config::parse(SMALL_EXPERIMENT, "small.toml").unwrap();
    let model = Model::build(&cfg, &Registry::discover(&search_path(&[]))).unwrap();
    let rt = model.runtime.clone();
    let task = recall_host::engine::load_tasks(&cfg, &model.preprocess).unwrap().remove(0);
    let examples: Vec<&data::Example> = task.train.iter().take(6).collect();
    let pixels = data::pixel_batch(&examples, &model.preprocess, rt.device(), rt.float_dtype()).unwrap();
    let captions: Vec<String> = examples.iter().map(|e| e.captions[0].clone()).collect();
    let (ids, mask) = model.tokenize(&captions).unwrap();
    let shape = TowerShape { heads: 2, quick_gelu: true, eps: 1e-5 };
    let [(pi, pt), (di, dt)] = both_paths(&model, &pixels, &ids, &mask, shape).unwrap();
    assert!(max_rel(&pi, &di) <= 1e-6, "image features differ");
    assert!(max_rel(&pt, &dt) <= 1e-6, "text features differ");

    let g_plugin = ops::clip_loss(&pi, &pt, &model.logit_scale).unwrap().backward().unwrap();
    let g_direct = ops::clip_loss(&di, &dt, &model.logit_scale).unwrap().backward().unwrap();
    let params = rt.params();
    let mut checked = 0;
    for p in params.iter() {
        let a = g_plugin.get(p.var.as_tensor());
        let b = g_direct.get(p.var.as_tensor());
        match (a, b) {
            (Some(a), Some(b)) => {
                let e = max_rel(a, b);
                assert!(e <= 1e-6, "gradient of {} differs: relative error {e:e}", p.name);
                checked += 1;
            }
            (None, None) => {}
            _ => panic!("gradient of {} reached only one path", p.name),
        }
    }
    // Every parameter of both towers (and logit_scale) receives a gradient.
    assert_eq!(checked, params.len(), "only {checked} of {} parameters got gradients", params.len());
}
