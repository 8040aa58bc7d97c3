//! The `extern "C"` host functions: the candle implementation of `recall_sdk::abi::HostApi`.
//!
//! Every function runs inside `catch_unwind`, so a panic in candle or in the host becomes an
//! error returned to the plugin instead of unwinding across the boundary (which aborts).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{RNone, ROption, RResult, RSlice, RSome, RStr, RString, RVec};
use candle_core::{DType as CDType, Tensor};
use recall_sdk::abi::{CheckpointEntry, DType, HostApi, HostApiRef, HostCtx, HostResult, ParamEntry, TensorId};
use recall_sdk::{panic_message, ParamInit};

use super::{ops, PluginCtx, Runtime};

/// The host-function table (built once per process).
pub fn host_api() -> HostApiRef {
    static API: OnceLock<HostApiRef> = OnceLock::new();
    *API.get_or_init(|| {
        HostApi {
            release,
            retain,
            shape,
            dtype,
            tensor_f32,
            tensor_u32,
            full,
            to_vec_f32,
            to_vec_u32,
            param,
            param_reset,
            param_assign,
            declare_linear,
            linear,
            site_weight,
            unary,
            binary,
            affine,
            powf,
            clamp,
            matmul,
            reduce,
            argmax,
            softmax,
            log_softmax,
            layer_norm,
            reshape,
            permute,
            transpose,
            narrow,
            cat,
            index_select,
            gather,
            embedding,
            broadcast_as,
            patch_embed,
            attention,
            dropout,
            detach,
            to_dtype,
            log,
            is_training,
            checkpoint_index,
            checkpoint_tensor,
            model_params,
            model_param,
            grad,
            copy,
            conv2d,
            pad_zeros,
            group_norm,
            upsample_nearest2d,
            emit,
            cross_entropy,
            attention_heads,
            #[cfg(feature = "abi-next")]
            live_handles,
        }
        .leak_into_prefix()
    })
}

/// Map between the ABI's dtype codes and candle's.
pub fn to_candle(d: DType) -> Result<CDType, String> {
    Ok(match d {
        DType::F32 => CDType::F32,
        DType::F64 => CDType::F64,
        DType::BF16 => CDType::BF16,
        DType::F16 => CDType::F16,
        DType::U32 => CDType::U32,
        DType::U8 => CDType::U8,
        DType::I64 => CDType::I64,
        other => return Err(format!("unknown dtype code {}", other.0)),
    })
}

pub fn from_candle(d: CDType) -> DType {
    match d {
        CDType::F32 => DType::F32,
        CDType::F64 => DType::F64,
        CDType::BF16 => DType::BF16,
        CDType::F16 => DType::F16,
        CDType::U32 => DType::U32,
        CDType::U8 => DType::U8,
        CDType::I64 => DType::I64,
        _ => DType(u32::MAX),
    }
}

/// Run a host function for the plugin behind `ctx`, converting errors and panics.
fn call<T>(ctx: HostCtx, op: &str, f: impl FnOnce(&PluginCtx) -> Result<T, String>) -> HostResult<T> {
    // SAFETY: `ctx.ptr` was made by `PluginCtx::handle` from a pinned box that the plugin
    // wrapper keeps alive for as long as the plugin instance can call the host.
    let pc = unsafe { &*(ctx.ptr as *const PluginCtx) };
    match catch_unwind(AssertUnwindSafe(|| f(pc))) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(RString::from(format!("{op}: {e}"))),
        Err(p) => RResult::RErr(RString::from(format!("{op}: host panicked: {}", panic_message(&*p)))),
    }
}

/// Run a tensor-producing op and hand the result back as a new handle.
fn produce(ctx: HostCtx, op: &str, f: impl FnOnce(&Runtime) -> candle_core::Result<Tensor>) -> HostResult<TensorId> {
    call(ctx, op, |pc| {
        let t = f(&pc.runtime).map_err(|e| e.to_string())?;
        Ok(pc.runtime.insert(t))
    })
}

fn get(rt: &Runtime, id: TensorId) -> candle_core::Result<Tensor> {
    rt.get(id).map_err(candle_core::Error::msg)
}

// Mixed precision follows torch.autocast: matmul-like ops (matmul, attention, patch
// embedding, convolutions, linear sites) run in the compute dtype; softmax, normalisation
// (layer and group norm), sums and means,
// exp and log run in the parameters' dtype; other ops given mixed float operands promote them
// to the parameters' dtype. Without mixed precision every helper is the identity.

/// `id` in the compute dtype (matmul-like ops).
fn low(rt: &Runtime, id: TensorId) -> candle_core::Result<Tensor> {
    let t = get(rt, id)?;
    if rt.is_mixed() && t.dtype().is_float() && t.dtype() != rt.compute_dtype() {
        t.to_dtype(rt.compute_dtype())
    } else {
        Ok(t)
    }
}

/// `id` in the parameters' dtype (precision-sensitive ops); a parameter's cast is replaced by
/// its master, so layer-norm weights and biases keep every bit of their f32 values.
fn high(rt: &Runtime, id: TensorId) -> candle_core::Result<Tensor> {
    let t = get(rt, id)?;
    if !rt.is_mixed() {
        return Ok(t);
    }
    if let Some(master) = rt.master_of(&t) {
        return Ok(master);
    }
    if t.dtype().is_float() && t.dtype() != rt.float_dtype() {
        t.to_dtype(rt.float_dtype())
    } else {
        Ok(t)
    }
}

/// Float operands of different dtypes promoted to the parameters' dtype.
fn promote(rt: &Runtime, ts: Vec<Tensor>) -> candle_core::Result<Vec<Tensor>> {
    let first = ts.first().map(|t| t.dtype());
    if !rt.is_mixed() || ts.iter().all(|t| Some(t.dtype()) == first || !t.dtype().is_float()) {
        return Ok(ts);
    }
    ts.into_iter().map(|t| if t.dtype().is_float() { t.to_dtype(rt.float_dtype()) } else { Ok(t) }).collect()
}

fn usizes(s: RSlice<u64>) -> Vec<usize> {
    s.iter().map(|&d| d as usize).collect()
}

extern "C" fn release(ctx: HostCtx, id: TensorId) {
    let _ = call(ctx, "release", |pc| {
        pc.runtime.release(id);
        Ok(())
    });
}

extern "C" fn retain(ctx: HostCtx, id: TensorId) -> HostResult<TensorId> {
    produce(ctx, "retain", |rt| get(rt, id))
}

extern "C" fn shape(ctx: HostCtx, id: TensorId) -> HostResult<RVec<u64>> {
    call(ctx, "shape", |pc| Ok(pc.runtime.get(id)?.dims().iter().map(|&d| d as u64).collect()))
}

extern "C" fn dtype(ctx: HostCtx, id: TensorId) -> HostResult<DType> {
    call(ctx, "dtype", |pc| Ok(from_candle(pc.runtime.get(id)?.dtype())))
}

extern "C" fn tensor_f32(ctx: HostCtx, data: RSlice<f32>, shape: RSlice<u64>) -> HostResult<TensorId> {
    produce(ctx, "tensor_f32", |rt| {
        Tensor::from_slice(data.as_slice(), usizes(shape), rt.device())?.to_dtype(rt.float_dtype())
    })
}

extern "C" fn tensor_u32(ctx: HostCtx, data: RSlice<u32>, shape: RSlice<u64>) -> HostResult<TensorId> {
    produce(ctx, "tensor_u32", |rt| Tensor::from_slice(data.as_slice(), usizes(shape), rt.device()))
}

extern "C" fn full(ctx: HostCtx, value: f64, shape: RSlice<u64>, dt: DType) -> HostResult<TensorId> {
    produce(ctx, "full", |rt| {
        let dt = to_candle(dt).map_err(candle_core::Error::msg)?;
        Tensor::full(value, usizes(shape), rt.device())?.to_dtype(dt)
    })
}

extern "C" fn to_vec_f32(ctx: HostCtx, id: TensorId) -> HostResult<RVec<f32>> {
    call(ctx, "to_vec_f32", |pc| {
        let t = pc.runtime.get(id)?;
        let v: Vec<f32> = super::counters::read_back(|| t.flatten_all()?.to_dtype(CDType::F32)?.to_vec1())
            .map_err(|e| e.to_string())?;
        Ok(v.into())
    })
}

extern "C" fn to_vec_u32(ctx: HostCtx, id: TensorId) -> HostResult<RVec<u32>> {
    call(ctx, "to_vec_u32", |pc| {
        let t = pc.runtime.get(id)?;
        if let Some(v) = super::host_copies::u32_of(&t) {
            return Ok(v.into());
        }
        let v: Vec<u32> = super::counters::read_back(|| t.flatten_all()?.to_dtype(CDType::U32)?.to_vec1())
            .map_err(|e| e.to_string())?;
        Ok(v.into())
    })
}

extern "C" fn param(
    ctx: HostCtx,
    name: RStr<'_>,
    shape: RSlice<u64>,
    init: ParamInit,
    trainable: bool,
) -> HostResult<TensorId> {
    call(ctx, "param", |pc| {
        let t = pc.runtime.param(&pc.scoped(name.as_str()), &usizes(shape), init, trainable)?;
        Ok(pc.runtime.insert(t))
    })
}

extern "C" fn param_reset(ctx: HostCtx, id: TensorId) -> HostResult<()> {
    call(ctx, "param_reset", |pc| pc.runtime.param_reset(&pc.runtime.get(id)?))
}

extern "C" fn param_assign(ctx: HostCtx, target: TensorId, value: TensorId) -> HostResult<()> {
    call(ctx, "param_assign", |pc| pc.runtime.param_assign(&pc.runtime.get(target)?, &pc.runtime.get(value)?))
}

extern "C" fn declare_linear(
    ctx: HostCtx,
    name: RStr<'_>,
    in_f: u64,
    out_f: u64,
    bias: bool,
    w_init: ParamInit,
    b_init: ParamInit,
) -> HostResult<u32> {
    call(ctx, "declare_linear", |pc| {
        pc.runtime.declare_linear(&pc.scoped(name.as_str()), in_f as usize, out_f as usize, bias, w_init, b_init)
    })
}

extern "C" fn linear(ctx: HostCtx, site: u32, x: TensorId) -> HostResult<TensorId> {
    call(ctx, "linear", |pc| {
        let y = pc.runtime.linear(site, x)?;
        Ok(pc.runtime.insert(y))
    })
}

extern "C" fn site_weight(ctx: HostCtx, site: u32) -> HostResult<TensorId> {
    call(ctx, "site_weight", |pc| {
        let w = pc.runtime.site(site)?.weight;
        Ok(pc.runtime.insert(w))
    })
}

extern "C" fn unary(ctx: HostCtx, op: u32, x: TensorId) -> HostResult<TensorId> {
    use recall_sdk::abi::unary as u;
    if matches!(op, u::EXP | u::LOG) {
        return produce(ctx, "unary", |rt| ops::unary(op, &high(rt, x)?));
    }
    produce(ctx, "unary", |rt| ops::unary(op, &get(rt, x)?))
}

extern "C" fn binary(ctx: HostCtx, op: u32, a: TensorId, b: TensorId) -> HostResult<TensorId> {
    produce(ctx, "binary", |rt| {
        let ab = promote(rt, vec![get(rt, a)?, get(rt, b)?])?;
        ops::binary(op, &ab[0], &ab[1])
    })
}

extern "C" fn affine(ctx: HostCtx, x: TensorId, mul: f64, add: f64) -> HostResult<TensorId> {
    produce(ctx, "affine", |rt| get(rt, x)?.affine(mul, add))
}

extern "C" fn powf(ctx: HostCtx, x: TensorId, e: f64) -> HostResult<TensorId> {
    produce(ctx, "powf", |rt| get(rt, x)?.powf(e))
}

extern "C" fn clamp(ctx: HostCtx, x: TensorId, lo: f64, hi: f64) -> HostResult<TensorId> {
    produce(ctx, "clamp", |rt| get(rt, x)?.clamp(lo, hi))
}

extern "C" fn matmul(ctx: HostCtx, a: TensorId, b: TensorId) -> HostResult<TensorId> {
    produce(ctx, "matmul", |rt| ops::matmul(&low(rt, a)?, &low(rt, b)?))
}

extern "C" fn reduce(ctx: HostCtx, op: u32, x: TensorId, dims: RSlice<u64>, keepdim: bool) -> HostResult<TensorId> {
    produce(ctx, "reduce", |rt| {
        use recall_sdk::abi::reduce as r;
        let x = if matches!(op, r::SUM | r::MEAN) { high(rt, x)? } else { get(rt, x)? };
        ops::reduce(op, &x, &usizes(dims), keepdim)
    })
}

extern "C" fn argmax(ctx: HostCtx, x: TensorId, dim: u64) -> HostResult<TensorId> {
    produce(ctx, "argmax", |rt| get(rt, x)?.argmax(dim as usize))
}

extern "C" fn softmax(ctx: HostCtx, x: TensorId, dim: u64) -> HostResult<TensorId> {
    produce(ctx, "softmax", |rt| ops::softmax(&high(rt, x)?, dim as usize))
}

extern "C" fn log_softmax(ctx: HostCtx, x: TensorId, dim: u64) -> HostResult<TensorId> {
    produce(ctx, "log_softmax", |rt| ops::log_softmax(&high(rt, x)?, dim as usize))
}

extern "C" fn layer_norm(ctx: HostCtx, x: TensorId, w: TensorId, b: TensorId, eps: f64) -> HostResult<TensorId> {
    produce(ctx, "layer_norm", |rt| ops::layer_norm(&high(rt, x)?, &high(rt, w)?, &high(rt, b)?, eps))
}

extern "C" fn reshape(ctx: HostCtx, x: TensorId, shape: RSlice<i64>) -> HostResult<TensorId> {
    produce(ctx, "reshape", |rt| ops::reshape(&get(rt, x)?, shape.as_slice()))
}

extern "C" fn permute(ctx: HostCtx, x: TensorId, dims: RSlice<u64>) -> HostResult<TensorId> {
    produce(ctx, "permute", |rt| get(rt, x)?.permute(usizes(dims)))
}

extern "C" fn transpose(ctx: HostCtx, x: TensorId, d0: u64, d1: u64) -> HostResult<TensorId> {
    produce(ctx, "transpose", |rt| get(rt, x)?.transpose(d0 as usize, d1 as usize))
}

extern "C" fn narrow(ctx: HostCtx, x: TensorId, dim: u64, start: u64, len: u64) -> HostResult<TensorId> {
    produce(ctx, "narrow", |rt| get(rt, x)?.narrow(dim as usize, start as usize, len as usize))
}

extern "C" fn cat(ctx: HostCtx, xs: RSlice<TensorId>, dim: u64) -> HostResult<TensorId> {
    produce(ctx, "cat", |rt| {
        let ts = xs.iter().map(|&id| get(rt, id)).collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&promote(rt, ts)?, dim as usize)
    })
}

extern "C" fn index_select(ctx: HostCtx, x: TensorId, idx: TensorId, dim: u64) -> HostResult<TensorId> {
    produce(ctx, "index_select", |rt| get(rt, x)?.index_select(&get(rt, idx)?, dim as usize))
}

extern "C" fn gather(ctx: HostCtx, x: TensorId, idx: TensorId, dim: u64) -> HostResult<TensorId> {
    produce(ctx, "gather", |rt| get(rt, x)?.contiguous()?.gather(&get(rt, idx)?.contiguous()?, dim as usize))
}

extern "C" fn embedding(ctx: HostCtx, table: TensorId, ids: TensorId) -> HostResult<TensorId> {
    produce(ctx, "embedding", |rt| ops::embedding(&get(rt, table)?, &get(rt, ids)?))
}

extern "C" fn broadcast_as(ctx: HostCtx, x: TensorId, shape: RSlice<u64>) -> HostResult<TensorId> {
    produce(ctx, "broadcast_as", |rt| get(rt, x)?.broadcast_as(usizes(shape)))
}

extern "C" fn patch_embed(
    ctx: HostCtx,
    px: TensorId,
    w: TensorId,
    b: ROption<TensorId>,
    patch: u64,
) -> HostResult<TensorId> {
    produce(ctx, "patch_embed", |rt| {
        let bias = b.into_option().map(|b| low(rt, b)).transpose()?;
        ops::patch_embed(&low(rt, px)?, &low(rt, w)?, bias.as_ref(), patch as usize)
    })
}

extern "C" fn conv2d(
    ctx: HostCtx,
    x: TensorId,
    w: TensorId,
    b: ROption<TensorId>,
    stride: u64,
    padding: u64,
) -> HostResult<TensorId> {
    produce(ctx, "conv2d", |rt| {
        let bias = b.into_option().map(|b| low(rt, b)).transpose()?;
        ops::conv2d(&low(rt, x)?, &low(rt, w)?, bias.as_ref(), stride as usize, padding as usize)
    })
}

extern "C" fn pad_zeros(ctx: HostCtx, x: TensorId, dim: u64, before: u64, after: u64) -> HostResult<TensorId> {
    produce(ctx, "pad_zeros", |rt| ops::pad_zeros(&get(rt, x)?, dim as usize, before as usize, after as usize))
}

extern "C" fn group_norm(
    ctx: HostCtx,
    x: TensorId,
    groups: u64,
    w: TensorId,
    b: TensorId,
    eps: f64,
) -> HostResult<TensorId> {
    produce(ctx, "group_norm", |rt| ops::group_norm(&high(rt, x)?, groups as usize, &high(rt, w)?, &high(rt, b)?, eps))
}

extern "C" fn upsample_nearest2d(ctx: HostCtx, x: TensorId, scale: u64) -> HostResult<TensorId> {
    produce(ctx, "upsample_nearest2d", |rt| ops::upsample_nearest2d(&get(rt, x)?, scale as usize))
}

extern "C" fn emit(ctx: HostCtx, name: RStr<'_>, value: TensorId) -> HostResult<()> {
    call(ctx, "emit", |pc| {
        let t = pc.runtime.get(value)?;
        let mut emitted = pc.emitted.borrow_mut();
        emitted.retain(|(n, _)| n != name.as_str());
        emitted.push((name.to_string(), t));
        Ok(())
    })
}

extern "C" fn cross_entropy(ctx: HostCtx, logits: TensorId, labels: TensorId) -> HostResult<TensorId> {
    produce(ctx, "cross_entropy", |rt| ops::cross_entropy(&high(rt, logits)?, &get(rt, labels)?))
}

extern "C" fn attention(
    ctx: HostCtx,
    q: TensorId,
    k: TensorId,
    v: TensorId,
    causal: bool,
    mask: ROption<TensorId>,
    scale: f64,
) -> HostResult<TensorId> {
    produce(ctx, "attention", |rt| {
        let mask = mask.into_option().map(|m| get(rt, m)).transpose()?;
        ops::attention(&low(rt, q)?, &low(rt, k)?, &low(rt, v)?, causal, mask.as_ref(), scale)
    })
}

#[allow(clippy::too_many_arguments)]
extern "C" fn attention_heads(
    ctx: HostCtx,
    q: TensorId,
    k: TensorId,
    v: TensorId,
    heads: u64,
    causal: bool,
    mask: ROption<TensorId>,
    scale: f64,
) -> HostResult<TensorId> {
    produce(ctx, "attention_heads", |rt| {
        let mask = mask.into_option().map(|m| get(rt, m)).transpose()?;
        ops::attention_heads(&low(rt, q)?, &low(rt, k)?, &low(rt, v)?, heads as usize, causal, mask.as_ref(), scale)
    })
}

extern "C" fn dropout(ctx: HostCtx, x: TensorId, p: f64) -> HostResult<TensorId> {
    produce(ctx, "dropout", |rt| rt.dropout(&get(rt, x)?, p).map_err(candle_core::Error::msg))
}

extern "C" fn detach(ctx: HostCtx, x: TensorId) -> HostResult<TensorId> {
    produce(ctx, "detach", |rt| Ok(get(rt, x)?.detach()))
}

extern "C" fn to_dtype(ctx: HostCtx, x: TensorId, dt: DType) -> HostResult<TensorId> {
    produce(ctx, "to_dtype", |rt| get(rt, x)?.to_dtype(to_candle(dt).map_err(candle_core::Error::msg)?))
}

extern "C" fn log(ctx: HostCtx, level: u32, message: RStr<'_>) {
    let _ = call(ctx, "log", |pc| {
        let (plugin, msg) = (pc.plugin.as_str(), message.as_str());
        match level {
            0 => tracing::error!(plugin, "{msg}"),
            1 => tracing::warn!(plugin, "{msg}"),
            2 => tracing::info!(plugin, "{msg}"),
            3 => tracing::debug!(plugin, "{msg}"),
            _ => tracing::trace!(plugin, "{msg}"),
        }
        Ok(())
    });
}

extern "C" fn is_training(ctx: HostCtx) -> bool {
    match call(ctx, "is_training", |pc| Ok(pc.runtime.is_training())) {
        RResult::ROk(b) => b,
        RResult::RErr(_) => false,
    }
}

extern "C" fn checkpoint_index(ctx: HostCtx, path: RStr<'_>) -> HostResult<RVec<CheckpointEntry>> {
    call(ctx, "checkpoint_index", |pc| {
        Ok(pc
            .runtime
            .checkpoint_index(path.as_str())?
            .into_iter()
            .map(|(name, shape, dtype)| CheckpointEntry {
                name: name.into(),
                shape: shape.iter().map(|&d| d as u64).collect(),
                dtype: from_candle(dtype),
            })
            .collect())
    })
}

extern "C" fn checkpoint_tensor(ctx: HostCtx, path: RStr<'_>, name: RStr<'_>) -> HostResult<TensorId> {
    call(ctx, "checkpoint_tensor", |pc| {
        let t = pc.runtime.checkpoint_tensor(path.as_str(), name.as_str())?;
        Ok(pc.runtime.insert(t))
    })
}

extern "C" fn model_params(ctx: HostCtx) -> HostResult<RVec<ParamEntry>> {
    call(ctx, "model_params", |pc| {
        Ok(pc
            .runtime
            .params()
            .iter()
            .map(|p| ParamEntry {
                name: p.name.as_str().into(),
                shape: p.var.dims().iter().map(|&d| d as u64).collect(),
                trainable: p.trainable,
            })
            .collect())
    })
}

extern "C" fn model_param(ctx: HostCtx, name: RStr<'_>) -> HostResult<TensorId> {
    call(ctx, "model_param", |pc| {
        let t = pc
            .runtime
            .params()
            .get(name.as_str())
            .map(|p| p.var.as_tensor().clone())
            .ok_or_else(|| format!("the model has no parameter `{}`", name.as_str()))?;
        Ok(pc.runtime.insert(t))
    })
}

extern "C" fn grad(ctx: HostCtx, param: TensorId) -> HostResult<ROption<TensorId>> {
    call(ctx, "grad", |pc| {
        let t = pc.runtime.get(param)?;
        Ok(match pc.runtime.grad_of(&t)? {
            Some(g) => RSome(pc.runtime.insert(g)),
            None => RNone,
        })
    })
}

extern "C" fn copy(ctx: HostCtx, t: TensorId) -> HostResult<TensorId> {
    call(ctx, "copy", |pc| {
        let t = pc.runtime.get(t)?.detach().copy().map_err(|e| e.to_string())?;
        Ok(pc.runtime.insert(t))
    })
}

#[cfg(feature = "abi-next")]
extern "C" fn live_handles(ctx: HostCtx) -> u64 {
    match call(ctx, "live_handles", |pc| Ok(pc.runtime.live_handles() as u64)) {
        RResult::ROk(n) => n,
        RResult::RErr(_) => 0,
    }
}
