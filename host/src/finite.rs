//! Non-finite values are errors where they appear, never numbers in a result: a NaN
//! similarity compares false with everything, so an evaluator would otherwise rank every right
//! answer first and report a perfect score for a diverged model.

use candle_core::{DType, Tensor};

use crate::runtime::params::ParamStore;

/// Whether every value of `t` is finite. `t - t` is 0 where `t` is finite and NaN where it is
/// NaN or infinite, so its sum is finite exactly when all of `t` is: two ops and one read,
/// on the tensor's own device. Integer tensors are always finite.
pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    if !t.dtype().is_float() || t.elem_count() == 0 {
        return Ok(true);
    }
    let sum = t.sub(t)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(sum.is_finite())
}

/// Parameters holding NaN or infinity: the first one's name and how many there are.
pub fn non_finite_params(params: &ParamStore) -> candle_core::Result<Option<(String, usize)>> {
    let mut first = None;
    let mut count = 0;
    for p in params.iter() {
        if !all_finite(p.var.as_tensor())? {
            count += 1;
            first.get_or_insert_with(|| p.name.clone());
        }
    }
    Ok(first.map(|f| (f, count)))
}

/// An error when a named input of an evaluator (or any tensor a result is computed from)
/// holds non-finite values.
pub fn check_inputs(inputs: &[(&str, &Tensor)]) -> anyhow::Result<()> {
    for (name, t) in inputs {
        if !all_finite(t)? {
            anyhow::bail!(
                "`{name}` holds NaN or infinite values, so no score is computed from it: the model's weights \
                 diverged or its inputs are broken"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn every_kind_of_non_finite_value_is_found() {
        let ok = Tensor::new(&[1e30f32, -1e30, 0.0, 3.5], &Device::Cpu).unwrap();
        assert!(all_finite(&ok).unwrap(), "large finite values whose sum overflows are still finite");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[[1.0f32, 2.0], [bad, 4.0]], &Device::Cpu).unwrap();
            assert!(!all_finite(&t).unwrap(), "{bad}");
            assert!(!all_finite(&t.to_dtype(DType::BF16).unwrap()).unwrap(), "{bad} in bf16");
        }
        assert!(all_finite(&Tensor::new(&[1u32, 2], &Device::Cpu).unwrap()).unwrap());
    }

    #[test]
    fn evaluator_inputs_are_named() {
        let good = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        let bad = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
        let e = check_inputs(&[("image_embeds", &good), ("text_embeds", &bad)]).unwrap_err().to_string();
        assert!(e.starts_with("`text_embeds` holds NaN"), "{e}");
    }
}
