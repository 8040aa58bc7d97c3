//! The tensor counter against candle's numbering, alone in its process: any other test
//! running beside it would create tensors of its own.

use candle_core::{DType, Device, Tensor};
use recall_host::runtime::counters::tensors_created;

#[test]
fn the_tensor_count_grows_by_the_tensors_an_op_creates() {
    let a = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let before = tensors_created();
    let b = (&a + &a).unwrap();
    let _c = (b.sqr().unwrap() * 2.0).unwrap();
    // The probe of `before`, three op outputs (add, sqr, affine), then the probe of `after`.
    assert_eq!(tensors_created() - before, 4);
}
