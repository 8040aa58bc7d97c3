//! The composite tensor operations behind the host-function table, written against candle.
//!
//! Each is composed of candle primitives that have backward passes, so the one autograd graph
//! differentiates through them; each has a finite-difference gradient test below. The direct
//! (in-host) reference models use the same functions, which keeps the plugin path and the
//! direct path computing identical graphs.

use candle_core::{DType, Device, Result, Tensor, D};

/// `x * sigmoid(1.702 x)` (OpenAI CLIP): fused where a kernel serves it.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if super::fused::applies(x) {
        return super::fused::quick_gelu(x);
    }
    quick_gelu_composed(x)
}

/// QuickGELU of candle primitives.
pub fn quick_gelu_composed(x: &Tensor) -> Result<Tensor> {
    x.mul(&sigmoid(&x.affine(1.702, 0.0)?)?)
}

/// Exact GELU, `x/2 (1 + erf(x/sqrt 2))`: fused where a kernel serves it.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::fused::applies(x) {
        return super::fused::gelu(x);
    }
    gelu_erf_composed(x)
}

/// Exact GELU composed, so that its gradient is exact (candle's own `gelu_erf` backward uses
/// a 6-digit constant).
pub fn gelu_erf_composed(x: &Tensor) -> Result<Tensor> {
    (x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)?.mul(x)?.affine(0.5, 0.0)
}

/// Tanh-approximated GELU, composed for an exact gradient.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let inner = (x + x.sqr()?.mul(x)?.affine(0.044715, 0.0)?)?.affine((2.0 / std::f64::consts::PI).sqrt(), 0.0)?;
    (inner.tanh()? + 1.0)?.mul(x)?.affine(0.5, 0.0)
}

/// Logistic sigmoid, `1 / (1 + e^-x)`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Softmax along `dim`: fused along the last dimension where a kernel serves it.
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    if super::fused::applies(x) && x.rank() >= 2 && dim + 1 == x.rank() {
        return super::fused::scaled_softmax(x, 1.0, false);
    }
    softmax_composed(x, dim)
}

/// Softmax of candle primitives, shifted by the (detached) maximum for stability.
pub fn softmax_composed(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)
}

/// Log-softmax along `dim`: fused along the last dimension where a kernel serves it.
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    if super::fused::applies(x) && dim + 1 == x.rank() {
        return super::fused::log_softmax(x);
    }
    log_softmax_composed(x, dim)
}

/// Log-softmax of candle primitives.
pub fn log_softmax_composed(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(dim)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Layer norm over the last dimension (biased variance, as PyTorch): fused where a kernel
/// serves it.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(0);
    if weight.dims() != [n] || bias.dims() != [n] {
        candle_core::bail!(
            "layer_norm: x is {:?}, weight {:?}, bias {:?}; weight and bias must be [{n}]",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    if super::fused::applies(x) && weight.dtype() == x.dtype() && bias.dtype() == x.dtype() && n > 0 {
        return super::fused::layer_norm(x, weight, bias, eps);
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// Layer norm of candle primitives.
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// `x W^T + b` with W: [out, in], broadcasting over x's leading dims: one GEMM, then the bias
/// (fused where a kernel serves it, its gradient a column sum).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_plus(x, weight, bias, &[])
}

/// [`linear`] plus adapter deltas (each broadcast to the output): the bias and one delta
/// are added in one fused pass where a kernel serves them.
pub fn linear_plus(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, deltas: &[Tensor]) -> Result<Tensor> {
    let y = if super::fused::linear::applies(x, weight) {
        super::fused::matmul_nt(x, weight)?
    } else {
        matmul(x, &weight.t()?)?
    };
    let fused = |t: &Tensor| super::fused::applies(&y) && t.dtype() == y.dtype();
    let mut y = match (bias, deltas) {
        (Some(b), [d]) if fused(b) && fused(d) && d.dims() == y.dims() => {
            return super::fused::bias_delta_add(&y, b, d)
        }
        (Some(b), _) if fused(b) => super::fused::bias_add(&y, b)?,
        (Some(b), _) => y.broadcast_add(b)?,
        (None, _) => y,
    };
    for d in deltas {
        y = y.broadcast_add(d)?;
    }
    Ok(y)
}

/// Batched matmul with broadcasting over leading dims. A matrix on the right (a linear
/// layer's weight) takes one GEMM over all of the left's rows, as PyTorch's linear does:
/// broadcasting the matrix instead would run one small GEMM per leading index forward and
/// sum a broadcast gradient backward.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    // A matrix on the right that is a transposed row-major one (`x.matmul(&w.t())`, as a
    // LoRA factor is applied) is read in place by the fused product.
    let reads_in_place = |a: &Tensor| super::fused::applies(a) && a.is_contiguous() && a.dtype() == b.dtype();
    if b.rank() == 2 && a.rank() >= 1 && !b.is_contiguous() && transpose_is_contiguous(b) && reads_in_place(a) {
        return super::fused::matmul_nt(a, &b.t()?);
    }
    if a.rank() > 2 && b.rank() == 2 {
        let (lead, k) = a.dims().split_at(a.rank() - 1);
        let rows = lead.iter().product::<usize>();
        let y = matmul_ready(&a.reshape((rows, k[0]))?)?.matmul(&matmul_ready(b)?)?;
        let mut dims = lead.to_vec();
        dims.push(b.dim(1)?);
        return y.reshape(dims);
    }
    matmul_ready(a)?.broadcast_matmul(&matmul_ready(b)?)
}

/// candle's matmul takes row-major operands and transposes of row-major ones; anything else
/// (e.g. heads split by a transpose) is copied into a contiguous layout first.
fn matmul_ready(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() || transpose_is_contiguous(x) {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// Whether `x.t()` would be contiguous, read off the layout: building the transpose to ask
/// created a tensor per matmul (a tenth of a step's tensors).
fn transpose_is_contiguous(x: &Tensor) -> bool {
    let r = x.rank();
    if r < 2 {
        return false;
    }
    let (mut dims, mut stride) = (x.dims().to_vec(), x.stride().to_vec());
    dims.swap(r - 2, r - 1);
    stride.swap(r - 2, r - 1);
    candle_core::Shape::from(dims).is_contiguous(&stride)
}

/// Non-overlapping patch embedding: [B, C, H, W] x [D, C, P, P] -> [B, N, D], a stride-P
/// convolution written as unfold + matmul (exact, and differentiable through reshapes).
pub fn patch_embed(pixels: &Tensor, weight: &Tensor, bias: Option<&Tensor>, patch: usize) -> Result<Tensor> {
    let (b, c, h, w) = pixels.dims4()?;
    let (d, wc, p1, p2) = weight.dims4()?;
    if wc != c || p1 != patch || p2 != patch {
        candle_core::bail!(
            "patch_embed: weight shape [{d}, {wc}, {p1}, {p2}] does not fit {c} channels and patch {patch}"
        );
    }
    if patch == 0 || !h.is_multiple_of(patch) || !w.is_multiple_of(patch) {
        candle_core::bail!("patch_embed: image {h}x{w} is not divisible by patch {patch}");
    }
    let (gh, gw) = (h / patch, w / patch);
    let cols = pixels.reshape((b, c, gh, patch, gw, patch))?.permute((0, 2, 4, 1, 3, 5))?.contiguous()?.reshape((
        b,
        gh * gw,
        c * patch * patch,
    ))?;
    linear(&cols, &weight.reshape((d, c * patch * patch))?, bias)
}

/// torch's `conv2d` with one stride and one zero padding for both spatial dimensions:
/// x [B, Cin, H, W], weight [Cout, Cin, Kh, Kw], bias [Cout] -> [B, Cout, H', W'].
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (cout, wc, kh, kw) = weight.dims4()?;
    if wc != c {
        candle_core::bail!("conv2d: weight [{cout}, {wc}, {kh}, {kw}] takes {wc} input channels, the input has {c}");
    }
    if stride == 0 {
        candle_core::bail!("conv2d: stride must be at least 1");
    }
    if h + 2 * padding < kh || w + 2 * padding < kw {
        candle_core::bail!("conv2d: a {kh}x{kw} kernel does not fit a {h}x{w} input with padding {padding}");
    }
    // candle's CPU convolution has no bf16 kernel: there it runs in f32 and casts back (the
    // CPU's bf16 is for checking mixed precision, not for speed).
    let y = if x.device().is_cpu() && x.dtype() == DType::BF16 {
        x.to_dtype(DType::F32)?
            .conv2d(&weight.to_dtype(DType::F32)?.contiguous()?, padding, stride, 1, 1)?
            .to_dtype(DType::BF16)?
    } else {
        x.contiguous()?.conv2d(&weight.contiguous()?, padding, stride, 1, 1)?
    };
    match bias {
        Some(b) => {
            if b.dims() != [cout] {
                candle_core::bail!("conv2d: bias is {:?}, expected [{cout}]", b.dims());
            }
            y.broadcast_add(&b.reshape((1, cout, 1, 1))?)
        }
        None => Ok(y),
    }
}

/// Zeros added before and after dimension `dim` (torch's constant `F.pad`, one dimension).
pub fn pad_zeros(x: &Tensor, dim: usize, before: usize, after: usize) -> Result<Tensor> {
    if dim >= x.rank() {
        candle_core::bail!("pad_zeros: dimension {dim} out of range for a {:?} tensor", x.dims());
    }
    x.pad_with_zeros(dim, before, after)
}

/// torch's `nn.GroupNorm` on [B, C, ...]: mean and biased variance over each group of
/// `C / groups` channels and every position, then a per-channel affine.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 {
        candle_core::bail!("group_norm: expected [B, C, ...], got {dims:?}");
    }
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || !c.is_multiple_of(groups) {
        candle_core::bail!("group_norm: {c} channels are not divisible into {groups} groups");
    }
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!("group_norm: weight {:?} and bias {:?} must both be [{c}]", weight.dims(), bias.dims());
    }
    let grouped = x.reshape((b, groups, ()))?;
    let mean = grouped.mean_keepdim(2)?;
    let centered = grouped.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?;
    let mut channel = vec![1usize; dims.len()];
    channel[1] = c;
    normed.broadcast_mul(&weight.reshape(channel.as_slice())?)?.broadcast_add(&bias.reshape(channel.as_slice())?)
}

/// Nearest-neighbour upsampling of [B, C, H, W] by an integer `scale`, as a broadcast (so its
/// gradient sums each output block back into its source pixel).
pub fn upsample_nearest2d(x: &Tensor, scale: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if scale == 0 {
        candle_core::bail!("upsample_nearest2d: scale must be at least 1");
    }
    x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, scale, w, scale))?.reshape((b, c, h * scale, w * scale))
}

/// The additive value used for masked attention logits: finite, so a fully masked row gives
/// a uniform distribution rather than NaN.
fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        _ => -1e30,
    }
}

/// Scaled dot-product attention on [B, H, L, Dh]. `causal` masks keys after each query
/// (aligned to the end when Lk > Lq); `key_padding_mask` is [B, Lk] with 1 = attend. A query
/// left with no key at all (its batch row entirely padding) attends to nothing in the fused
/// CPU kernel (output 0) and uniformly in the composed form; every tower Recall ships keeps
/// at least its first token, so only a hand-made mask can meet the difference.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    key_padding_mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    q.dims4()?;
    let (b, _, lk, _) = k.dims4()?;
    let scores = matmul(q, &k.t()?)?;
    if let Some(m) = key_padding_mask {
        let (mb, mk) = m.dims2()?;
        if mb != b || mk != lk {
            candle_core::bail!("attention: key padding mask is [{mb}, {mk}], expected [{b}, {lk}]");
        }
    }
    if super::fused::applies(&scores) {
        // The fused softmax scales and applies both masks itself.
        return matmul(&super::fused::masked_softmax(&scores, scale, causal, key_padding_mask)?, v);
    }
    matmul(&attention_probabilities_composed(&scores, causal, key_padding_mask, scale)?, v)
}

/// Multi-head attention on head-packed inputs: q [B, Lq, H * Dh], k and v [B, Lk, H * Dh]
/// -> [B, Lq, H * Dh], as [`attention`] computes it per head. Where a kernel serves it, the
/// heads are read in place (no split into [B, H, L, Dh] copies and back); elsewhere it is
/// [`attention`] between a split and a merge of the heads.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    key_padding_mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, lq, w) = q.dims3()?;
    let (kb, lk, kw) = k.dims3()?;
    if heads == 0 || w % heads != 0 || (kb, kw) != (b, w) || v.dims() != k.dims() {
        candle_core::bail!(
            "attention_heads: q {:?}, k {:?}, v {:?} with {heads} heads; expected q [B, Lq, W], k and v [B, Lk, W], \
             W divisible by the heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if super::fused::applies(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        return super::fused::attention_heads(q, k, v, heads, causal, key_padding_mask, scale);
    }
    let split = |t: &Tensor, l: usize| t.reshape((b, l, heads, w / heads))?.transpose(1, 2);
    let y = attention(&split(q, lq)?, &split(k, lk)?, &split(v, lk)?, causal, key_padding_mask, scale)?;
    y.transpose(1, 2)?.contiguous()?.reshape((b, lq, w))
}

/// Attention's probabilities from its raw scores [B, H, Lq, Lk], of candle primitives: the
/// scale, a host-built causal mask, the padding mask, softmax.
pub fn attention_probabilities_composed(
    scores: &Tensor,
    causal: bool,
    key_padding_mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (_, _, lq, lk) = scores.dims4()?;
    let mut scores = scores.affine(scale, 0.0)?;
    let dtype = scores.dtype();
    if causal {
        let offset = lk.saturating_sub(lq);
        let mask: Vec<f32> =
            (0..lq).flat_map(|i| (0..lk).map(move |j| if j > i + offset { 1.0 } else { 0.0 })).collect();
        let mask =
            Tensor::from_vec(mask, (lq, lk), scores.device())?.to_dtype(dtype)?.affine(mask_value(dtype), 0.0)?;
        scores = scores.broadcast_add(&mask)?;
    }
    if let Some(m) = key_padding_mask {
        scores = scores.broadcast_add(&padding_additive(m, dtype)?)?;
    }
    softmax_composed(&scores, 3)
}

/// A key padding mask [B, Lk] (1 = attend) as additive logits [B, 1, 1, Lk].
fn padding_additive(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, lk) = mask.dims2()?;
    mask.to_dtype(dtype)?.affine(-mask_value(dtype), mask_value(dtype))?.reshape((b, 1, 1, lk))
}

/// Element-wise unary op by `recall_sdk::abi::unary` code.
pub fn unary(code: u32, x: &Tensor) -> Result<Tensor> {
    use recall_sdk::abi::unary as u;
    match code {
        u::EXP => x.exp(),
        u::LOG => x.log(),
        u::SQRT => x.sqrt(),
        u::NEG => x.neg(),
        u::ABS => x.abs(),
        u::RELU => x.relu(),
        u::GELU => gelu_erf(x),
        u::GELU_TANH => gelu_tanh(x),
        u::QUICK_GELU => quick_gelu(x),
        u::TANH => x.tanh(),
        u::SIGMOID => sigmoid(x),
        u::SQR => x.sqr(),
        u::RECIP => x.recip(),
        u::SILU => x.mul(&sigmoid(x)?),
        other => candle_core::bail!("unknown unary op code {other}: the plugin was built for a newer recall"),
    }
}

/// Broadcasting binary op by `recall_sdk::abi::binary` code.
pub fn binary(code: u32, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    use recall_sdk::abi::binary as bi;
    match code {
        bi::ADD => a.broadcast_add(b),
        bi::SUB => a.broadcast_sub(b),
        bi::MUL => a.broadcast_mul(b),
        bi::DIV => a.broadcast_div(b),
        bi::MAXIMUM => a.broadcast_maximum(b),
        bi::MINIMUM => a.broadcast_minimum(b),
        other => candle_core::bail!("unknown binary op code {other}: the plugin was built for a newer recall"),
    }
}

/// Reduction by `recall_sdk::abi::reduce` code over `dims`.
pub fn reduce(code: u32, x: &Tensor, dims: &[usize], keepdim: bool) -> Result<Tensor> {
    use recall_sdk::abi::reduce as r;
    let squeeze = |y: Tensor| -> Result<Tensor> {
        if keepdim {
            return Ok(y);
        }
        let mut sorted = dims.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        sorted.iter().rev().try_fold(y, |y, &d| y.squeeze(d))
    };
    match code {
        r::SUM => squeeze(x.sum_keepdim(dims)?),
        r::MEAN => squeeze(x.mean_keepdim(dims)?),
        r::MAX => reduce_extreme(x, dims, keepdim, true),
        r::MIN => reduce_extreme(x, dims, keepdim, false),
        other => candle_core::bail!("unknown reduce op code {other}: the plugin was built for a newer recall"),
    }
}

/// Reshape with at most one -1 entry.
pub fn reshape(x: &Tensor, shape: &[i64]) -> Result<Tensor> {
    let total = x.elem_count();
    let known: i64 = shape.iter().filter(|&&d| d != -1).product();
    let holes = shape.iter().filter(|&&d| d == -1).count();
    let dims: Vec<usize> = match holes {
        0 => shape.iter().map(|&d| d as usize).collect(),
        1 if known > 0 && total as i64 % known == 0 => {
            shape.iter().map(|&d| if d == -1 { (total as i64 / known) as usize } else { d as usize }).collect()
        }
        _ => candle_core::bail!("cannot reshape {:?} to {shape:?}", x.dims()),
    };
    if shape.iter().any(|&d| d < -1) {
        candle_core::bail!("cannot reshape {:?} to {shape:?}: negative dimension", x.dims());
    }
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    x.reshape(dims)
}

/// Look up rows of `table` ([V, D]) at `ids` (any shape) -> [..ids, D].
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, d) = table.dims2()?;
    let mut shape = ids.dims().to_vec();
    let flat = table.index_select(&ids.flatten_all()?, 0)?;
    shape.push(d);
    flat.reshape(shape)
}

/// Inverted dropout with a mask drawn by the caller's generator.
pub fn dropout_with_mask(x: &Tensor, keep: Vec<f32>, p: f64) -> Result<Tensor> {
    let mask = Tensor::from_vec(keep, x.dims(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)?.affine(1.0 / (1.0 - p), 0.0)
}

/// Maximum (or minimum) over several dims.
pub fn reduce_extreme(x: &Tensor, dims: &[usize], keepdim: bool, max: bool) -> Result<Tensor> {
    let mut sorted = dims.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut y = x.clone();
    for &d in sorted.iter().rev() {
        y = if max { y.max_keepdim(d)? } else { y.min_keepdim(d)? };
    }
    if keepdim {
        Ok(y)
    } else {
        let mut y = y;
        for &d in sorted.iter().rev() {
            y = y.squeeze(d)?;
        }
        Ok(y)
    }
}

/// CLIP's symmetric contrastive loss over L2-normalised features: mean of the image->text and
/// text->image cross-entropies of `exp(logit_scale) * img @ txt^T` against the diagonal.
pub fn clip_loss(image_features: &Tensor, text_features: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    let img = l2_normalize(image_features)?;
    let txt = l2_normalize(text_features)?;
    let logits = matmul(&img, &txt.t()?)?.broadcast_mul(&logit_scale.exp()?)?;
    let n = logits.dim(0)?;
    let labels = Tensor::arange(0u32, n as u32, logits.device())?;
    let i2t = cross_entropy(&logits, &labels)?;
    let t2i = cross_entropy(&logits.t()?, &labels)?;
    (i2t + t2i)? * 0.5
}

/// Mean cross-entropy of logits [N, C] against u32 class indices [N]: fused where a kernel
/// serves it.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if super::fused::applies(logits) {
        return super::fused::cross_entropy(logits, labels);
    }
    cross_entropy_composed(logits, labels)
}

/// Cross-entropy of candle primitives.
pub fn cross_entropy_composed(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_composed(logits, 1)?;
    let picked = logp.gather(&labels.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}

/// L2-normalise rows (last dim).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// A device from a config string: `cpu`, `cuda`, `cuda:N`.
pub fn device_from_name(name: &str) -> std::result::Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") || n == "auto" => {
            let ordinal = n.strip_prefix("cuda:").map(|s| s.parse::<usize>()).transpose();
            let ordinal =
                ordinal.map_err(|_| format!("invalid device `{n}`: expected `cpu`, `cuda` or `cuda:N`"))?.unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                if n == "auto" {
                    return Ok(Device::Cpu);
                }
                return Err(format!(
                    "device `{n}` was requested but this build of recall has no CUDA support; rebuild with `--features cuda` or set device = \"cpu\""
                ));
            }
            match Device::new_cuda(ordinal) {
                Ok(d) => Ok(d),
                // `auto` means "a GPU if there is one".
                Err(_) if n == "auto" => Ok(Device::Cpu),
                Err(e) => Err(format!(
                    "device `{n}`: no usable GPU ({e}); check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or set device = \"cpu\""
                )),
            }
        }
        other => Err(format!("invalid device `{other}`: expected `cpu`, `cuda`, `cuda:N` or `auto`")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn transpose_contiguity_is_read_off_the_layout_as_the_transpose_would_say() {
        let x = randt(&[2, 3, 4], 1);
        let views = [
            x.clone(),
            x.t().unwrap(),
            x.transpose(0, 1).unwrap(),
            x.permute((2, 0, 1)).unwrap(),
            x.narrow(2, 1, 2).unwrap().t().unwrap(),
            randt(&[3, 1], 2).t().unwrap(),
            randt(&[1, 5], 3),
            randt(&[5], 4),
        ];
        for v in &views {
            let expected = v.rank() >= 2 && v.t().unwrap().is_contiguous();
            assert_eq!(transpose_is_contiguous(v), expected, "{:?} {:?}", v.dims(), v.stride());
        }
    }

    /// Deterministic pseudo-random values (no rand dependency in tests).
    pub fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    pub fn randt(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()
    }

    /// Check d(sum(f(inputs) * r))/d(inputs) against central finite differences in f64.
    pub fn grad_check(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts).unwrap();
        let r = randt(out.dims(), 999);
        let loss = out.mul(&r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let eps = 1e-4;
        for (i, v) in vars.iter().enumerate() {
            let analytic: Vec<f64> = match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
                None => vec![0.0; v.elem_count()],
            };
            let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let eval = |vals: &[f64]| -> f64 {
                let mut ins: Vec<Tensor> = inputs.to_vec();
                ins[i] = Tensor::from_vec(vals.to_vec(), inputs[i].dims(), &Device::Cpu).unwrap();
                f(&ins).unwrap().mul(&r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
            };
            let mut max_err = 0f64;
            for j in 0..base.len() {
                let mut plus = base.clone();
                plus[j] += eps;
                let mut minus = base.clone();
                minus[j] -= eps;
                let numeric = (eval(&plus) - eval(&minus)) / (2.0 * eps);
                let err = (numeric - analytic[j]).abs() / numeric.abs().max(analytic[j].abs()).max(1e-3);
                max_err = max_err.max(err);
            }
            assert!(max_err <= 1e-4, "{name}: input {i}: max relative gradient error {max_err:e}");
        }
    }

    #[test]
    fn grad_softmax_and_log_softmax() {
        grad_check("softmax", &[randt(&[3, 5], 1)], |x| softmax(&x[0], 1));
        grad_check("softmax dim0", &[randt(&[3, 5], 2)], |x| softmax(&x[0], 0));
        grad_check("log_softmax", &[randt(&[3, 5], 3)], |x| log_softmax(&x[0], 1));
    }

    #[test]
    fn grad_layer_norm() {
        grad_check("layer_norm", &[randt(&[2, 3, 6], 4), randt(&[6], 5), randt(&[6], 6)], |x| {
            layer_norm(&x[0], &x[1], &x[2], 1e-5)
        });
    }

    #[test]
    fn grad_activations() {
        grad_check("quick_gelu", &[randt(&[4, 3], 7)], |x| quick_gelu(&x[0]));
        grad_check("sigmoid", &[randt(&[4, 3], 8)], |x| sigmoid(&x[0]));
    }

    #[test]
    fn grad_linear_and_matmul() {
        grad_check("linear", &[randt(&[2, 3, 4], 9), randt(&[5, 4], 10), randt(&[5], 11)], |x| {
            linear(&x[0], &x[1], Some(&x[2]))
        });
        grad_check("matmul batched", &[randt(&[2, 3, 4], 12), randt(&[4, 2], 13)], |x| matmul(&x[0], &x[1]));
    }

    #[test]
    fn grad_patch_embed() {
        grad_check("patch_embed", &[randt(&[2, 3, 4, 4], 14), randt(&[5, 3, 2, 2], 15), randt(&[5], 16)], |x| {
            patch_embed(&x[0], &x[1], Some(&x[2]), 2)
        });
    }

    #[test]
    fn patch_embed_equals_convolution() {
        let px = randt(&[1, 2, 4, 4], 17);
        let w = randt(&[3, 2, 2, 2], 18);
        let ours = patch_embed(&px, &w, None, 2).unwrap();
        let conv = px.conv2d(&w, 0, 2, 1, 1).unwrap().flatten_from(2).unwrap().transpose(1, 2).unwrap();
        let diff = (ours - conv).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn grad_conv2d_strides_and_padding() {
        let (x, w, b) = (randt(&[2, 3, 5, 5], 40), randt(&[4, 3, 3, 3], 41), randt(&[4], 42));
        grad_check("conv2d 3x3 pad 1", &[x.clone(), w.clone(), b.clone()], |t| conv2d(&t[0], &t[1], Some(&t[2]), 1, 1));
        grad_check("conv2d 3x3 stride 2", &[x.clone(), w.clone()], |t| conv2d(&t[0], &t[1], None, 2, 0));
        let w1 = randt(&[2, 3, 1, 1], 43);
        grad_check("conv2d 1x1", &[x.clone(), w1], |t| conv2d(&t[0], &t[1], None, 1, 0));
        // LlamaGen's downsampling: pad right and bottom by one, then a stride-2 3x3 convolution.
        let even = randt(&[1, 3, 4, 4], 44);
        grad_check("pad + conv2d stride 2", &[even, w], |t| {
            conv2d(&pad_zeros(&pad_zeros(&t[0], 2, 0, 1)?, 3, 0, 1)?, &t[1], None, 2, 0)
        });
    }

    #[test]
    fn conv2d_matches_a_hand_computed_sum() {
        // One output pixel of a padded 3x3 convolution, summed by hand.
        let x = randt(&[1, 2, 3, 3], 45);
        let w = randt(&[1, 2, 3, 3], 46);
        let y = conv2d(&x, &w, None, 1, 1).unwrap();
        assert_eq!(y.dims(), [1, 1, 3, 3]);
        let (xv, wv): (Vec<f64>, Vec<f64>) =
            (x.flatten_all().unwrap().to_vec1().unwrap(), w.flatten_all().unwrap().to_vec1().unwrap());
        // Output (0, 0): the kernel's top-left row and column fall on padding.
        let mut want = 0.0;
        for c in 0..2 {
            for (i, j) in [(1usize, 1usize), (1, 2), (2, 1), (2, 2)] {
                want += xv[c * 9 + (i - 1) * 3 + (j - 1)] * wv[c * 9 + i * 3 + j];
            }
        }
        let got: f64 = y.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!(conv2d(&x, &randt(&[1, 3, 3, 3], 47), None, 1, 1).unwrap_err().to_string().contains("input channels"));
    }

    #[test]
    fn grad_group_norm_and_upsample() {
        let (x, w, b) = (randt(&[2, 4, 3, 2], 48), randt(&[4], 49), randt(&[4], 50));
        grad_check("group_norm", &[x.clone(), w.clone(), b.clone()], |t| group_norm(&t[0], 2, &t[1], &t[2], 1e-6));
        grad_check("upsample_nearest2d", std::slice::from_ref(&x), |t| upsample_nearest2d(&t[0], 2));
        // One group per channel over a single position is all zeros before the affine.
        let one = group_norm(&randt(&[3, 4, 1, 1], 51), 4, &w, &b, 1e-6).unwrap();
        let want = b.reshape((1, 4, 1, 1)).unwrap().broadcast_as((3, 4, 1, 1)).unwrap();
        let diff = (one - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-9, "{diff}");
        // Groups of the whole channel dimension: layer norm over (C, H, W).
        let gn = group_norm(
            &x,
            1,
            &Tensor::ones(4, DType::F64, &Device::Cpu).unwrap(),
            &Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap(),
            1e-6,
        )
        .unwrap();
        let flat = x.reshape((2, 24)).unwrap();
        let ln = layer_norm(
            &flat,
            &Tensor::ones(24, DType::F64, &Device::Cpu).unwrap(),
            &Tensor::zeros(24, DType::F64, &Device::Cpu).unwrap(),
            1e-6,
        )
        .unwrap();
        let diff =
            (gn.reshape((2, 24)).unwrap() - ln).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "{diff}");
        assert!(group_norm(&x, 3, &w, &b, 1e-6).unwrap_err().to_string().contains("not divisible"));
        let up = upsample_nearest2d(&x, 2).unwrap();
        assert_eq!(up.dims(), [2, 4, 6, 4]);
        let (src, dst): (Vec<f64>, Vec<f64>) =
            (x.flatten_all().unwrap().to_vec1().unwrap(), up.flatten_all().unwrap().to_vec1().unwrap());
        // Output (row 3, col 1) of channel 0 copies input (row 1, col 0).
        assert_eq!(dst[3 * 4 + 1], src[2]);
    }

    #[test]
    fn grad_attention_plain_causal_padded() {
        let (q, k, v) = (randt(&[2, 2, 3, 4], 19), randt(&[2, 2, 3, 4], 20), randt(&[2, 2, 3, 4], 21));
        grad_check("attention", &[q.clone(), k.clone(), v.clone()], |x| {
            attention(&x[0], &x[1], &x[2], false, None, 0.5)
        });
        grad_check("attention causal", &[q.clone(), k.clone(), v.clone()], |x| {
            attention(&x[0], &x[1], &x[2], true, None, 0.5)
        });
        let mask = Tensor::from_vec(vec![1u32, 1, 0, 1, 0, 0], (2, 3), &Device::Cpu).unwrap();
        grad_check("attention padded", &[q, k, v], |x| attention(&x[0], &x[1], &x[2], false, Some(&mask), 0.5));
    }

    #[test]
    fn causal_attention_ignores_later_keys() {
        let (q, k, v) = (randt(&[1, 1, 4, 2], 22), randt(&[1, 1, 4, 2], 23), randt(&[1, 1, 4, 2], 24));
        let a = attention(&q, &k, &v, true, None, 1.0).unwrap();
        let k2 = k.slice_assign(&[0..1, 0..1, 3..4, 0..2], &randt(&[1, 1, 1, 2], 25)).unwrap();
        let v2 = v.slice_assign(&[0..1, 0..1, 3..4, 0..2], &randt(&[1, 1, 1, 2], 26)).unwrap();
        let b = attention(&q, &k2, &v2, true, None, 1.0).unwrap();
        let first = |t: &Tensor| t.narrow(2, 0, 3).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(first(&a), first(&b));
    }

    #[test]
    fn grad_embedding_reshape_extremes() {
        let ids = Tensor::from_vec(vec![2u32, 0, 2, 1], (2, 2), &Device::Cpu).unwrap();
        grad_check("embedding", &[randt(&[3, 4], 27)], |x| embedding(&x[0], &ids));
        grad_check("reshape", &[randt(&[2, 6], 28)], |x| reshape(&x[0].t()?, &[-1, 3]));
        grad_check("max over dims", &[randt(&[2, 3, 4], 29)], |x| reduce_extreme(&x[0], &[0, 2], false, true));
        grad_check("min keepdim", &[randt(&[2, 3, 4], 30)], |x| reduce_extreme(&x[0], &[1], true, false));
    }

    #[test]
    fn grad_clip_loss_and_cross_entropy() {
        grad_check("clip_loss", &[randt(&[4, 3], 31), randt(&[4, 3], 32), randt(&[1], 33)], |x| {
            clip_loss(&x[0], &x[1], &x[2])
        });
        let labels = Tensor::from_vec(vec![1u32, 0, 2], 3, &Device::Cpu).unwrap();
        grad_check("cross_entropy", &[randt(&[3, 4], 34)], |x| cross_entropy(&x[0], &labels));
    }

    #[test]
    fn grad_every_unary_binary_reduce_code() {
        use recall_sdk::abi::{binary as bi, reduce as r, unary as u};
        // Positive inputs for log/sqrt/recip; others on [-1, 1] shifted away from kinks.
        let pos = (randt(&[3, 4], 40).abs().unwrap() + 0.5).unwrap();
        let signed = (randt(&[3, 4], 41) + 0.013).unwrap();
        for code in [u::EXP, u::NEG, u::GELU, u::GELU_TANH, u::QUICK_GELU, u::TANH, u::SIGMOID, u::SQR, u::SILU] {
            grad_check(&format!("unary {code}"), std::slice::from_ref(&signed), |x| unary(code, &x[0]));
        }
        for code in [u::LOG, u::SQRT, u::RECIP, u::ABS, u::RELU] {
            grad_check(&format!("unary {code}"), std::slice::from_ref(&pos), |x| unary(code, &x[0]));
        }
        let b = (randt(&[4], 42).abs().unwrap() + 0.5).unwrap();
        for code in [bi::ADD, bi::SUB, bi::MUL, bi::DIV, bi::MAXIMUM, bi::MINIMUM] {
            grad_check(&format!("binary {code}"), &[signed.clone(), b.clone()], |x| binary(code, &x[0], &x[1]));
        }
        for code in [r::SUM, r::MEAN, r::MAX, r::MIN] {
            grad_check(&format!("reduce {code}"), std::slice::from_ref(&signed), |x| reduce(code, &x[0], &[1], false));
            grad_check(&format!("reduce {code} keepdim"), std::slice::from_ref(&signed), |x| {
                reduce(code, &x[0], &[0], true)
            });
        }
    }

    #[test]
    fn grad_shape_ops_and_scalars() {
        let x = randt(&[2, 3, 4], 43);
        grad_check("permute", std::slice::from_ref(&x), |x| x[0].permute((2, 0, 1)));
        grad_check("transpose", std::slice::from_ref(&x), |x| x[0].transpose(0, 2));
        grad_check("narrow", std::slice::from_ref(&x), |x| x[0].narrow(1, 1, 2));
        grad_check("cat", &[x.clone(), randt(&[2, 1, 4], 44)], |x| Tensor::cat(&[&x[0], &x[1]], 1));
        let idx = Tensor::from_vec(vec![2u32, 0, 0], 3, &Device::Cpu).unwrap();
        grad_check("index_select", std::slice::from_ref(&x), |x| x[0].index_select(&idx, 1));
        let gidx = Tensor::from_vec(vec![1u32, 0, 2, 2, 1, 0], (2, 3, 1), &Device::Cpu).unwrap();
        grad_check("gather", &[randt(&[2, 3, 3], 45)], |x| x[0].gather(&gidx, 2));
        grad_check("broadcast_as", &[randt(&[1, 4], 46)], |x| x[0].broadcast_as((3, 4)));
        grad_check("affine", std::slice::from_ref(&x), |x| x[0].affine(1.5, -0.25));
        let pos = (randt(&[5], 47).abs().unwrap() + 0.5).unwrap();
        grad_check("powf", &[pos], |x| x[0].powf(1.7));
        grad_check("clamp", &[(randt(&[6], 48) * 2.0).unwrap()], |x| x[0].clamp(-0.5, 0.6));
        // f32 rounding defeats finite differences at 1e-6; the cast's backward is a cast back.
        let v = Var::from_tensor(&x).unwrap();
        let r = randt(&[2, 3, 4], 51);
        let g = v.to_dtype(DType::F32).unwrap().to_dtype(DType::F64).unwrap().mul(&r).unwrap().sum_all().unwrap();
        let g = g.backward().unwrap().get(v.as_tensor()).unwrap().clone();
        let diff = (g - &r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-6, "to_dtype gradient off by {diff}");
        grad_check("dropout mask", &[randt(&[2, 3], 49)], |x| {
            dropout_with_mask(&x[0], vec![1.0, 0.0, 1.0, 1.0, 0.0, 1.0], 0.25)
        });
        grad_check("l2_normalize", &[randt(&[3, 4], 50)], |x| l2_normalize(&x[0]));
    }

    #[test]
    fn reshape_rejects_bad_shapes() {
        let x = randt(&[2, 3], 35);
        assert!(reshape(&x, &[-1, -1]).is_err());
        assert!(reshape(&x, &[4, -1]).is_err());
        assert_eq!(reshape(&x, &[3, -1]).unwrap().dims(), &[3, 2]);
    }
}
