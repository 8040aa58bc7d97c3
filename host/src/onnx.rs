//! ONNX Runtime as a second backend, for frozen modules: a tower declared with
//! `backend = "onnx"` (a frozen text tower, a teacher, an exported model under evaluation) runs
//! through ONNX Runtime and its outputs enter the host graph as constants, so nothing
//! backpropagates into it and no plugin ever sees ONNX Runtime.
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`): from the tower's `library`,
//! else `RECALL_ONNXRUNTIME`, else the cached `recall fetch onnxruntime` asset (for a tower
//! with `execution_provider = "cuda"`, `onnxruntime-gpu`). One library per process (an ONNX
//! Runtime rule); its version is checked before first use.
//!
//! Where a model runs is the tower's `execution_provider`: the CPU, or ONNX Runtime's CUDA
//! execution provider, which an onnxruntime-gpu library carries and which needs the CUDA 13
//! and cuDNN 9 libraries on the loader's path. It is independent of the candle build: a CPU
//! build of Recall can run an ONNX teacher on the GPU.
//!
//! Inputs and outputs are matched by name. Host tensors are converted to the element type the
//! model declares where that is lossless (u32 ids to int64, f32 stays f32); anything else, and a
//! rank or fixed dimension the model does not accept, is an error naming the input, what the
//! model expects and what it was given.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use ort::session::builder::SessionBuilder;
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use recall_sdk::inputs;

/// The oldest ONNX Runtime this build speaks to (`ort`'s API level).
pub fn needed_version() -> String {
    format!("1.{}", ort::MINOR_VERSION)
}

/// Errors of the ONNX backend; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error(
        "ONNX Runtime library not found: {what}; run `recall fetch {asset}`, or point a tower's `library` \
         or RECALL_ONNXRUNTIME at a libonnxruntime.so (version {needed} or newer)",
        needed = needed_version()
    )]
    Missing { what: String, asset: &'static str },
    #[error(
        "the ONNX Runtime library {path} is version {found}, too old: Recall needs {needed} or newer; \
         run `recall fetch onnxruntime` and drop RECALL_ONNXRUNTIME and `library`, or point them at a newer build",
        needed = needed_version()
    )]
    TooOld { path: PathBuf, found: String },
    #[error("cannot load the ONNX Runtime library {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("ONNX model {model}: {message}")]
    Model { model: PathBuf, message: String },
    #[error("ONNX Runtime cannot run on {provider}: {message}")]
    Provider { provider: Provider, message: String },
}

/// Where ONNX Runtime runs a model (a tower's `execution_provider`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Provider {
    #[default]
    Cpu,
    /// The CUDA execution provider on this device ordinal.
    Cuda(u32),
}

impl std::str::FromStr for Provider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown execution provider `{s}`: expected `cpu`, `cuda` or `cuda:N`");
        match s {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda(0)),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Provider::Cuda).ok_or_else(bad),
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Provider::Cpu => write!(f, "cpu"),
            Provider::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Provider {
    /// The asset that carries this provider, when no library is named.
    fn asset(self) -> &'static str {
        match self {
            Provider::Cpu => "onnxruntime",
            Provider::Cuda(_) => "onnxruntime-gpu",
        }
    }

    /// Register the provider on a session being built; CPU needs nothing.
    fn register(self, builder: SessionBuilder, library: &Path) -> Result<SessionBuilder, OnnxError> {
        use ort::ep::ExecutionProvider;
        let Provider::Cuda(device) = self else { return Ok(builder) };
        let fail = |message: String| OnnxError::Provider { provider: self, message };
        if !ort::ep::CUDA::is_available().unwrap_or(false) {
            return Err(fail(format!(
                "the library {} has no CUDA execution provider (a CPU build of ONNX Runtime); run `recall fetch \
                 onnxruntime-gpu` and drop `library` and RECALL_ONNXRUNTIME (or point them at its \
                 libonnxruntime.so), or set execution_provider = \"cpu\"",
                library.display()
            )));
        }
        let cuda = ort::ep::CUDA::default().with_device_id(device as i32).build().error_on_failure();
        builder.with_execution_providers([cuda]).map_err(|e| {
            fail(format!(
                "the CUDA execution provider did not start: {e}; it needs a GPU with this ordinal and the CUDA 13 \
                 and cuDNN 9 libraries on LD_LIBRARY_PATH (the CUDA bundle's launcher adds PyTorch's)"
            ))
        })
    }
}

/// The loaded library: its path and environment.
struct Loaded {
    path: PathBuf,
    env: ort::environment::Environment,
}

static RUNTIME: Mutex<Option<Loaded>> = Mutex::new(None);

/// Which library to load: `explicit` (from the experiment), else `RECALL_ONNXRUNTIME`, else the
/// cached asset that carries `provider`.
pub fn library_path(explicit: Option<&Path>, provider: Provider) -> Result<PathBuf, OnnxError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("RECALL_ONNXRUNTIME").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let wanted = provider.asset();
    let missing = |what: String| OnnxError::Missing { what, asset: wanted };
    let registry = crate::fetch::Registry::load().map_err(|e| missing(format!("{e:#}")))?;
    // The GPU build runs on the CPU too, so a CPU tower takes it when it is the one fetched.
    let candidates: &[&str] = match provider {
        Provider::Cpu => &["onnxruntime", "onnxruntime-gpu"],
        Provider::Cuda(_) => &["onnxruntime-gpu"],
    };
    let home = crate::fetch::recall_home();
    for name in candidates {
        let asset = registry.get(name).map_err(|e| missing(format!("{e:#}")))?;
        let file = crate::fetch::asset_dir(&home, asset).join(format!("libonnxruntime.so.{}", asset.version));
        if crate::fetch::is_cached(&home, asset) && file.is_file() {
            return Ok(file);
        }
    }
    Err(missing(format!("{wanted} is not in the cache")))
}

/// Load the library once per process and return it with its environment.
fn environment(
    explicit: Option<&Path>,
    provider: Provider,
) -> Result<(PathBuf, ort::environment::Environment), OnnxError> {
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = slot.as_ref() {
        if let Some(p) = explicit {
            if p != l.path {
                tracing::warn!(loaded = %l.path.display(), asked = %p.display(), "one ONNX Runtime per process: keeping the loaded one");
            }
        }
        return Ok((l.path.clone(), l.env.clone()));
    }
    let path = library_path(explicit, provider)?;
    if !path.is_file() {
        return Err(OnnxError::Missing { what: format!("{} does not exist", path.display()), asset: provider.asset() });
    }
    let builder = ort::init_from(&path).map_err(|e| match e {
        ort::LoadDynamicError::BadVersion { version_str, path } => OnnxError::TooOld { path, found: version_str },
        other => OnnxError::Load { path: path.clone(), message: other.to_string() },
    })?;
    let env = builder
        .with_name("recall")
        .build()
        .map_err(|e| OnnxError::Load { path: path.clone(), message: e.to_string() })?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    *slot = Some(Loaded { path: path.clone(), env: env.clone() });
    Ok((path, env))
}

/// The loaded library and its build description (once a model was opened).
pub fn loaded_library() -> Option<String> {
    RUNTIME.lock().ok()?.as_ref().map(|l| format!("{} ({})", l.path.display(), ort::info()))
}

/// One input or output of a model, as the model declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct Port {
    pub name: String,
    /// ONNX element type, e.g. `float32`, `int64`.
    pub dtype: String,
    /// Dimensions; -1 where dynamic.
    pub shape: Vec<i64>,
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(|d| if *d < 0 { "?".into() } else { d.to_string() }).collect();
        write!(f, "{}: {}[{}]", self.name, self.dtype, dims.join(", "))
    }
}

fn element_name(t: TensorElementType) -> String {
    match t {
        TensorElementType::Float32 => "float32".into(),
        TensorElementType::Float64 => "float64".into(),
        TensorElementType::Float16 => "float16".into(),
        TensorElementType::Bfloat16 => "bfloat16".into(),
        TensorElementType::Int64 => "int64".into(),
        TensorElementType::Int32 => "int32".into(),
        TensorElementType::Uint32 => "uint32".into(),
        TensorElementType::Uint8 => "uint8".into(),
        TensorElementType::Int8 => "int8".into(),
        TensorElementType::Bool => "bool".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn port(name: &str, t: &ValueType) -> Port {
    match t {
        ValueType::Tensor { ty, shape, .. } => {
            Port { name: name.to_string(), dtype: element_name(*ty), shape: shape.iter().copied().collect() }
        }
        other => Port { name: name.to_string(), dtype: format!("{other:?}"), shape: Vec::new() },
    }
}

/// An ONNX model opened for inference.
pub struct OnnxModel {
    path: PathBuf,
    session: std::cell::RefCell<Session>,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
}

impl OnnxModel {
    /// Open `model` on `provider` with the library chosen by [`library_path`].
    pub fn open(model: &Path, library: Option<&Path>, threads: usize, provider: Provider) -> Result<Self, OnnxError> {
        let (library, env) = environment(library, provider)?;
        let err = |message: String| OnnxError::Model { model: model.to_path_buf(), message };
        if !model.is_file() {
            return Err(err("no such file".into()));
        }
        let builder = Session::builder(&env)
            .and_then(|b| b.with_intra_threads(threads.max(1)).map_err(ort::Error::from))
            .map_err(|e| err(e.to_string()))?;
        let session = provider.register(builder, &library)?.commit_from_file(model).map_err(|e| err(e.to_string()))?;
        let inputs = session.inputs().iter().map(|o| port(o.name(), o.dtype())).collect();
        let outputs = session.outputs().iter().map(|o| port(o.name(), o.dtype())).collect();
        Ok(OnnxModel { path: model.to_path_buf(), session: std::cell::RefCell::new(session), inputs, outputs })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, message: String) -> OnnxError {
        OnnxError::Model { model: self.path.clone(), message }
    }

    /// Run the model on named host tensors; every model input must be given. Returns the
    /// requested outputs as f32 tensors on `device` (constants: no graph behind them).
    pub fn run(&self, given: &[(&str, &Tensor)], want: &[&str], device: &Device) -> Result<Vec<Tensor>, OnnxError> {
        let names: Vec<&str> = given.iter().map(|(n, _)| *n).collect();
        let mut values: Vec<(String, ort::value::DynValue)> = Vec::new();
        for p in &self.inputs {
            let Some((_, t)) = given.iter().find(|(n, _)| *n == p.name) else {
                return Err(self.error(format!(
                    "model input `{}` has no value; given: {}; rename it with `inputs` or fill it with `zeros`",
                    p.name,
                    names.join(", ")
                )));
            };
            let dims: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
            let fits = dims.len() == p.shape.len() && dims.iter().zip(&p.shape).all(|(d, m)| *m < 0 || d == m);
            if !fits {
                return Err(self.error(format!("input {p} cannot take a tensor of shape {dims:?}")));
            }
            let bad_dtype =
                || self.error(format!("input {p} cannot take {:?} values (no lossless conversion)", t.dtype()));
            let shape: Vec<usize> = t.dims().to_vec();
            let flat = t.flatten_all().map_err(|e| self.error(e.to_string()))?;
            let value: ort::value::DynValue = match (p.dtype.as_str(), t.dtype()) {
                (
                    "float32",
                    candle_core::DType::F32
                    | candle_core::DType::F64
                    | candle_core::DType::BF16
                    | candle_core::DType::F16,
                ) => {
                    let v = flat.to_dtype(candle_core::DType::F32).and_then(|x| x.to_vec1::<f32>());
                    ort::value::Tensor::from_array((shape, v.map_err(|e| self.error(e.to_string()))?))
                        .map_err(|e| self.error(e.to_string()))?
                        .into_dyn()
                }
                ("int64", candle_core::DType::U32 | candle_core::DType::I64 | candle_core::DType::U8) => {
                    let v = flat.to_dtype(candle_core::DType::I64).and_then(|x| x.to_vec1::<i64>());
                    ort::value::Tensor::from_array((shape, v.map_err(|e| self.error(e.to_string()))?))
                        .map_err(|e| self.error(e.to_string()))?
                        .into_dyn()
                }
                ("int32", candle_core::DType::U32 | candle_core::DType::U8) => {
                    let v = flat.to_dtype(candle_core::DType::I64).and_then(|x| x.to_vec1::<i64>());
                    let v: Vec<i32> = v.map_err(|e| self.error(e.to_string()))?.into_iter().map(|x| x as i32).collect();
                    ort::value::Tensor::from_array((shape, v)).map_err(|e| self.error(e.to_string()))?.into_dyn()
                }
                _ => return Err(bad_dtype()),
            };
            values.push((p.name.clone(), value));
        }
        for w in want {
            if !self.outputs.iter().any(|o| o.name == *w) {
                let have: Vec<String> = self.outputs.iter().map(|o| o.to_string()).collect();
                return Err(self.error(format!("the model has no output `{w}`; its outputs: {}", have.join(", "))));
            }
        }
        let mut session = self.session.borrow_mut();
        let outputs = session.run(values).map_err(|e| self.error(e.to_string()))?;
        let mut out = Vec::with_capacity(want.len());
        for w in want {
            let v = &outputs[*w];
            let (shape, data) = v
                .try_extract_tensor::<f32>()
                .map_err(|e| self.error(format!("output `{w}` is not a float32 tensor: {e}")))?;
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            out.push(Tensor::from_slice(data, dims, device).map_err(|e| self.error(e.to_string()))?);
        }
        Ok(out)
    }
}

/// A one-paragraph description of a model: library version, inputs and outputs.
pub fn describe(model: &OnnxModel) -> String {
    let mut s = format!("{}\n", model.path.display());
    for p in &model.inputs {
        s.push_str(&format!("  input  {p}\n"));
    }
    for p in &model.outputs {
        s.push_str(&format!("  output {p}\n"));
    }
    s
}

/// How a tower turns a `[B, L, H]` output into `[B, H]` features.
#[derive(serde::Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The output is already `[B, D]`.
    #[default]
    None,
    /// Mean over the positions where `attention_mask` is 1 (sentence-transformers).
    Mean,
    /// The first position.
    Cls,
    /// The last position where `attention_mask` is 1 (the last position for images).
    Last,
}

/// `[model.vision]` / `[model.text]` (or a teacher) with `backend = "onnx"`.
#[derive(serde::Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct OnnxTowerConfig {
    pub backend: String,
    /// The `.onnx` file (relative to the experiment, or `asset:NAME/FILE`).
    pub model: PathBuf,
    /// The model output that holds the features.
    pub output: String,
    #[serde(default)]
    pub pooling: Pooling,
    /// Model input name -> host tensor name (`pixel_values`, `input_ids`, `attention_mask`),
    /// for models whose inputs are named otherwise.
    #[serde(default)]
    pub inputs: std::collections::BTreeMap<String, String>,
    /// Model inputs to fill with zeros shaped like `input_ids` (e.g. BERT's `token_type_ids`).
    #[serde(default)]
    pub zeros: Vec<String>,
    /// Feature width, when the model's output width is dynamic.
    #[serde(default)]
    pub embed_dim: Option<u64>,
    /// Image side or context length, when the model's input is dynamic there.
    #[serde(default)]
    pub input_size: Option<u64>,
    /// libonnxruntime to load (default: RECALL_ONNXRUNTIME, then the fetched asset).
    #[serde(default)]
    pub library: Option<PathBuf>,
    /// Intra-op threads (default: the machine's cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// `cpu` (default), `cuda` or `cuda:N` (ONNX Runtime's CUDA execution provider).
    #[serde(default)]
    pub execution_provider: Option<String>,
}

/// Whether a tower's options ask for the ONNX backend.
pub fn is_onnx(options: &toml::Table) -> bool {
    options.get("backend").and_then(|v| v.as_str()) == Some("onnx")
}

/// A frozen tower run by ONNX Runtime.
pub struct OnnxTower {
    model: OnnxModel,
    config: OnnxTowerConfig,
    pub embed_dim: u64,
    pub input_size: u64,
}

impl OnnxTower {
    /// Open the tower; `image` says which modality it serves (which input fixes its size).
    /// Errors name the option they are about as `(key, message)`.
    pub fn create(options: &toml::Table, image: bool) -> Result<Self, (String, String)> {
        let config: OnnxTowerConfig = toml::Value::Table(options.clone())
            .try_into()
            .map_err(|e: toml::de::Error| ("backend".into(), e.message().to_string()))?;
        let threads =
            config.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        let provider: Provider = match &config.execution_provider {
            Some(p) => p.parse().map_err(|e| ("execution_provider".to_string(), e))?,
            None => Provider::Cpu,
        };
        let model = OnnxModel::open(&config.model, config.library.as_deref(), threads, provider).map_err(|e| {
            let key = match e {
                OnnxError::Model { .. } => "model",
                OnnxError::Provider { .. } => "execution_provider",
                _ => "library",
            };
            (key.to_string(), e.to_string())
        })?;
        let Some(out) = model.outputs.iter().find(|o| o.name == config.output) else {
            let have: Vec<String> = model.outputs.iter().map(|o| o.to_string()).collect();
            return Err((
                "output".into(),
                format!("the model has no output `{}`; its outputs: {}", config.output, have.join(", ")),
            ));
        };
        let embed_dim = match (config.embed_dim, out.shape.last()) {
            (Some(d), _) => d,
            (None, Some(&d)) if d > 0 => d as u64,
            _ => return Err(("embed_dim".into(), format!("output {out} has a dynamic width; set embed_dim"))),
        };
        let host_name = |p: &Port| config.inputs.get(&p.name).cloned().unwrap_or_else(|| p.name.clone());
        for p in &model.inputs {
            let n = host_name(p);
            let known =
                if image { n == inputs::PIXEL_VALUES } else { n == inputs::INPUT_IDS || n == inputs::ATTENTION_MASK };
            if !known && !config.zeros.contains(&p.name) {
                let offer = if image { "pixel_values" } else { "input_ids, attention_mask" };
                return Err((
                    "inputs".into(),
                    format!("model input {p} is not one the host provides ({offer}); map it in `inputs` or list it in `zeros`"),
                ));
            }
        }
        let fixed = model.inputs.iter().find_map(|p| {
            let n = host_name(p);
            match (image, n.as_str(), p.shape.as_slice()) {
                (true, inputs::PIXEL_VALUES, [_, _, s, _]) if *s > 0 => Some(*s as u64),
                (false, inputs::INPUT_IDS, [_, l]) if *l > 0 => Some(*l as u64),
                _ => None,
            }
        });
        let input_size = match (config.input_size, fixed) {
            (Some(s), Some(f)) if s != f => {
                return Err(("input_size".into(), format!("input_size = {s}, but the model takes {f}")));
            }
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => {
                let what = if image { "the image side" } else { "the context length" };
                return Err(("input_size".into(), format!("the model's input is dynamic; set input_size ({what})")));
            }
        };
        Ok(OnnxTower { model, config, embed_dim, input_size })
    }

    pub fn model(&self) -> &OnnxModel {
        &self.model
    }

    /// Features `[B, D]` for the host's named inputs, as constants on `device` in `dtype`.
    pub fn forward(
        &self,
        inputs: &[(&str, &Tensor)],
        device: &Device,
        dtype: candle_core::DType,
    ) -> Result<Tensor, OnnxError> {
        let err = |m: String| OnnxError::Model { model: self.model.path.clone(), message: m };
        let mut zeros = Vec::new();
        if !self.config.zeros.is_empty() {
            let ids = inputs.iter().find(|(n, _)| *n == inputs::INPUT_IDS).map(|(_, t)| *t);
            let like = ids.or(inputs.first().map(|(_, t)| *t)).ok_or_else(|| err("no inputs".into()))?;
            for z in &self.config.zeros {
                zeros.push((z.as_str(), like.zeros_like().map_err(|e| err(e.to_string()))?));
            }
        }
        let mut given: Vec<(&str, &Tensor)> = Vec::new();
        for p in &self.model.inputs {
            if let Some((name, t)) = zeros.iter().find(|(n, _)| *n == p.name) {
                given.push((name, t));
                continue;
            }
            let host = self.config.inputs.get(&p.name).map(String::as_str).unwrap_or(p.name.as_str());
            if let Some((_, t)) = inputs.iter().find(|(n, _)| *n == host) {
                given.push((p.name.as_str(), *t));
            }
        }
        let out = self.model.run(&given, &[self.config.output.as_str()], device)?.remove(0);
        let mask = inputs.iter().find(|(n, _)| *n == inputs::ATTENTION_MASK).map(|(_, t)| *t);
        let pooled = pool(&out, mask, self.config.pooling)
            .map_err(|e| err(format!("pooling {:?}: {e}", self.config.pooling)))?;
        if pooled.rank() != 2 {
            return Err(err(format!(
                "output `{}` gives features of shape {:?}; set `pooling` to reduce [B, L, H] to [B, H]",
                self.config.output,
                pooled.dims()
            )));
        }
        pooled.to_dtype(dtype).map_err(|e| err(e.to_string()))
    }
}

/// Reduce `[B, L, H]` to `[B, H]` as `pooling` says (a `[B, D]` tensor passes unchanged).
pub fn pool(x: &Tensor, mask: Option<&Tensor>, pooling: Pooling) -> candle_core::Result<Tensor> {
    if x.rank() != 3 || pooling == Pooling::None {
        return Ok(x.clone());
    }
    let (b, l, _) = x.dims3()?;
    match (pooling, mask) {
        (Pooling::Cls, _) => x.narrow(1, 0, 1)?.squeeze(1),
        (Pooling::Mean, Some(m)) => {
            let m = m.to_dtype(x.dtype())?.unsqueeze(2)?;
            let sum = x.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            sum.broadcast_div(&count)
        }
        (Pooling::Mean, None) => x.mean(1),
        (Pooling::Last, Some(m)) => {
            let last: Vec<u32> = m
                .to_dtype(candle_core::DType::F32)?
                .sum(1)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|n| (n as u32).max(1) - 1)
                .collect();
            let rows: Vec<Tensor> =
                (0..b).map(|i| x.get(i)?.get(last[i] as usize)).collect::<candle_core::Result<_>>()?;
            Tensor::stack(&rows, 0)
        }
        (Pooling::Last, None) => x.narrow(1, l - 1, 1)?.squeeze(1),
        (Pooling::None, _) => Ok(x.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_reduces_as_documented() {
        let x = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((2, 3, 2)).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 0], [1, 1, 1]], &Device::Cpu).unwrap();
        let v = |t: Tensor| t.to_vec2::<f32>().unwrap();
        assert_eq!(v(pool(&x, Some(&mask), Pooling::Cls).unwrap()), vec![vec![0., 1.], vec![6., 7.]]);
        assert_eq!(v(pool(&x, Some(&mask), Pooling::Mean).unwrap()), vec![vec![1., 2.], vec![8., 9.]]);
        assert_eq!(v(pool(&x, Some(&mask), Pooling::Last).unwrap()), vec![vec![2., 3.], vec![10., 11.]]);
        assert_eq!(v(pool(&x, None, Pooling::Last).unwrap()), vec![vec![4., 5.], vec![10., 11.]]);
    }

    #[test]
    fn execution_providers_parse_and_print() {
        for (text, p) in [("cpu", Provider::Cpu), ("cuda", Provider::Cuda(0)), ("cuda:3", Provider::Cuda(3))] {
            assert_eq!(text.parse::<Provider>().unwrap(), p);
        }
        assert_eq!(Provider::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            assert!(bad.parse::<Provider>().unwrap_err().contains("expected `cpu`, `cuda` or `cuda:N`"), "{bad}");
        }
    }

    #[test]
    fn a_missing_library_says_what_to_run() {
        let err =
            OnnxModel::open(Path::new("m.onnx"), Some(Path::new("/nonexistent/libonnxruntime.so")), 1, Provider::Cpu)
                .err()
                .unwrap()
                .to_string();
        assert!(err.contains("recall fetch onnxruntime") && err.contains(&needed_version()), "{err}");
    }
}
