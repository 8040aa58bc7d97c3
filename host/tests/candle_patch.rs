//! The patched candle-core's autograd (third_party/candle-core/PATCH.md), one test per
//! change. Alone in its process: the tensor counter is global.

use candle_core::{DType, Device, Tensor, Var};
use recall_host::runtime::counters::tensors_created;

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn autograd_stores_first_gradients_as_they_are_and_none_for_untracked_inputs() {
    // 1. y = sum(x * 2): the gradient of x is the one tensor the affine's backward makes.
    let x = Var::from_tensor(&t(&[1.0, -2.0, 3.0], &[3])).unwrap();
    let y = x.as_tensor().affine(2.0, 0.0).unwrap().sum_all().unwrap();
    let before = tensors_created();
    let grads = y.backward().unwrap();
    // Probe, ones (+ contiguous view), the sum's broadcast back, the affine: no zeros, no add.
    let made = tensors_created() - before;
    assert!(made <= 6, "backward of a two-op graph created {made} tensors");
    assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![2.0, 2.0, 2.0]);

    // 2. A frozen (untracked) weight in a matmul gets no gradient.
    let w = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]);
    let x = Var::from_tensor(&t(&[0.5, -1.0, 2.0, 1.0, 0.0, -0.5], &[2, 3])).unwrap();
    let y = x.as_tensor().matmul(&w).unwrap().sqr().unwrap().sum_all().unwrap();
    let grads = y.backward().unwrap();
    assert!(grads.get(&w).is_none(), "a constant operand got a gradient");

    // 3. ... and the variable's gradient is still exact: d/dx sum((xW)^2) = 2 (xW) W^T.
    let xw = x.as_tensor().matmul(&w).unwrap();
    let want = (xw * 2.0).unwrap().matmul(&w.t().unwrap()).unwrap();
    let got = grads.get(x.as_tensor()).unwrap();
    let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "{diff}");

    // A tensor used twice still sums both paths: d/dx sum(x * x + x) = 2x + 1.
    let x = Var::from_tensor(&t(&[1.0, -1.0], &[2])).unwrap();
    let y = (x.as_tensor() * x.as_tensor()).unwrap().add(x.as_tensor()).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap().get(x.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(g.to_vec1::<f32>().unwrap(), vec![3.0, -1.0]);
}
