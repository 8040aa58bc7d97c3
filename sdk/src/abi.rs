//! The types that cross the plugin boundary.
//!
//! Everything here is `#[repr(C)]` and derives `StableAbi`, so a mismatch between the host and
//! a plugin is found by abi_stable's layout check at load time instead of corrupting memory.
//! The tables (`HostApi`, the per-kind `*Fns` and `PluginModule`) are *prefix types*: the field
//! marked `#[sabi(last_prefix_field)]` was last in 1.0 and stays so forever; later minor versions
//! only append fields after it, and their accessors return `Option` so each side can tell when
//! the other is older.
//!
//! Enumerations that may grow (dtypes, op codes, init kinds) are plain integer codes rather than
//! Rust enums: adding a variant to a `StableAbi` enum is a layout break, adding a constant is not.

use std::ffi::c_void;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

/// The version of the plugin ABI described by this module. Bumped in the minor position for
/// every appended function; the loader compares it for its own messages (abi_stable performs
/// the binding check through the SDK's crate version).
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A handle to a tensor owned by the host. `generation` makes a stale handle (one whose slot
/// was released and reused) an error instead of silently naming another tensor.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorId {
    pub index: u32,
    pub generation: u32,
}

/// Opaque per-plugin-instance context through which host functions find their state.
/// A raw pointer keeps it `!Send + !Sync`, as it must be: the host graph is single-threaded.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct HostCtx {
    pub ptr: *const c_void,
}

/// What a plugin receives on every call: the host's function table and its own context.
#[repr(C)]
#[derive(StableAbi, Copy, Clone)]
pub struct HostHandle {
    pub api: HostApiRef,
    pub ctx: HostCtx,
}

/// Opaque pointer to a plugin instance's state, owned by the plugin; the host only passes it back.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct StatePtr {
    pub ptr: *mut c_void,
}

/// Element type codes.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct DType(pub u32);

impl DType {
    pub const F32: DType = DType(0);
    pub const F64: DType = DType(1);
    pub const BF16: DType = DType(2);
    pub const F16: DType = DType(3);
    pub const U32: DType = DType(4);
    pub const U8: DType = DType(5);
    pub const I64: DType = DType(6);

    /// Lower-case name as used in configs and messages.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "f32",
            1 => "f64",
            2 => "bf16",
            3 => "f16",
            4 => "u32",
            5 => "u8",
            6 => "i64",
            _ => "unknown",
        }
    }
}

/// Element-wise unary operation codes for [`HostApi::unary`].
pub mod unary {
    pub const EXP: u32 = 0;
    pub const LOG: u32 = 1;
    pub const SQRT: u32 = 2;
    pub const NEG: u32 = 3;
    pub const ABS: u32 = 4;
    pub const RELU: u32 = 5;
    /// Exact GELU, `x * Phi(x)` (PyTorch's default).
    pub const GELU: u32 = 6;
    /// The tanh approximation of GELU.
    pub const GELU_TANH: u32 = 7;
    /// `x * sigmoid(1.702 x)`, as in OpenAI CLIP.
    pub const QUICK_GELU: u32 = 8;
    pub const TANH: u32 = 9;
    pub const SIGMOID: u32 = 10;
    pub const SQR: u32 = 11;
    pub const RECIP: u32 = 12;
    pub const SILU: u32 = 13;
}

/// Broadcasting binary operation codes for [`HostApi::binary`].
pub mod binary {
    pub const ADD: u32 = 0;
    pub const SUB: u32 = 1;
    pub const MUL: u32 = 2;
    pub const DIV: u32 = 3;
    pub const MAXIMUM: u32 = 4;
    pub const MINIMUM: u32 = 5;
}

/// Reduction codes for [`HostApi::reduce`].
pub mod reduce {
    pub const SUM: u32 = 0;
    pub const MEAN: u32 = 1;
    pub const MAX: u32 = 2;
    pub const MIN: u32 = 3;
}

/// How the host initialises a parameter it creates for a plugin.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct ParamInit {
    /// One of the `ParamInit::*` kind codes.
    pub kind: u32,
    pub a: f64,
    pub b: f64,
}

impl ParamInit {
    pub const KIND_CONSTANT: u32 = 0;
    pub const KIND_NORMAL: u32 = 1;
    pub const KIND_UNIFORM: u32 = 2;

    /// Every element equal to `value`.
    pub const fn constant(value: f64) -> Self {
        Self { kind: Self::KIND_CONSTANT, a: value, b: 0.0 }
    }
    pub const fn zeros() -> Self {
        Self::constant(0.0)
    }
    pub const fn ones() -> Self {
        Self::constant(1.0)
    }
    /// Normal distribution with the given mean and standard deviation.
    pub const fn normal(mean: f64, std: f64) -> Self {
        Self { kind: Self::KIND_NORMAL, a: mean, b: std }
    }
    /// Uniform distribution on `[lo, hi)`.
    pub const fn uniform(lo: f64, hi: f64) -> Self {
        Self { kind: Self::KIND_UNIFORM, a: lo, b: hi }
    }
}

/// A tensor handle with a name: how batches, features and loss terms are passed.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct NamedTensor {
    pub name: RString,
    pub id: TensorId,
}

/// A named scalar result (metric).
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct Metric {
    pub name: RString,
    pub value: f64,
}

/// An adaptable linear layer declared by an encoder (see [`HostApi::declare_linear`]).
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct SiteInfo {
    pub id: u32,
    /// Fully scoped name, e.g. `vision.blocks.0.attn.q_proj`.
    pub name: RString,
    pub in_features: u64,
    pub out_features: u64,
}

/// Modality codes of an encoder's input.
pub mod modality {
    pub const IMAGE: u32 = 0;
    pub const TEXT: u32 = 1;
}

/// What the host needs to know to feed an encoder.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct EncoderSpec {
    /// A [`modality`] code.
    pub modality: u32,
    /// Width of the output features.
    pub embed_dim: u64,
    /// Image side in pixels (image encoders) or context length in tokens (text encoders).
    pub input_size: u64,
}

/// Token ids for a batch of texts: `n_rows` rows of `n_cols` ids, padded with zeros.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct TokenBatch {
    pub ids: RVec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: RVec<u32>,
    pub n_rows: u64,
    pub n_cols: u64,
}

/// The plugin kinds a module can implement.
pub mod kind {
    pub const TOKENIZER: &str = "tokenizer";
    pub const ENCODER: &str = "encoder";
    pub const ADAPTER: &str = "adapter";
    pub const STRATEGY: &str = "strategy";
    pub const EVALUATOR: &str = "evaluator";
}

/// Static facts about a plugin module.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginInfo {
    pub name: RStr<'static>,
    pub version: RStr<'static>,
    pub description: RStr<'static>,
    /// The recall-sdk version the plugin was built against.
    pub sdk_version: RStr<'static>,
}

/// An error returned by a plugin. `config_key` names the offending key of the plugin's config
/// section when the error is about configuration, so the host can point at file:line:column.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginError {
    pub message: RString,
    pub config_key: ROption<RString>,
}

/// Information about the task being started or finished.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct TaskInfo {
    /// 0-based position of the task in the sequence.
    pub index: u64,
    pub name: RString,
    /// Number of optimizer steps this task will run.
    pub n_steps: u64,
}

/// One tensor listed in a checkpoint file.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct CheckpointEntry {
    pub name: RString,
    pub shape: RVec<u64>,
    pub dtype: DType,
}

/// One parameter of the model (listed for strategies such as EWC).
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ParamEntry {
    pub name: RString,
    pub shape: RVec<u64>,
    pub trainable: bool,
}

/// Result of a host call.
pub type HostResult<T> = RResult<T, RString>;
/// Result of a plugin call.
pub type PluginResult<T> = RResult<T, PluginError>;

/// The host-function table: every operation a plugin can perform on host-owned tensors.
///
/// Append-only. `is_training` is the field that was last in 1.0 and must stay marked.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostApiRef)))]
#[sabi(missing_field(option))]
pub struct HostApi {
    /// Release a handle; releasing an already released handle is a no-op.
    pub release: extern "C" fn(HostCtx, TensorId),
    /// A second handle to the same tensor.
    pub retain: extern "C" fn(HostCtx, TensorId) -> HostResult<TensorId>,
    pub shape: extern "C" fn(HostCtx, TensorId) -> HostResult<RVec<u64>>,
    pub dtype: extern "C" fn(HostCtx, TensorId) -> HostResult<DType>,
    /// A new constant tensor from f32 data, in the runtime's float dtype.
    pub tensor_f32: extern "C" fn(HostCtx, RSlice<f32>, RSlice<u64>) -> HostResult<TensorId>,
    /// A new u32 tensor (ids, indices, masks).
    pub tensor_u32: extern "C" fn(HostCtx, RSlice<u32>, RSlice<u64>) -> HostResult<TensorId>,
    pub full: extern "C" fn(HostCtx, f64, RSlice<u64>, DType) -> HostResult<TensorId>,
    pub to_vec_f32: extern "C" fn(HostCtx, TensorId) -> HostResult<RVec<f32>>,
    pub to_vec_u32: extern "C" fn(HostCtx, TensorId) -> HostResult<RVec<u32>>,
    /// Get or create a host-owned parameter named `name` inside the plugin's scope.
    pub param: extern "C" fn(HostCtx, RStr<'_>, RSlice<u64>, ParamInit, bool) -> HostResult<TensorId>,
    /// Re-initialise a parameter with the init it was created with.
    pub param_reset: extern "C" fn(HostCtx, TensorId) -> HostResult<()>,
    /// Overwrite a parameter's value in place (same shape); outside the autograd graph.
    pub param_assign: extern "C" fn(HostCtx, TensorId, TensorId) -> HostResult<()>,
    /// Declare an adaptable linear layer (`y = x W^T + b`, W: [out, in]); returns its site id.
    pub declare_linear: extern "C" fn(HostCtx, RStr<'_>, u64, u64, bool, ParamInit, ParamInit) -> HostResult<u32>,
    /// Apply the site's linear layer plus the deltas of every adapter attached to it.
    pub linear: extern "C" fn(HostCtx, u32, TensorId) -> HostResult<TensorId>,
    /// The base weight parameter of a site.
    pub site_weight: extern "C" fn(HostCtx, u32) -> HostResult<TensorId>,
    pub unary: extern "C" fn(HostCtx, u32, TensorId) -> HostResult<TensorId>,
    pub binary: extern "C" fn(HostCtx, u32, TensorId, TensorId) -> HostResult<TensorId>,
    /// `x * mul + add`.
    pub affine: extern "C" fn(HostCtx, TensorId, f64, f64) -> HostResult<TensorId>,
    pub powf: extern "C" fn(HostCtx, TensorId, f64) -> HostResult<TensorId>,
    pub clamp: extern "C" fn(HostCtx, TensorId, f64, f64) -> HostResult<TensorId>,
    /// Batched matrix product with broadcasting over leading dimensions.
    pub matmul: extern "C" fn(HostCtx, TensorId, TensorId) -> HostResult<TensorId>,
    pub reduce: extern "C" fn(HostCtx, u32, TensorId, RSlice<u64>, bool) -> HostResult<TensorId>,
    pub argmax: extern "C" fn(HostCtx, TensorId, u64) -> HostResult<TensorId>,
    pub softmax: extern "C" fn(HostCtx, TensorId, u64) -> HostResult<TensorId>,
    pub log_softmax: extern "C" fn(HostCtx, TensorId, u64) -> HostResult<TensorId>,
    /// Layer norm over the last dimension with affine weight and bias.
    pub layer_norm: extern "C" fn(HostCtx, TensorId, TensorId, TensorId, f64) -> HostResult<TensorId>,
    /// Reshape; one entry may be -1.
    pub reshape: extern "C" fn(HostCtx, TensorId, RSlice<i64>) -> HostResult<TensorId>,
    pub permute: extern "C" fn(HostCtx, TensorId, RSlice<u64>) -> HostResult<TensorId>,
    pub transpose: extern "C" fn(HostCtx, TensorId, u64, u64) -> HostResult<TensorId>,
    pub narrow: extern "C" fn(HostCtx, TensorId, u64, u64, u64) -> HostResult<TensorId>,
    pub cat: extern "C" fn(HostCtx, RSlice<TensorId>, u64) -> HostResult<TensorId>,
    pub index_select: extern "C" fn(HostCtx, TensorId, TensorId, u64) -> HostResult<TensorId>,
    pub gather: extern "C" fn(HostCtx, TensorId, TensorId, u64) -> HostResult<TensorId>,
    /// Rows of `table` ([V, D]) at `ids` (any shape) -> [..ids, D].
    pub embedding: extern "C" fn(HostCtx, TensorId, TensorId) -> HostResult<TensorId>,
    pub broadcast_as: extern "C" fn(HostCtx, TensorId, RSlice<u64>) -> HostResult<TensorId>,
    /// Non-overlapping patch embedding: pixels [B, C, H, W], weight [D, C, P, P], optional bias
    /// [D] -> [B, (H/P)*(W/P), D] in row-major patch order (a stride-P convolution).
    pub patch_embed: extern "C" fn(HostCtx, TensorId, TensorId, ROption<TensorId>, u64) -> HostResult<TensorId>,
    /// Scaled dot-product attention on [B, H, L, Dh] inputs. `key_padding_mask` is [B, Lk]
    /// with 1 for keys to attend to and 0 for padding.
    pub attention:
        extern "C" fn(HostCtx, TensorId, TensorId, TensorId, bool, ROption<TensorId>, f64) -> HostResult<TensorId>,
    /// Inverted dropout; the identity outside training.
    pub dropout: extern "C" fn(HostCtx, TensorId, f64) -> HostResult<TensorId>,
    pub detach: extern "C" fn(HostCtx, TensorId) -> HostResult<TensorId>,
    pub to_dtype: extern "C" fn(HostCtx, TensorId, DType) -> HostResult<TensorId>,
    /// Log a message through the host's logger (levels: 0 error .. 4 trace).
    pub log: extern "C" fn(HostCtx, u32, RStr<'_>),
    #[sabi(last_prefix_field)]
    pub is_training: extern "C" fn(HostCtx) -> bool,
    // ---- appended in 1.1 ----
    /// The tensors of a checkpoint file: names, shapes, dtypes. Safetensors, or (hosts from
    /// 1.4) a PyTorch zip checkpoint, `file.pt#key` naming a nested state dict.
    pub checkpoint_index: extern "C" fn(HostCtx, RStr<'_>) -> HostResult<RVec<CheckpointEntry>>,
    /// One tensor of a checkpoint file, as a constant in the runtime's float dtype (integer
    /// tensors keep their dtype).
    pub checkpoint_tensor: extern "C" fn(HostCtx, RStr<'_>, RStr<'_>) -> HostResult<TensorId>,
    // ---- appended in 1.3 ----
    /// Every parameter of the model: full name, shape, whether it trains now.
    pub model_params: extern "C" fn(HostCtx) -> HostResult<RVec<ParamEntry>>,
    /// A model parameter by full name: the live tensor (gradients flow into it).
    pub model_param: extern "C" fn(HostCtx, RStr<'_>) -> HostResult<TensorId>,
    /// The gradient of a parameter from the latest backward pass, while a strategy hook that
    /// follows one runs (`after_backward`, `on_gradients`); `None` when it got none.
    pub grad: extern "C" fn(HostCtx, TensorId) -> HostResult<ROption<TensorId>>,
    /// A detached copy with storage of its own (`detach` shares storage, so a detached
    /// parameter changes when the parameter is updated; a snapshot must be a copy).
    pub copy: extern "C" fn(HostCtx, TensorId) -> HostResult<TensorId>,
    // ---- appended in 1.4 ----
    /// 2-D convolution (cross-correlation, as torch's `conv2d`): x [B, Cin, H, W], weight
    /// [Cout, Cin, Kh, Kw], optional bias [Cout], the same stride and zero padding on both
    /// spatial dimensions -> [B, Cout, H', W'].
    pub conv2d: extern "C" fn(HostCtx, TensorId, TensorId, ROption<TensorId>, u64, u64) -> HostResult<TensorId>,
    /// Zeros added along one dimension: `(x, dim, before, after)` (torch's `F.pad` with a
    /// constant 0, one dimension at a time; asymmetric padding before a strided convolution).
    pub pad_zeros: extern "C" fn(HostCtx, TensorId, u64, u64, u64) -> HostResult<TensorId>,
    /// Group norm on [B, C, ...]: `(x, groups, weight [C], bias [C], eps)`. Statistics over each
    /// group of `C / groups` channels and all positions (biased variance), then a per-channel
    /// affine, as torch's `nn.GroupNorm`.
    pub group_norm: extern "C" fn(HostCtx, TensorId, u64, TensorId, TensorId, f64) -> HostResult<TensorId>,
    /// Nearest-neighbour upsampling of [B, C, H, W] by an integer factor -> [B, C, sH, sW]
    /// (torch's `F.interpolate(mode="nearest", scale_factor=s)`).
    pub upsample_nearest2d: extern "C" fn(HostCtx, TensorId, u64) -> HostResult<TensorId>,
    /// Publish a side output of the current call under a name (an encoder's per-token features
    /// as `tokens`), which the host may hand to strategies. Kept until the plugin's next call.
    pub emit: extern "C" fn(HostCtx, RStr<'_>, TensorId) -> HostResult<()>,
    // ---- appended in 1.5 ----
    /// Mean cross-entropy of logits [N, C] against u32 class indices [N] -> a scalar (one
    /// fused op forward and backward on hosts that have a kernel for the logits).
    pub cross_entropy: extern "C" fn(HostCtx, TensorId, TensorId) -> HostResult<TensorId>,
    /// Multi-head attention on head-packed inputs: q [B, Lq, H * Dh], k and v [B, Lk, H * Dh],
    /// `heads`, causal, optional key padding mask [B, Lk] (1: attend), scale -> [B, Lq, H * Dh].
    /// The same values as `attention` on the heads split out, without the split and merge.
    pub attention_heads:
        extern "C" fn(HostCtx, TensorId, TensorId, TensorId, u64, bool, ROption<TensorId>, f64) -> HostResult<TensorId>,
    #[cfg(feature = "abi-next")]
    /// Appended after 1.0 (present only in SDK builds with the `abi-next` feature, which exists
    /// to test ABI evolution): returns the number of live tensor handles.
    pub live_handles: extern "C" fn(HostCtx) -> u64,
}

/// Functions of a tokenizer plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = TokenizerFnsRef)))]
#[sabi(missing_field(option))]
pub struct TokenizerFns {
    pub create: extern "C" fn(HostHandle, RStr<'_>) -> PluginResult<StatePtr>,
    pub destroy: extern "C" fn(StatePtr) -> PluginResult<()>,
    pub vocab_size: extern "C" fn(StatePtr) -> PluginResult<u64>,
    /// Encode texts at `context_length` (0: the tokenizer's default).
    #[sabi(last_prefix_field)]
    pub encode: extern "C" fn(StatePtr, RSlice<RString>, u64) -> PluginResult<TokenBatch>,
}

/// Functions of an encoder plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = EncoderFnsRef)))]
#[sabi(missing_field(option))]
pub struct EncoderFns {
    pub create: extern "C" fn(HostHandle, RStr<'_>) -> PluginResult<StatePtr>,
    pub destroy: extern "C" fn(StatePtr) -> PluginResult<()>,
    pub spec: extern "C" fn(StatePtr) -> PluginResult<EncoderSpec>,
    /// Inputs by name (`pixel_values`, `input_ids`, `attention_mask`) -> features [B, embed_dim].
    #[sabi(last_prefix_field)]
    pub forward: extern "C" fn(StatePtr, HostHandle, RSlice<NamedTensor>) -> PluginResult<TensorId>,
}

/// Functions of an adapter plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = AdapterFnsRef)))]
#[sabi(missing_field(option))]
pub struct AdapterFns {
    /// Create over the model's adapter sites; the adapter picks the ones it targets.
    pub create: extern "C" fn(HostHandle, RStr<'_>, RSlice<SiteInfo>) -> PluginResult<StatePtr>,
    pub destroy: extern "C" fn(StatePtr) -> PluginResult<()>,
    /// Ids of the sites this adapter attached to.
    pub targets: extern "C" fn(StatePtr) -> PluginResult<RVec<u32>>,
    /// The delta the adapter adds to `linear(site, x)`, or none for sites it does not adapt.
    pub delta: extern "C" fn(StatePtr, HostHandle, u32, TensorId) -> PluginResult<ROption<TensorId>>,
    /// Fold the adapter into the base weights with `coefficient` (see REFERENCES: C-CLIP).
    pub merge: extern "C" fn(StatePtr, HostHandle, f64) -> PluginResult<()>,
    /// Re-initialise the adapter (a fresh adapter for the next task).
    #[sabi(last_prefix_field)]
    pub reset: extern "C" fn(StatePtr, HostHandle) -> PluginResult<()>,
}

/// Functions of a strategy plugin (hooks in Avalanche order).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = StrategyFnsRef)))]
#[sabi(missing_field(option))]
pub struct StrategyFns {
    pub create: extern "C" fn(HostHandle, RStr<'_>) -> PluginResult<StatePtr>,
    pub destroy: extern "C" fn(StatePtr) -> PluginResult<()>,
    pub before_task: extern "C" fn(StatePtr, HostHandle, TaskInfo) -> PluginResult<()>,
    pub before_step: extern "C" fn(StatePtr, HostHandle, u64) -> PluginResult<()>,
    /// Extra loss terms for the current batch (inputs: features, logit scale, batch tensors).
    pub loss_terms: extern "C" fn(StatePtr, HostHandle, RSlice<NamedTensor>) -> PluginResult<RVec<NamedTensor>>,
    pub after_backward: extern "C" fn(StatePtr, HostHandle, u64) -> PluginResult<()>,
    pub after_step: extern "C" fn(StatePtr, HostHandle, u64) -> PluginResult<()>,
    pub after_task: extern "C" fn(StatePtr, HostHandle, TaskInfo) -> PluginResult<()>,
    pub save_state: extern "C" fn(StatePtr, HostHandle) -> PluginResult<RVec<u8>>,
    #[sabi(last_prefix_field)]
    pub load_state: extern "C" fn(StatePtr, HostHandle, RSlice<u8>) -> PluginResult<()>,
    // ---- appended in 1.2 ----
    /// Whether `loss_terms` needs the old model's features (`old_image_features`,
    /// `old_text_features`): the host then keeps a frozen snapshot of the model from the end of
    /// the previous task. Absent in older plugins, which are taken not to need it.
    pub wants_old_model: extern "C" fn(StatePtr) -> PluginResult<bool>,
    // ---- appended in 1.3 ----
    /// How many batches of a finished task's training data the strategy wants gradients of
    /// (the task loss only, e.g. for EWC's Fisher); 0: none.
    pub gradient_batches: extern "C" fn(StatePtr) -> PluginResult<u64>,
    /// Called after each of those backward passes (batch index as the argument), before
    /// `after_task`; `Host::grad` gives the gradients.
    pub on_gradients: extern "C" fn(StatePtr, HostHandle, TaskInfo, u64) -> PluginResult<()>,
    /// Whether `loss_terms` needs the initial model (before the first task) on a reference
    /// batch: the host then passes `reference_image_features` / `reference_text_features`
    /// (the model being trained) and `initial_image_features` / `initial_text_features` /
    /// `initial_logit_scale` (the frozen initial model) on the same batch.
    pub wants_initial_model: extern "C" fn(StatePtr) -> PluginResult<bool>,
    // ---- appended in 1.6 ----
    /// When the gradient pass of `gradient_batches` runs, as a `GRADIENT_PASS_*` code:
    /// after the task on its training data (the default, and what older plugins get), or
    /// before the task, on the model the task starts from and the task's held-out split.
    pub gradient_pass: extern "C" fn(StatePtr) -> PluginResult<u32>,
    // ---- appended in 1.7 ----
    /// The exemplar memory the strategy asks the host to keep and draw replay batches from;
    /// `budget` 0: none (what older plugins get).
    pub replay: extern "C" fn(StatePtr) -> PluginResult<ReplaySpec>,
}

/// A strategy's request for a host-managed exemplar memory (`StrategyFns::replay`). The host
/// keeps the memory (which examples, and their features when asked), saves it with every
/// checkpoint, and draws a replay batch from it at each step.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplaySpec {
    /// Exemplars kept, in examples; 0: no memory.
    pub budget: u64,
    /// How the memory is filled: a `REPLAY_POLICY_*` code.
    pub policy: u32,
    /// Exemplars drawn for each step's replay batch.
    pub batch_size: u64,
    /// Where the replay batch goes: a `REPLAY_MODE_*` code.
    pub mode: u32,
    /// Keep each exemplar's image and text features as the model computed them when it
    /// entered the memory (DER's targets), passed as `replay_stored_*_features`.
    pub store_features: bool,
}

/// `ReplaySpec::policy`: reservoir sampling over every training example the steps see.
pub const REPLAY_POLICY_RESERVOIR: u32 = 0;
/// `ReplaySpec::policy`: after each task, the budget split evenly over the tasks seen.
pub const REPLAY_POLICY_TASK_BALANCED: u32 = 1;
/// `ReplaySpec::policy`: after each task, the budget split evenly over the classes seen.
pub const REPLAY_POLICY_CLASS_BALANCED: u32 = 2;
/// `ReplaySpec::mode`: the replay examples join the step's batch (one forward, one task loss).
pub const REPLAY_MODE_JOIN: u32 = 0;
/// `ReplaySpec::mode`: the replay batch has a forward of its own, its features passed as
/// `replay_image_features` / `replay_text_features`.
pub const REPLAY_MODE_SEPARATE: u32 = 1;

/// `StrategyFns::gradient_pass`: after the task, the trained model on the task's training data.
pub const GRADIENT_PASS_AFTER_TASK: u32 = 0;
/// `StrategyFns::gradient_pass`: before the task trains, the model it starts from (the old
/// model) on the task's held-out split, as C-CLIP's code estimates EWC's Fisher.
pub const GRADIENT_PASS_BEFORE_TASK: u32 = 1;

/// Functions of an evaluator plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = EvaluatorFnsRef)))]
#[sabi(missing_field(option))]
pub struct EvaluatorFns {
    pub create: extern "C" fn(HostHandle, RStr<'_>) -> PluginResult<StatePtr>,
    pub destroy: extern "C" fn(StatePtr) -> PluginResult<()>,
    /// Inputs by name (e.g. `image_embeds`, `text_embeds`, `text_image_index`) -> metrics.
    #[sabi(last_prefix_field)]
    pub evaluate: extern "C" fn(StatePtr, HostHandle, RSlice<NamedTensor>) -> PluginResult<RVec<Metric>>,
    #[cfg(feature = "abi-next")]
    /// Appended only in SDK builds with the `abi-next` feature: a plugin table longer than
    /// the in-tree plugins', to test loading plugins of two SDK versions into one process.
    pub next_probe: extern "C" fn() -> u64,
}

/// The root module every Recall plugin exports. A module implements exactly one kind; the
/// other kind tables are `None`. New kinds are appended as new fields.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(option))]
pub struct PluginModule {
    pub info: extern "C" fn() -> PluginInfo,
    pub tokenizer: ROption<TokenizerFnsRef>,
    pub encoder: ROption<EncoderFnsRef>,
    pub adapter: ROption<AdapterFnsRef>,
    pub strategy: ROption<StrategyFnsRef>,
    #[sabi(last_prefix_field)]
    pub evaluator: ROption<EvaluatorFnsRef>,
    // ---- appended in 1.7 ----
    /// A config section as the plugin resolves it, every default filled in, as TOML; `None`
    /// when the plugin's config type cannot say (it does not implement `Serialize`). The
    /// host records it (config.resolved.toml, the tracked params, the resume check).
    pub resolve_config: extern "C" fn(RStr<'_>) -> PluginResult<ROption<RString>>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "recall_plugin";
    const NAME: &'static str = "recall_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

impl PluginModuleRef {
    /// The kind this module implements, by the first kind table present.
    pub fn kind_name(&self) -> &'static str {
        if self.tokenizer().is_some() {
            kind::TOKENIZER
        } else if self.encoder().is_some() {
            kind::ENCODER
        } else if self.adapter().is_some() {
            kind::ADAPTER
        } else if self.strategy().is_some() {
            kind::STRATEGY
        } else if self.evaluator().is_some() {
            kind::EVALUATOR
        } else {
            "none"
        }
    }
}

/// The exported symbol's name, as abi_stable's `#[export_root_module]` would mangle it. The
/// SDK's `export_plugin!` writes the static itself (through `$crate::`) so that plugin crates
/// need only recall-sdk as a dependency; a unit test keeps this in step with abi_stable.
pub const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_module_symbol_matches_abi_stable() {
        assert_eq!(ROOT_MODULE_SYMBOL, abi_stable::library::ROOT_MODULE_LOADER_NAME);
    }
}
