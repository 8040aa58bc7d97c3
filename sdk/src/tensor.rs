//! The safe side of the host-function table: [`Host`] and the [`Tensor`] handle.
//!
//! A `Tensor` is a handle into the host's tensor store; dropping it releases the handle. All
//! math happens in the host, inside its one autograd graph, so gradients flow through
//! everything a plugin composes without the plugin writing a backward pass.

use abi_stable::std_types::{RNone, ROption, RResult, RSlice, RSome, RStr, RString};

use crate::abi::{binary, reduce, unary, DType, HostApiRef, HostCtx, HostHandle, NamedTensor, ParamInit, TensorId};
use crate::error::{Error, Result};
use crate::inputs;

/// The host as seen from a plugin: the function table plus this plugin instance's context.
/// Cheap to copy; valid for the lifetime of the plugin instance it was given to.
#[derive(Copy, Clone)]
pub struct Host {
    api: HostApiRef,
    ctx: HostCtx,
}

fn lift<T>(r: RResult<T, RString>) -> Result<T> {
    r.into_result().map_err(|e| Error::new(e.into_string()))
}

fn dims(shape: &[usize]) -> Vec<u64> {
    shape.iter().map(|&d| d as u64).collect()
}

impl Host {
    /// Wrap the handle the host passed to a plugin function.
    pub fn from_handle(handle: HostHandle) -> Self {
        Host { api: handle.api, ctx: handle.ctx }
    }

    /// The raw handle, for passing back across the boundary.
    pub fn handle(&self) -> HostHandle {
        HostHandle { api: self.api, ctx: self.ctx }
    }

    /// The raw function table, for functions appended after 1.0 (their accessors return
    /// `Option`: `None` means the host is older than the function).
    pub fn api(&self) -> HostApiRef {
        self.api
    }

    /// The raw per-instance context, to pass to functions read from [`Host::api`].
    pub fn ctx(&self) -> HostCtx {
        self.ctx
    }

    fn wrap(&self, r: RResult<TensorId, RString>) -> Result<Tensor> {
        lift(r).map(|id| Tensor { id, host: *self })
    }

    /// Take ownership of a handle the host passed in.
    pub fn adopt(&self, id: TensorId) -> Tensor {
        Tensor { id, host: *self }
    }

    /// A constant float tensor (in the runtime's float dtype) from row-major data.
    pub fn tensor_f32(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.wrap((self.api.tensor_f32())(self.ctx, RSlice::from_slice(data), RSlice::from_slice(&dims(shape))))
    }

    /// A constant u32 tensor (ids, indices, masks) from row-major data.
    pub fn tensor_u32(&self, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        self.wrap((self.api.tensor_u32())(self.ctx, RSlice::from_slice(data), RSlice::from_slice(&dims(shape))))
    }

    /// A tensor filled with `value`.
    pub fn full(&self, value: f64, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.wrap((self.api.full())(self.ctx, value, RSlice::from_slice(&dims(shape)), dtype))
    }

    /// Get or create the host-owned parameter `name` (scoped by the host to this plugin
    /// instance, e.g. `vision.`). Trainable parameters are seen by the optimizer and saved
    /// in checkpoints by their scoped name.
    pub fn param(&self, name: &str, shape: &[usize], init: ParamInit, trainable: bool) -> Result<Tensor> {
        self.wrap((self.api.param())(self.ctx, RStr::from_str(name), RSlice::from_slice(&dims(shape)), init, trainable))
    }

    /// Re-run a parameter's initialiser.
    pub fn param_reset(&self, param: &Tensor) -> Result<()> {
        lift((self.api.param_reset())(self.ctx, param.id))
    }

    /// Overwrite a parameter's value in place, outside the autograd graph.
    pub fn param_assign(&self, param: &Tensor, value: &Tensor) -> Result<()> {
        lift((self.api.param_assign())(self.ctx, param.id, value.id))
    }

    /// Declare an adaptable linear layer `y = x W^T + b` with W: [out, in]. Adapters (LoRA)
    /// can attach to it by its scoped name.
    pub fn declare_linear(
        &self,
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        weight_init: ParamInit,
        bias_init: ParamInit,
    ) -> Result<Site> {
        lift((self.api.declare_linear())(
            self.ctx,
            RStr::from_str(name),
            in_features as u64,
            out_features as u64,
            bias,
            weight_init,
            bias_init,
        ))
        .map(Site)
    }

    /// Apply a declared linear layer, including every adapter's delta.
    pub fn linear(&self, site: Site, x: &Tensor) -> Result<Tensor> {
        self.wrap((self.api.linear())(self.ctx, site.0, x.id))
    }

    /// The base weight parameter ([out, in]) of a site.
    pub fn site_weight(&self, site: Site) -> Result<Tensor> {
        self.wrap((self.api.site_weight())(self.ctx, site.0))
    }

    /// Concatenate along `dim`.
    pub fn cat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        let ids: Vec<TensorId> = xs.iter().map(|t| t.id).collect();
        self.wrap((self.api.cat())(self.ctx, RSlice::from_slice(&ids), dim as u64))
    }

    /// Scaled dot-product attention over [B, H, L, Dh] tensors, with an optional causal mask
    /// and an optional key padding mask ([B, Lk], 1 = attend, 0 = padding).
    pub fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
        key_padding_mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        let mask = match key_padding_mask {
            Some(m) => RSome(m.id),
            None => RNone,
        };
        self.wrap((self.api.attention())(self.ctx, q.id, k.id, v.id, causal, mask, scale))
    }

    /// Multi-head attention on head-packed inputs: q [B, Lq, H * Dh], k and v [B, Lk, H * Dh]
    /// -> [B, Lq, H * Dh], the heads the column blocks of width Dh. The same values as
    /// [`Host::attention`] on the heads split out; hosts from recall-sdk 1.5 read the heads in
    /// place, older ones get the split, the attention and the merge.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        causal: bool,
        key_padding_mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        if let Some(f) = self.api.attention_heads() {
            let mask = key_padding_mask.map(|m| m.id).into();
            return self.wrap(f(self.ctx, q.id, k.id, v.id, heads as u64, causal, mask, scale));
        }
        let split = |t: &Tensor| -> Result<Tensor> {
            let shape = t.shape()?;
            t.reshape(&[shape[0] as i64, shape[1] as i64, heads as i64, -1])?.transpose(1, 2)
        };
        let y = self.attention(&split(q)?, &split(k)?, &split(v)?, causal, key_padding_mask, scale)?;
        let shape = q.shape()?;
        y.transpose(1, 2)?.reshape(&[shape[0] as i64, shape[1] as i64, -1])
    }

    /// The tensors of a checkpoint file: `(name, shape)` sorted by name. Needs a host with
    /// recall-sdk >= 1.1.
    pub fn checkpoint_index(&self, path: &str) -> Result<Vec<(String, Vec<usize>)>> {
        let f = self.api.checkpoint_index().ok_or_else(|| Error::new(OLD_HOST_CHECKPOINTS))?;
        let mut v: Vec<(String, Vec<usize>)> = lift(f(self.ctx, RStr::from_str(path)))?
            .into_iter()
            .map(|e| (e.name.into_string(), e.shape.iter().map(|&d| d as usize).collect()))
            .collect();
        v.sort();
        Ok(v)
    }

    /// One tensor of a checkpoint file, in the runtime's float dtype.
    pub fn checkpoint_tensor(&self, path: &str, name: &str) -> Result<Tensor> {
        let f = self.api.checkpoint_tensor().ok_or_else(|| Error::new(OLD_HOST_CHECKPOINTS))?;
        self.wrap(f(self.ctx, RStr::from_str(path), RStr::from_str(name)))
    }

    /// Every parameter of the model: `(full name, shape, trainable)`, sorted by name. Needs a
    /// host with recall-sdk >= 1.3.
    pub fn model_params(&self) -> Result<Vec<(String, Vec<usize>, bool)>> {
        let f = self.api.model_params().ok_or_else(|| Error::new(old_host("listing parameters", "1.3")))?;
        let mut v: Vec<(String, Vec<usize>, bool)> = lift(f(self.ctx))?
            .into_iter()
            .map(|e| (e.name.into_string(), e.shape.iter().map(|&d| d as usize).collect(), e.trainable))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// A model parameter by full name (e.g. `vision.layers.0.mlp.fc1.weight`): the live
    /// tensor, so a loss built from it trains it. Use `detach` for a constant copy.
    pub fn model_param(&self, name: &str) -> Result<Tensor> {
        let f = self.api.model_param().ok_or_else(|| Error::new(old_host("model parameters", "1.3")))?;
        self.wrap(f(self.ctx, RStr::from_str(name)))
    }

    /// The gradient of `param` from the latest backward pass (inside `after_backward` and
    /// `on_gradients`); `None` when the parameter got no gradient.
    pub fn grad(&self, param: &Tensor) -> Result<Option<Tensor>> {
        let f = self.api.grad().ok_or_else(|| Error::new(old_host("gradients", "1.3")))?;
        match lift(f(self.ctx, param.id()))? {
            RSome(id) => Ok(Some(self.adopt(id))),
            RNone => Ok(None),
        }
    }

    /// Publish `value` as side output `name` of the current call (e.g. an encoder's per-token
    /// features as `tokens`, which the `distill` strategy's token term reads). A host older than
    /// recall-sdk 1.4 has no side outputs; there it does nothing.
    pub fn emit(&self, name: &str, value: &Tensor) -> Result<()> {
        match self.api.emit() {
            Some(f) => lift(f(self.ctx, RStr::from_str(name), value.id)),
            None => Ok(()),
        }
    }

    /// Whether the host is in a training step (dropout active).
    pub fn is_training(&self) -> bool {
        (self.api.is_training())(self.ctx)
    }

    /// Log through the host's logger.
    pub fn log(&self, level: LogLevel, message: &str) {
        (self.api.log())(self.ctx, level as u32, RStr::from_str(message))
    }

    /// Look up a tensor by name in a list the host passed in, taking a new handle to it.
    pub fn input(&self, inputs: &[NamedTensor], name: &str) -> Result<Tensor> {
        self.find_input(inputs, name)?
            .ok_or_else(|| Error::new(format!("missing input `{name}`; the host passed: {}", names(inputs))))
    }

    /// The previous model's `old_image_features` and `old_text_features` (passed to strategies
    /// whose `wants_old_model` is true). `None` during the first task (`task_index` 0); from
    /// the second task on their absence is an error, since consolidating against nothing would
    /// silently turn the method into fine-tuning.
    pub fn old_features(&self, inputs: &[NamedTensor], task_index: u64) -> Result<Option<(Tensor, Tensor)>> {
        match (
            self.find_input(inputs, inputs::OLD_IMAGE_FEATURES)?,
            self.find_input(inputs, inputs::OLD_TEXT_FEATURES)?,
        ) {
            (Some(img), Some(txt)) => Ok(Some((img.detach()?, txt.detach()?))),
            _ if task_index == 0 => Ok(None),
            _ => Err(Error::new(format!(
                "the old model's features (`old_image_features`, `old_text_features`) are needed from task 2 on, \
                 and the host passed none for task {}; does the host support `wants_old_model` (recall-sdk >= 1.2)?",
                task_index + 1
            ))),
        }
    }

    /// Like [`Host::input`], for optional inputs.
    pub fn find_input(&self, inputs: &[NamedTensor], name: &str) -> Result<Option<Tensor>> {
        match inputs.iter().find(|t| t.name.as_str() == name) {
            Some(t) => self.wrap((self.api.retain())(self.ctx, t.id)).map(Some),
            None => Ok(None),
        }
    }
}

fn old_host(what: &str, version: &str) -> String {
    format!("this recall host predates {what} (recall-sdk {version}); upgrade recall")
}

const OLD_HOST_CHECKPOINTS: &str =
    "this recall host predates checkpoint loading (recall-sdk 1.1); upgrade recall to load checkpoints";

fn names(inputs: &[NamedTensor]) -> String {
    let v: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
    if v.is_empty() {
        "nothing".to_string()
    } else {
        v.join(", ")
    }
}

/// Log levels for [`Host::log`].
#[derive(Copy, Clone, Debug)]
#[repr(u32)]
pub enum LogLevel {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
    Trace = 4,
}

/// An adaptable linear layer declared through [`Host::declare_linear`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Site(pub u32);

/// A handle to a host-owned tensor. Ops build nodes of the host's autograd graph.
pub struct Tensor {
    id: TensorId,
    host: Host,
}

impl Drop for Tensor {
    fn drop(&mut self) {
        (self.host.api.release())(self.host.ctx, self.id)
    }
}

impl Clone for Tensor {
    /// A second handle to the same tensor (not a copy of its data).
    fn clone(&self) -> Self {
        match lift((self.host.api.retain())(self.host.ctx, self.id)) {
            Ok(id) => Tensor { id, host: self.host },
            // Retaining a live handle cannot fail unless the host is broken; failing loudly
            // here is caught by the export macro and reported with the plugin's name.
            Err(e) => panic!("retaining a tensor handle failed: {e}"),
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.shape() {
            Ok(s) => write!(f, "Tensor({:?}, shape {:?})", self.id, s),
            Err(_) => write!(f, "Tensor({:?})", self.id),
        }
    }
}

macro_rules! unary_ops {
    ($($name:ident => $code:expr, $doc:literal;)*) => {$(
        #[doc = $doc]
        pub fn $name(&self) -> Result<Tensor> { self.unary($code) }
    )*};
}

macro_rules! binary_ops {
    ($($name:ident => $code:expr, $doc:literal;)*) => {$(
        #[doc = $doc]
        pub fn $name(&self, rhs: &Tensor) -> Result<Tensor> { self.binary($code, rhs) }
    )*};
}

impl Tensor {
    /// The raw handle, for returning across the boundary. The handle stays owned by `self`;
    /// use [`Tensor::into_id`] to hand ownership to the host.
    pub fn id(&self) -> TensorId {
        self.id
    }

    /// Give the handle to the host (it will release it).
    pub fn into_id(self) -> TensorId {
        let id = self.id;
        std::mem::forget(self);
        id
    }

    /// The host this tensor lives in.
    pub fn host(&self) -> Host {
        self.host
    }

    fn wrap(&self, r: RResult<TensorId, RString>) -> Result<Tensor> {
        self.host.wrap(r)
    }

    fn api(&self) -> HostApiRef {
        self.host.api
    }

    pub fn shape(&self) -> Result<Vec<usize>> {
        lift((self.api().shape())(self.host.ctx, self.id)).map(|v| v.iter().map(|&d| d as usize).collect())
    }

    /// Size of dimension `dim`.
    pub fn dim(&self, dim: usize) -> Result<usize> {
        let shape = self.shape()?;
        shape.get(dim).copied().ok_or_else(|| Error::new(format!("dimension {dim} out of range for shape {shape:?}")))
    }

    pub fn dtype(&self) -> Result<DType> {
        lift((self.api().dtype())(self.host.ctx, self.id))
    }

    /// Element-wise unary op by [`abi::unary`] code.
    pub fn unary(&self, op: u32) -> Result<Tensor> {
        self.wrap((self.api().unary())(self.host.ctx, op, self.id))
    }

    /// Broadcasting binary op by [`abi::binary`] code.
    pub fn binary(&self, op: u32, rhs: &Tensor) -> Result<Tensor> {
        self.wrap((self.api().binary())(self.host.ctx, op, self.id, rhs.id))
    }

    unary_ops! {
        exp => unary::EXP, "Element-wise e^x.";
        log => unary::LOG, "Element-wise natural logarithm.";
        sqrt => unary::SQRT, "Element-wise square root.";
        neg => unary::NEG, "Element-wise negation.";
        abs => unary::ABS, "Element-wise absolute value.";
        relu => unary::RELU, "max(x, 0).";
        gelu => unary::GELU, "Exact (erf) GELU.";
        gelu_tanh => unary::GELU_TANH, "Tanh-approximated GELU.";
        quick_gelu => unary::QUICK_GELU, "x * sigmoid(1.702 x), OpenAI CLIP's activation.";
        tanh => unary::TANH, "Hyperbolic tangent.";
        sigmoid => unary::SIGMOID, "Logistic sigmoid.";
        sqr => unary::SQR, "Element-wise square.";
        recip => unary::RECIP, "Element-wise 1/x.";
        silu => unary::SILU, "x * sigmoid(x).";
    }

    binary_ops! {
        add => binary::ADD, "Broadcasting addition.";
        sub => binary::SUB, "Broadcasting subtraction.";
        mul => binary::MUL, "Broadcasting multiplication.";
        div => binary::DIV, "Broadcasting division.";
        maximum => binary::MAXIMUM, "Broadcasting element-wise maximum.";
        minimum => binary::MINIMUM, "Broadcasting element-wise minimum.";
    }

    /// `self * mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        self.wrap((self.api().affine())(self.host.ctx, self.id, mul, add))
    }

    /// `self * s`.
    pub fn scale(&self, s: f64) -> Result<Tensor> {
        self.affine(s, 0.0)
    }

    /// `self + s`.
    pub fn add_scalar(&self, s: f64) -> Result<Tensor> {
        self.affine(1.0, s)
    }

    pub fn powf(&self, e: f64) -> Result<Tensor> {
        self.wrap((self.api().powf())(self.host.ctx, self.id, e))
    }

    pub fn clamp(&self, lo: f64, hi: f64) -> Result<Tensor> {
        self.wrap((self.api().clamp())(self.host.ctx, self.id, lo, hi))
    }

    /// Batched matrix product (broadcast over leading dims).
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.wrap((self.api().matmul())(self.host.ctx, self.id, rhs.id))
    }

    fn reduce(&self, op: u32, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.wrap((self.api().reduce())(self.host.ctx, op, self.id, RSlice::from_slice(&self::dims(dims)), keepdim))
    }

    pub fn sum(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(reduce::SUM, dims, keepdim)
    }
    pub fn mean(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(reduce::MEAN, dims, keepdim)
    }
    pub fn max(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(reduce::MAX, dims, keepdim)
    }
    pub fn min(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce(reduce::MIN, dims, keepdim)
    }

    /// Sum of every element (a scalar tensor).
    pub fn sum_all(&self) -> Result<Tensor> {
        let rank = self.shape()?.len();
        self.sum(&(0..rank).collect::<Vec<_>>(), false)
    }

    /// Mean of every element (a scalar tensor).
    pub fn mean_all(&self) -> Result<Tensor> {
        let rank = self.shape()?.len();
        self.mean(&(0..rank).collect::<Vec<_>>(), false)
    }

    /// Indices (u32) of the maximum along `dim`, which is removed.
    pub fn argmax(&self, dim: usize) -> Result<Tensor> {
        self.wrap((self.api().argmax())(self.host.ctx, self.id, dim as u64))
    }

    pub fn softmax(&self, dim: usize) -> Result<Tensor> {
        self.wrap((self.api().softmax())(self.host.ctx, self.id, dim as u64))
    }

    pub fn log_softmax(&self, dim: usize) -> Result<Tensor> {
        self.wrap((self.api().log_softmax())(self.host.ctx, self.id, dim as u64))
    }

    /// Layer norm over the last dimension.
    pub fn layer_norm(&self, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        self.wrap((self.api().layer_norm())(self.host.ctx, self.id, weight.id, bias.id, eps))
    }

    /// Reshape; one entry may be -1 (inferred).
    pub fn reshape(&self, shape: &[i64]) -> Result<Tensor> {
        self.wrap((self.api().reshape())(self.host.ctx, self.id, RSlice::from_slice(shape)))
    }

    pub fn permute(&self, order: &[usize]) -> Result<Tensor> {
        self.wrap((self.api().permute())(self.host.ctx, self.id, RSlice::from_slice(&dims(order))))
    }

    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        self.wrap((self.api().transpose())(self.host.ctx, self.id, d0 as u64, d1 as u64))
    }

    /// Transpose of the last two dimensions.
    pub fn t(&self) -> Result<Tensor> {
        let rank = self.shape()?.len();
        if rank < 2 {
            return Err(Error::new(format!("t() needs at least 2 dimensions, got {rank}")));
        }
        self.transpose(rank - 2, rank - 1)
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        self.wrap((self.api().narrow())(self.host.ctx, self.id, dim as u64, start as u64, len as u64))
    }

    pub fn index_select(&self, indices: &Tensor, dim: usize) -> Result<Tensor> {
        self.wrap((self.api().index_select())(self.host.ctx, self.id, indices.id, dim as u64))
    }

    pub fn gather(&self, indices: &Tensor, dim: usize) -> Result<Tensor> {
        self.wrap((self.api().gather())(self.host.ctx, self.id, indices.id, dim as u64))
    }

    /// Treat `self` ([V, D]) as an embedding table and look up `ids`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        self.wrap((self.api().embedding())(self.host.ctx, self.id, ids.id))
    }

    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        self.wrap((self.api().broadcast_as())(self.host.ctx, self.id, RSlice::from_slice(&dims(shape))))
    }

    /// Patch embedding of pixels [B, C, H, W] with weight [D, C, P, P] -> [B, N, D].
    pub fn patch_embed(&self, weight: &Tensor, bias: Option<&Tensor>, patch: usize) -> Result<Tensor> {
        let bias: ROption<TensorId> = bias.map(|b| b.id).into();
        self.wrap((self.api().patch_embed())(self.host.ctx, self.id, weight.id, bias, patch as u64))
    }

    /// Inverted dropout with probability `p` (identity outside training).
    pub fn dropout(&self, p: f64) -> Result<Tensor> {
        self.wrap((self.api().dropout())(self.host.ctx, self.id, p))
    }

    /// The same values cut from the autograd graph.
    /// A constant copy with storage of its own: unlike [`Tensor::detach`] (which shares
    /// storage), it keeps its values when the parameter it was taken from is updated. Use it
    /// for snapshots of weights (EWC's theta*, WiSE-FT's initial weights). Needs recall-sdk
    /// >= 1.3 in the host.
    pub fn copy(&self) -> Result<Tensor> {
        let f = self.api().copy().ok_or_else(|| Error::new(old_host("copying tensors", "1.3")))?;
        self.wrap(f(self.host.ctx, self.id))
    }

    /// 2-D convolution of [B, Cin, H, W] with weight [Cout, Cin, K, K] (stride and zero padding
    /// on both spatial dimensions). Needs recall-sdk >= 1.4 in the host.
    pub fn conv2d(&self, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
        let f = self.api().conv2d().ok_or_else(|| Error::new(old_host("convolutions", "1.4")))?;
        let bias: ROption<TensorId> = bias.map(|b| b.id).into();
        self.wrap(f(self.host.ctx, self.id, weight.id, bias, stride as u64, padding as u64))
    }

    /// Mean cross-entropy of these logits [N, C] against u32 class indices `labels` [N], as a
    /// scalar. Hosts from recall-sdk 1.5 run it as one fused op; older ones get the same loss
    /// composed of log-softmax, gather and mean.
    pub fn cross_entropy(&self, labels: &Tensor) -> Result<Tensor> {
        match self.api().cross_entropy() {
            Some(f) => self.wrap(f(self.host.ctx, self.id, labels.id)),
            None => {
                let n = labels.dim(0)?;
                self.log_softmax(1)?.gather(&labels.reshape(&[n as i64, 1])?, 1)?.neg()?.mean_all()
            }
        }
    }

    /// `before` zeros in front of dimension `dim` and `after` zeros behind it. Needs
    /// recall-sdk >= 1.4 in the host.
    pub fn pad_zeros(&self, dim: usize, before: usize, after: usize) -> Result<Tensor> {
        let f = self.api().pad_zeros().ok_or_else(|| Error::new(old_host("padding", "1.4")))?;
        self.wrap(f(self.host.ctx, self.id, dim as u64, before as u64, after as u64))
    }

    /// Group norm of [B, C, ...] with `groups` groups and per-channel `weight` and `bias` [C].
    /// Needs recall-sdk >= 1.4 in the host.
    pub fn group_norm(&self, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let f = self.api().group_norm().ok_or_else(|| Error::new(old_host("group norm", "1.4")))?;
        self.wrap(f(self.host.ctx, self.id, groups as u64, weight.id, bias.id, eps))
    }

    /// Nearest-neighbour upsampling of [B, C, H, W] by `scale` -> [B, C, scale H, scale W].
    /// Needs recall-sdk >= 1.4 in the host.
    pub fn upsample_nearest2d(&self, scale: usize) -> Result<Tensor> {
        let f = self.api().upsample_nearest2d().ok_or_else(|| Error::new(old_host("upsampling", "1.4")))?;
        self.wrap(f(self.host.ctx, self.id, scale as u64))
    }

    pub fn detach(&self) -> Result<Tensor> {
        self.wrap((self.api().detach())(self.host.ctx, self.id))
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        self.wrap((self.api().to_dtype())(self.host.ctx, self.id, dtype))
    }

    /// Row-major values as f32.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        lift((self.api().to_vec_f32())(self.host.ctx, self.id)).map(|v| v.into_vec())
    }

    /// Row-major values as u32.
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        lift((self.api().to_vec_u32())(self.host.ctx, self.id)).map(|v| v.into_vec())
    }

    /// The value of a one-element tensor.
    pub fn to_scalar_f32(&self) -> Result<f32> {
        let v = self.to_vec_f32()?;
        match v.as_slice() {
            [x] => Ok(*x),
            _ => Err(Error::new(format!("to_scalar_f32 on a tensor with {} elements", v.len()))),
        }
    }

    /// L2-normalise along the last dimension.
    pub fn l2_normalize(&self, eps: f64) -> Result<Tensor> {
        let rank = self.shape()?.len();
        let norm = self.sqr()?.sum(&[rank - 1], true)?.sqrt()?.clamp(eps, f64::MAX)?;
        self.div(&norm)
    }
}

/// Convenience: a named tensor for returning loss terms and the like.
pub fn named(name: &str, t: Tensor) -> NamedTensor {
    NamedTensor { name: name.into(), id: t.into_id() }
}
