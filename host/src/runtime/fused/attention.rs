//! Multi-head attention on [B, L, H * Dh] tensors, the layout linear layers produce, without
//! splitting the heads into a [B, H, L, Dh] copy: head h of batch row b is the column block
//! h * Dh .. (h + 1) * Dh of `x[b]`, read in place with a row stride of H * Dh.
//!
//! Two kernels, each one GEMM per (batch row, head), serve forward and backward:
//! - [`HeadScores`]: `S_bh = X_bh Y_bh^T` -> [B, H, M, N] (the scores `q k^T`; backward's
//!   `dP = dO v^T`);
//! - [`HeadsApply`]: `out_bh = A_bh X_bh` (or `A_bh^T X_bh`) -> [B, M, H * Dh] (the output
//!   `P v`; backward's `dq = dS k`, `dk = dS^T q`, `dv = P^T dO`).
//!
//! Between them the scaled, masked softmax of [`super::softmax`] saves the probabilities; its
//! backward is the one softmax-backward kernel. The batch rows run in parallel; each GEMM
//! is small (L x L x Dh) and runs on its thread.

use super::gemm::{gemm_into, Strided};
use super::{output_buffer, same_dtype, slice, Real};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The [B, L, W] dims of a head-packed input, W divisible by `heads`.
fn packed_dims(op: &str, l: &Layout, heads: usize) -> Result<(usize, usize, usize)> {
    match *l.dims() {
        [b, len, w] if heads > 0 && w % heads == 0 => Ok((b, len, w)),
        ref other => bail!("{op}: expected [B, L, H * Dh] with {heads} heads, got {other:?}"),
    }
}

/// `S_bh = X_bh Y_bh^T`: X [B, M, W], Y [B, N, W] -> [B, H, M, N].
pub(super) struct HeadScores {
    pub heads: usize,
}

impl CustomOp2 for HeadScores {
    fn name(&self) -> &'static str {
        "attention_scores"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype("attention_scores", s1, s2)?;
        let (b, m, w) = packed_dims("attention_scores", l1, self.heads)?;
        let (b2, n, w2) = packed_dims("attention_scores", l2, self.heads)?;
        if (b2, w2) != (b, w) {
            bail!("attention_scores: inputs {:?} and {:?} differ in batch or width", l1.dims(), l2.dims());
        }
        let h = self.heads;
        fn go<T: Real>(
            s: [(&CpuStorage, &Layout); 2],
            (h, m, n, w): (usize, usize, usize, usize),
        ) -> Result<CpuStorage> {
            let [x, y] = s.map(|(s, l)| slice::<T>("attention_scores", s, l));
            let (x, y) = (x?, y?);
            let dh = w / h;
            let mut out = output_buffer((x.len() / (m * w).max(1)) * h * m * n);
            out.par_chunks_mut((h * m * n).max(1)).enumerate().for_each(|(b, out)| {
                for head in 0..h {
                    gemm_into(
                        (m, n, dh),
                        (out, Strided { offset: head * m * n, rs: n, cs: 1 }),
                        (x, Strided { offset: b * m * w + head * dh, rs: w, cs: 1 }),
                        (y, Strided { offset: b * n * w + head * dh, rs: 1, cs: w }),
                        false,
                    );
                }
            });
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = by_dtype!("attention_scores", s1, go([(s1, l1), (s2, l2)], (h, m, n, w)))?;
        Ok((out, Shape::from((b, h, m, n))))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, _s: &Tensor, ds: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = ds.contiguous()?;
        let dx = ds.apply_op2_no_bwd(y, &HeadsApply { heads: self.heads, transpose: false })?;
        let dy = ds.apply_op2_no_bwd(x, &HeadsApply { heads: self.heads, transpose: true })?;
        Ok((Some(dx), Some(dy)))
    }
}

/// `out_bh = A_bh X_bh` with A [B, H, M, N] and X [B, N, W] -> [B, M, W]; with `transpose`,
/// `out_bh = A_bh^T X_bh` with X [B, M, W] -> [B, N, W].
pub(super) struct HeadsApply {
    pub heads: usize,
    pub transpose: bool,
}

impl CustomOp2 for HeadsApply {
    fn name(&self) -> &'static str {
        "attention_apply"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype("attention_apply", s1, s2)?;
        let (b, h, m, n) = match *l1.dims() {
            [b, h, m, n] if h == self.heads => (b, h, m, n),
            ref other => bail!("attention_apply: expected weights [B, {}, M, N], got {other:?}", self.heads),
        };
        // A_bh (rows x inner) as stored, or transposed.
        let (rows, inner) = if self.transpose { (n, m) } else { (m, n) };
        let (b2, k, w) = packed_dims("attention_apply", l2, h)?;
        if (b2, k) != (b, inner) {
            bail!("attention_apply: weights {:?} do not fit values {:?}", l1.dims(), l2.dims());
        }
        let transpose = self.transpose;
        fn go<T: Real>(
            s: [(&CpuStorage, &Layout); 2],
            (h, m, n, w, transpose): (usize, usize, usize, usize, bool),
        ) -> Result<CpuStorage> {
            let [a, x] = s.map(|(s, l)| slice::<T>("attention_apply", s, l));
            let (a, x) = (a?, x?);
            let dh = w / h;
            let (rows, inner) = if transpose { (n, m) } else { (m, n) };
            let batch = a.len() / (h * m * n).max(1);
            let mut out = output_buffer(batch * rows * w);
            out.par_chunks_mut((rows * w).max(1)).enumerate().for_each(|(b, out)| {
                for head in 0..h {
                    let base = (b * h + head) * m * n;
                    let a_bh = if transpose {
                        Strided { offset: base, rs: 1, cs: n }
                    } else {
                        Strided { offset: base, rs: n, cs: 1 }
                    };
                    gemm_into(
                        (rows, dh, inner),
                        (out, Strided { offset: head * dh, rs: w, cs: 1 }),
                        (a, a_bh),
                        (x, Strided { offset: b * inner * w + head * dh, rs: w, cs: 1 }),
                        false,
                    );
                }
            });
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = by_dtype!("attention_apply", s1, go([(s1, l1), (s2, l2)], (h, m, n, w, transpose)))?;
        Ok((out, Shape::from((b, rows, w))))
    }

    fn bwd(&self, a: &Tensor, x: &Tensor, _out: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let scores = HeadScores { heads: self.heads };
        let (da, dx) = if self.transpose {
            // out = A^T X: dA = X g^T, dX = A g.
            (
                x.apply_op2_no_bwd(&g, &scores)?,
                a.apply_op2_no_bwd(&g, &HeadsApply { heads: self.heads, transpose: false })?,
            )
        } else {
            // out = A X: dA = g X^T, dX = A^T g.
            (
                g.apply_op2_no_bwd(x, &scores)?,
                a.apply_op2_no_bwd(&g, &HeadsApply { heads: self.heads, transpose: true })?,
            )
        };
        Ok((Some(da), Some(dx)))
    }
}

/// Fused multi-head attention: q [B, Lq, W], k and v [B, Lk, W] (W = heads x Dh) ->
/// [B, Lq, W]; `padding` is [B, Lk] with 1 for keys to attend to. The caller has checked that
/// [`applies`](super::applies) and the shapes.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    padding: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let scores = q.contiguous()?.apply_op2(&k.contiguous()?, HeadScores { heads })?;
    let p = super::softmax::masked_softmax(&scores, scale, causal, padding)?;
    p.apply_op2(&v.contiguous()?, HeadsApply { heads, transpose: false })
}

#[cfg(test)]
mod tests {
    use crate::runtime::fused::testing::agree;
    use crate::runtime::ops::{self, tests::grad_check, tests::randt};
    use candle_core::{Device, Tensor};

    /// The same attention through [B, H, L, Dh] views and the composed ops.
    fn split_heads_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        causal: bool,
        padding: Option<&Tensor>,
    ) -> Tensor {
        let split = |t: &Tensor| {
            let (b, l, w) = t.dims3().unwrap();
            t.reshape((b, l, heads, w / heads)).unwrap().transpose(1, 2).unwrap()
        };
        let scores = ops::matmul(&split(q), &split(k).t().unwrap()).unwrap();
        let p = ops::attention_probabilities_composed(&scores, causal, padding, 0.4).unwrap();
        let y = ops::matmul(&p, &split(v)).unwrap();
        let (b, h, l, dh) = y.dims4().unwrap();
        y.transpose(1, 2).unwrap().contiguous().unwrap().reshape((b, l, h * dh)).unwrap()
    }

    #[test]
    fn attention_heads_gradients_match_finite_differences_and_the_split_heads_attention() {
        let pad = Tensor::from_vec(vec![1u32, 1, 0, 1, 0, 1, 1, 1, 1, 1], (2, 5), &Device::Cpu).unwrap();
        for (causal, padding) in [(false, None), (true, None), (false, Some(&pad)), (true, Some(&pad))] {
            // Lq = 3 < Lk = 5: the causal window is aligned to the end.
            let (q, k, v) = (randt(&[2, 3, 6], 71), randt(&[2, 5, 6], 72), randt(&[2, 5, 6], 73));
            grad_check("fused attention_heads", &[q.clone(), k.clone(), v.clone()], |t| {
                super::attention_heads(&t[0], &t[1], &t[2], 2, causal, padding, 0.4)
            });
            agree(
                "attention_heads",
                &[(q * 3.0).unwrap(), k, v],
                |t| super::attention_heads(&t[0], &t[1], &t[2], 2, causal, padding, 0.4).unwrap(),
                |t| split_heads_attention(&t[0], &t[1], &t[2], 2, causal, padding),
            );
        }
    }

    #[test]
    fn mismatched_head_layouts_are_errors_naming_the_op() {
        let err = super::attention_heads(
            &randt(&[2, 3, 6], 1),
            &randt(&[2, 5, 6], 2),
            &randt(&[2, 5, 6], 3),
            4,
            false,
            None,
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("attention_scores: expected [B, L, H * Dh] with 4 heads, got [2, 3, 6]"), "{err}");
        let err = super::attention_heads(
            &randt(&[2, 3, 6], 1),
            &randt(&[1, 5, 6], 2),
            &randt(&[1, 5, 6], 3),
            2,
            false,
            None,
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("attention_scores: inputs [2, 3, 6] and [1, 5, 6] differ in batch or width"), "{err}");
    }
}
