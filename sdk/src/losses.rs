//! Losses several strategies share, composed from host ops (so they differentiate through the
//! one host graph).

use crate::error::Result;
use crate::tensor::Tensor;

/// CLIP's logits: `exp(logit_scale) * img_n @ txt_n^T` with L2-normalised features.
pub fn clip_logits(img: &Tensor, txt: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    img.l2_normalize(1e-12)?.matmul(&txt.l2_normalize(1e-12)?.t()?)?.mul(&logit_scale.exp()?)
}

/// Batch-mean `KL(softmax(teacher / T) || softmax(student / T))` over rows, times `T^2`
/// (knowledge distillation as LwF and ZSCL compute it).
pub fn distill(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let n = student.dim(0)? as f64;
    let log_s = student.scale(1.0 / t)?.log_softmax(1)?;
    let log_t = teacher.scale(1.0 / t)?.log_softmax(1)?;
    let p_t = log_t.exp()?;
    p_t.mul(&log_t.sub(&log_s)?)?.sum_all()?.scale(t * t / n)
}

/// Distillation in both directions (image->text on the rows, text->image on the columns),
/// summed, or averaged when `average` is set.
pub fn distill_both_ways(student: &Tensor, teacher: &Tensor, t: f64, average: bool) -> Result<Tensor> {
    let both = distill(student, teacher, t)?.add(&distill(&student.t()?, &teacher.t()?, t)?)?;
    both.scale(if average { 0.5 } else { 1.0 })
}

/// CLIP's contrastive loss: cross-entropy of the logits against the diagonal, image->text on
/// the rows and text->image on the columns, averaged (what the host's task loss computes).
pub fn clip_loss(img: &Tensor, txt: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    let logits = clip_logits(img, txt, logit_scale)?;
    let n = logits.dim(0)?;
    let labels = logits.host().tensor_u32(&(0..n as u32).collect::<Vec<_>>(), &[n])?;
    logits.cross_entropy(&labels)?.add(&logits.t()?.cross_entropy(&labels)?)?.scale(0.5)
}

/// Mean squared error over every element (PyTorch's `F.mse_loss`, mean reduction).
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = a.sub(b)?;
    d.mul(&d)?.mean_all()
}
