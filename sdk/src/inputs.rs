//! The names under which the host passes tensors to plugins: to a strategy's `loss_terms`,
//! and to an encoder's `forward`. Host and plugins both use these constants, so a name is
//! spelled once.

// ---- the current batch, encoded by the model being trained ----
/// Image features [B, D] of the current batch.
pub const IMAGE_FEATURES: &str = "image_features";
/// Text features [B, D] of the current batch.
pub const TEXT_FEATURES: &str = "text_features";
/// The model's learnable log logit scale, a scalar (CLIP: ln(1/0.07) at the start).
pub const LOGIT_SCALE: &str = "logit_scale";
/// Per-patch (or per-token) features of the vision tower [B, N, D], when it emits them.
pub const IMAGE_TOKENS: &str = "image_tokens";

// ---- encoder inputs (also passed to strategies: the batch itself) ----
/// Normalised pixels [B, 3, H, W].
pub const PIXEL_VALUES: &str = "pixel_values";
/// Token ids [B, L].
pub const INPUT_IDS: &str = "input_ids";
/// 1 where a token is real, 0 where it pads [B, L].
pub const ATTENTION_MASK: &str = "attention_mask";

// ---- the old model (the one the task started from), for `wants_old_model` ----
pub const OLD_IMAGE_FEATURES: &str = "old_image_features";
pub const OLD_TEXT_FEATURES: &str = "old_text_features";
pub const OLD_LOGIT_SCALE: &str = "old_logit_scale";

// ---- a reference batch, for `wants_initial_model` (ZSCL) ----
/// The reference batch encoded by the model being trained.
pub const REFERENCE_IMAGE_FEATURES: &str = "reference_image_features";
pub const REFERENCE_TEXT_FEATURES: &str = "reference_text_features";
/// The same batch encoded by the frozen initial model.
pub const INITIAL_IMAGE_FEATURES: &str = "initial_image_features";
pub const INITIAL_TEXT_FEATURES: &str = "initial_text_features";
pub const INITIAL_LOGIT_SCALE: &str = "initial_logit_scale";

// ---- a replay batch, for `Strategy::replay` in separate mode ----
/// Exemplars drawn from the host's memory, encoded by the model being trained [R, D].
pub const REPLAY_IMAGE_FEATURES: &str = "replay_image_features";
pub const REPLAY_TEXT_FEATURES: &str = "replay_text_features";
/// The same exemplars' features as the model computed them when they entered the memory
/// [R, D] (with `store_features`).
pub const REPLAY_STORED_IMAGE_FEATURES: &str = "replay_stored_image_features";
pub const REPLAY_STORED_TEXT_FEATURES: &str = "replay_stored_text_features";

// ---- a frozen teacher (`[teacher]`, TokLIP's distillation) ----
pub const TEACHER_IMAGE_FEATURES: &str = "teacher_image_features";
pub const TEACHER_IMAGE_TOKENS: &str = "teacher_image_tokens";

// ---- image tokenizers (TokLIP, VQ) ----
/// The frozen image tokenizer's code embeddings [B, N, C], the vision tower's input in TokLIP.
pub const CODE_EMBEDDINGS: &str = "code_embeddings";
/// The pixels a tokenizer trained by reconstruction is to reproduce.
pub const TARGET_PIXELS: &str = "target_pixels";
