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

#[test]
fn matmul_outputs_are_written_in_full_without_being_zeroed_first() {
    // Fill freed memory with NaN first, so an element the GEMM failed to write would show.
    for _ in 0..4 {
        drop(Tensor::full(f32::NAN, (64, 64), &Device::Cpu).unwrap().to_vec2::<f32>().unwrap());
    }
    let naive = |a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)| -> Vec<f32> {
        (0..m).flat_map(|i| (0..n).map(move |j| (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>())).collect()
    };
    for (m, k, n) in [(3, 5, 4), (17, 33, 9), (64, 64, 64), (1, 1, 1)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
        let got = t(&a, &[m, k]).matmul(&t(&b, &[k, n])).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = naive(&a, &b, (m, k, n));
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-4 * w.abs().max(1.0)), "{m}x{k}x{n}");
    }
    // Batched, with the batch folded into the rows (a shared right-hand side) and not.
    let a = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((2, 3, 4)).unwrap();
    let b = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap().reshape((4, 2)).unwrap();
    let folded = a.broadcast_matmul(&b).unwrap();
    let looped = a.matmul(&b.unsqueeze(0).unwrap().repeat((2, 1, 1)).unwrap()).unwrap();
    assert_eq!(folded.to_vec3::<f32>().unwrap(), looped.to_vec3::<f32>().unwrap());
    assert!(folded.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    // An empty inner dimension is a product of zeros.
    let z = Tensor::zeros((3, 0), DType::F32, &Device::Cpu)
        .unwrap()
        .matmul(&Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap());
    assert_eq!(z.unwrap().to_vec2::<f32>().unwrap(), vec![vec![0.0; 2]; 3]);
}

#[test]
fn gradients_are_computed_untracked_and_so_are_not_detached_into_second_tensors() {
    // y = sum((x W)^2): every gradient backward makes is a plain value (no recorded op), so
    // its detach is the same tensor, and the forward's tensors are not kept alive by it.
    let w = Var::from_tensor(&t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2])).unwrap();
    let x = Var::from_tensor(&t(&[0.5, -1.0, 2.0, 1.0, 0.0, -0.5], &[2, 3])).unwrap();
    let y = x.as_tensor().matmul(w.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap();
    let grads = y.backward().unwrap();
    for v in [&x, &w] {
        let g = grads.get(v.as_tensor()).unwrap();
        assert_eq!(g.detach().id(), g.id(), "a gradient carries the op that made it");
    }
    // After backward, ops on tracked tensors record again.
    let z = x.as_tensor().affine(2.0, 0.0).unwrap();
    assert_ne!(z.detach().id(), z.id(), "tracking stayed paused after backward");
}

#[test]
fn the_thread_count_is_computed_once_not_read_from_proc_on_every_call() {
    // /proc/self/io's rchar counts the bytes this process has read. Uncached, the default
    // thread count (RAYON_NUM_THREADS unset) parsed /proc/cpuinfo on every call.
    let rchar = || -> u64 {
        let io = std::fs::read_to_string("/proc/self/io").unwrap();
        io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
    };
    let n = candle_core::utils::get_num_threads();
    let (r1, r2) = (rchar(), rchar());
    for _ in 0..100 {
        assert_eq!(candle_core::utils::get_num_threads(), n);
    }
    let r3 = rchar();
    // One read of /proc/self/io is the baseline; 100 parses of /proc/cpuinfo would be far more.
    assert!(r3 - r2 <= (r2 - r1) + 4096, "100 calls read {} bytes", r3 - r2 - (r2 - r1));
}
