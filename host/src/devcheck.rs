//! `recall device-check`: every host op, forward and backward, on a device and dtype against
//! CPU f32. A plugin's numbers on a GPU can only be as right as the ops under them; this is the
//! table that says so, op by op (`scripts/gpu-check.sh` runs it on CUDA).
//!
//! Each case draws its inputs from a fixed seed, runs `y = op(inputs)` and the backward pass of
//! `sum(y * w)` (a fixed random `w`, so every output element weighs differently), and reports
//! the largest relative difference `max |a - b| / max |b|` of the output and of each input's
//! gradient against the same computation on the CPU in f32.

use candle_core::{DType, Device, Tensor, Var};

use crate::runtime::ops;

/// One op's agreement with the CPU f32 reference.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpReport {
    pub op: String,
    pub forward: f64,
    /// Worst input gradient (absent for ops without gradients, e.g. argmax).
    pub backward: Option<f64>,
}

type OpFn = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

struct Case {
    name: String,
    /// (shape, kind): `Pos` inputs are strictly positive (log, sqrt, recip, powf).
    inputs: Vec<(Vec<usize>, Kind)>,
    f: OpFn,
    differentiable: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    Normal,
    Pos,
    /// Integer ids below the bound (index_select, gather, embedding), not differentiated.
    Ids(u32),
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    // A small LCG: the same numbers on every platform, no dependency on rand's algorithms.
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn cases() -> Vec<Case> {
    use recall_sdk::abi::{binary as bi, reduce as r, unary as u};
    let n = |s: &[usize]| (s.to_vec(), Kind::Normal);
    let p = |s: &[usize]| (s.to_vec(), Kind::Pos);
    let mut out: Vec<Case> = Vec::new();
    let mut add = |name: &str, inputs: Vec<(Vec<usize>, Kind)>, f: OpFn| {
        let differentiable = inputs.iter().any(|(_, k)| !matches!(k, Kind::Ids(_)));
        out.push(Case { name: name.to_string(), inputs, f, differentiable })
    };
    for (name, code, positive) in [
        ("exp", u::EXP, false),
        ("log", u::LOG, true),
        ("sqrt", u::SQRT, true),
        ("neg", u::NEG, false),
        ("abs", u::ABS, false),
        ("relu", u::RELU, false),
        ("gelu", u::GELU, false),
        ("gelu_tanh", u::GELU_TANH, false),
        ("quick_gelu", u::QUICK_GELU, false),
        ("tanh", u::TANH, false),
        ("sigmoid", u::SIGMOID, false),
        ("sqr", u::SQR, false),
        ("recip", u::RECIP, true),
        ("silu", u::SILU, false),
    ] {
        let input = if positive { p(&[4, 8]) } else { n(&[4, 8]) };
        add(name, vec![input], Box::new(move |x| ops::unary(code, &x[0])));
    }
    for (name, code) in [
        ("add", bi::ADD),
        ("sub", bi::SUB),
        ("mul", bi::MUL),
        ("div", bi::DIV),
        ("maximum", bi::MAXIMUM),
        ("minimum", bi::MINIMUM),
    ] {
        let rhs = if code == bi::DIV { p(&[1, 8]) } else { n(&[1, 8]) };
        add(&format!("{name} (broadcast)"), vec![n(&[4, 8]), rhs], Box::new(move |x| ops::binary(code, &x[0], &x[1])));
    }
    add("affine", vec![n(&[4, 8])], Box::new(|x| x[0].affine(1.7, -0.3)));
    add("powf", vec![p(&[4, 8])], Box::new(|x| x[0].powf(1.5)));
    add("clamp", vec![n(&[4, 8])], Box::new(|x| x[0].clamp(-0.5f32, 0.5f32)));
    add("matmul (batched)", vec![n(&[2, 4, 8]), n(&[2, 8, 5])], Box::new(|x| ops::matmul(&x[0], &x[1])));
    add("linear", vec![n(&[2, 4, 8]), n(&[6, 8]), n(&[6])], Box::new(|x| ops::linear(&x[0], &x[1], Some(&x[2]))));
    for (name, code) in [("sum", r::SUM), ("mean", r::MEAN), ("max", r::MAX), ("min", r::MIN)] {
        add(
            &format!("reduce {name}"),
            vec![n(&[3, 4, 8])],
            Box::new(move |x| ops::reduce(code, &x[0], &[1, 2], false)),
        );
    }
    add("softmax", vec![n(&[4, 8])], Box::new(|x| ops::softmax(&x[0], 1)));
    add("log_softmax", vec![n(&[4, 8])], Box::new(|x| ops::log_softmax(&x[0], 1)));
    add("layer_norm", vec![n(&[2, 4, 8]), n(&[8]), n(&[8])], Box::new(|x| ops::layer_norm(&x[0], &x[1], &x[2], 1e-5)));
    add(
        "reshape+permute+narrow",
        vec![n(&[2, 3, 8])],
        Box::new(|x| ops::reshape(&x[0], &[2, -1, 4])?.permute((0, 2, 1))?.narrow(2, 1, 4)),
    );
    add("cat", vec![n(&[2, 3]), n(&[2, 5])], Box::new(|x| Tensor::cat(&[&x[0], &x[1]], 1)));
    add(
        "index_select",
        vec![n(&[6, 4]), (vec![5], Kind::Ids(6))],
        Box::new(|x| x[0].index_select(&x[1].to_dtype(DType::U32)?, 0)),
    );
    add(
        "gather",
        vec![n(&[4, 6]), (vec![4, 2], Kind::Ids(6))],
        Box::new(|x| x[0].gather(&x[1].to_dtype(DType::U32)?.contiguous()?, 1)),
    );
    add(
        "embedding",
        vec![n(&[10, 4]), (vec![2, 3], Kind::Ids(10))],
        Box::new(|x| ops::embedding(&x[0], &x[1].to_dtype(DType::U32)?)),
    );
    add("broadcast_as", vec![n(&[1, 4])], Box::new(|x| x[0].broadcast_as((3, 4))?.contiguous()));
    add(
        "patch_embed",
        vec![n(&[2, 3, 8, 8]), n(&[6, 3, 4, 4]), n(&[6])],
        Box::new(|x| ops::patch_embed(&x[0], &x[1], Some(&x[2]), 4)),
    );
    add(
        "conv2d 3x3 (padding 1)",
        vec![n(&[2, 3, 6, 6]), n(&[4, 3, 3, 3]), n(&[4])],
        Box::new(|x| ops::conv2d(&x[0], &x[1], Some(&x[2]), 1, 1)),
    );
    add(
        "pad + conv2d 3x3 (stride 2)",
        vec![n(&[2, 3, 6, 6]), n(&[4, 3, 3, 3])],
        Box::new(|x| ops::conv2d(&ops::pad_zeros(&ops::pad_zeros(&x[0], 2, 0, 1)?, 3, 0, 1)?, &x[1], None, 2, 0)),
    );
    add(
        "group_norm",
        vec![n(&[2, 8, 3, 3]), n(&[8]), n(&[8])],
        Box::new(|x| ops::group_norm(&x[0], 4, &x[1], &x[2], 1e-6)),
    );
    add("upsample_nearest2d", vec![n(&[2, 3, 3, 3])], Box::new(|x| ops::upsample_nearest2d(&x[0], 2)?.contiguous()));
    for (name, causal) in [("attention", false), ("attention (causal)", true)] {
        add(
            name,
            vec![n(&[2, 2, 5, 4]), n(&[2, 2, 5, 4]), n(&[2, 2, 5, 4])],
            Box::new(move |x| ops::attention(&x[0], &x[1], &x[2], causal, None, 0.5)),
        );
    }
    add(
        "attention (padding mask)",
        vec![n(&[2, 2, 5, 4]), n(&[2, 2, 5, 4]), n(&[2, 2, 5, 4])],
        Box::new(|x| {
            let mask = Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], x[0].device())?;
            ops::attention(&x[0], &x[1], &x[2], false, Some(&mask), 0.5)
        }),
    );
    add("l2_normalize", vec![n(&[4, 8])], Box::new(|x| ops::l2_normalize(&x[0])));
    add(
        "cross_entropy",
        vec![n(&[5, 7]), (vec![5], Kind::Ids(7))],
        Box::new(|x| ops::cross_entropy(&x[0], &x[1].to_dtype(DType::U32)?)),
    );
    add("clip_loss", vec![n(&[6, 8]), n(&[6, 8]), p(&[1])], Box::new(|x| ops::clip_loss(&x[0], &x[1], &x[2])));
    add("argmax (forward only)", vec![n(&[4, 8])], Box::new(|x| x[0].detach().argmax(1)?.to_dtype(DType::F32)));
    if let Some(argmax) = out.last_mut() {
        argmax.differentiable = false;
    }
    out
}

/// max |a - b| / max |b| (absolute below 1e-6 in magnitude).
fn rel(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let d = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1e-6);
    Ok(d / s)
}

/// Output and input gradients of `case` on `device` in `dtype`.
fn run(case: &Case, device: &Device, dtype: DType, seed: u64) -> candle_core::Result<(Tensor, Vec<Option<Tensor>>)> {
    let mut vars = Vec::new();
    let mut inputs = Vec::new();
    for (i, (shape, kind)) in case.inputs.iter().enumerate() {
        let count: usize = shape.iter().product();
        let v = values(count, seed * 31 + i as u64);
        let t = match kind {
            Kind::Normal => Tensor::from_vec(v, shape.as_slice(), device)?,
            Kind::Pos => Tensor::from_vec(v.iter().map(|x| x.abs() + 0.5).collect(), shape.as_slice(), device)?,
            Kind::Ids(bound) => {
                let ids: Vec<f32> = v.iter().map(|x| ((x.abs() * 1000.0) as u32 % bound) as f32).collect();
                Tensor::from_vec(ids, shape.as_slice(), device)?
            }
        };
        match kind {
            Kind::Ids(_) => {
                vars.push(None);
                inputs.push(t);
            }
            _ => {
                let var = Var::from_tensor(&t.to_dtype(dtype)?)?;
                inputs.push(var.as_tensor().clone());
                vars.push(Some(var));
            }
        }
    }
    let y = (case.f)(&inputs)?;
    let grads = if case.differentiable && y.dtype() != DType::U32 {
        let w = Tensor::from_vec(values(y.elem_count(), seed ^ 0xbeef), y.dims(), device)?.to_dtype(y.dtype())?;
        let g = y.mul(&w)?.sum_all()?.backward()?;
        vars.iter().map(|v| v.as_ref().and_then(|v| g.get(v.as_tensor()).cloned())).collect()
    } else {
        vars.iter().map(|_| None).collect()
    };
    Ok((y, grads))
}

/// Every op on `device` in `dtype` against CPU f32.
pub fn check(device: &Device, dtype: DType) -> anyhow::Result<Vec<OpReport>> {
    let mut reports = Vec::new();
    for (i, case) in cases().iter().enumerate() {
        let seed = 1000 + i as u64;
        let (ry, rg) = run(case, &Device::Cpu, DType::F32, seed)?;
        let (y, g) = run(case, device, dtype, seed).map_err(|e| anyhow::anyhow!("{} on {device:?}: {e}", case.name))?;
        let forward = rel(&y, &ry)?;
        let mut backward: Option<f64> = None;
        for (a, b) in g.iter().zip(&rg) {
            if let (Some(a), Some(b)) = (a, b) {
                let r = rel(a, b)?;
                backward = Some(backward.map_or(r, |w| w.max(r)));
            }
        }
        reports.push(OpReport { op: case.name.clone(), forward, backward });
    }
    Ok(reports)
}

/// The tolerance a dtype is held to.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-4,
        _ => 3e-2,
    }
}

/// The report as a table; returns it and whether every op is within tolerance.
pub fn table(reports: &[OpReport], tol: f64) -> (String, bool) {
    let mut s = format!("{:<28} {:>12} {:>12}  within {tol:e}\n", "op", "forward", "backward");
    let mut all = true;
    for r in reports {
        let ok = r.forward <= tol && r.backward.is_none_or(|b| b <= tol);
        all &= ok;
        let back = r.backward.map(|b| format!("{b:.2e}")).unwrap_or_else(|| "-".into());
        s.push_str(&format!("{:<28} {:>12.2e} {:>12}  {}\n", r.op, r.forward, back, if ok { "ok" } else { "FAIL" }));
    }
    (s, all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_runs_and_differentiates_on_the_cpu() {
        let reports = check(&Device::Cpu, DType::F32).unwrap();
        assert!(reports.len() >= 40, "{}", reports.len());
        for r in &reports {
            assert_eq!(r.forward, 0.0, "{}: the same computation twice must agree exactly", r.op);
            if !r.op.contains("forward only") {
                assert!(r.backward.is_some(), "{}: no gradient reached the inputs", r.op);
            }
        }
    }

    #[test]
    fn a_lower_precision_is_measured_not_assumed() {
        // f64 against f32 differs by f32 rounding: small, but not zero.
        let reports = check(&Device::Cpu, DType::F64).unwrap();
        let worst = reports.iter().map(|r| r.forward).fold(0.0, f64::max);
        assert!(worst > 0.0 && worst < 1e-5, "{worst}");
        let (text, ok) = table(&reports, tolerance(DType::F64));
        assert!(ok && text.contains("attention (causal)"), "{text}");
    }
}
