//! # recall-sdk
//!
//! Everything a Recall plugin needs, and nothing of the backend: this crate depends on
//! abi_stable and serde only, never on candle or ort. The host owns every tensor, every
//! parameter and the one autograd graph; a plugin holds [`Tensor`] handles and composes ops
//! through the host's function table ([`abi::HostApi`]), so gradients flow across plugins and
//! the backend (CPU, CUDA) changes without rebuilding plugins.
//!
//! A plugin implements one kind trait ([`Tokenizer`], [`Encoder`], [`Adapter`], [`Strategy`],
//! [`Evaluator`]) and exports it with [`export_plugin!`]. Plugin authors write no `unsafe` and
//! no `extern`; every exported function catches panics and reports them as errors naming the
//! plugin and the function.
//!
//! ```ignore
//! use recall_sdk::prelude::*;
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { weight: f64 }
//!
//! struct MyStrategy { weight: f64 }
//!
//! impl Strategy for MyStrategy {
//!     type Config = Config;
//!     fn create(_host: &Host, config: Config) -> Result<Self> { Ok(Self { weight: config.weight }) }
//! }
//!
//! recall_sdk::export_plugin! {
//!     name: "my-strategy",
//!     description: "an example",
//!     strategy: MyStrategy,
//! }
//! ```

pub mod abi;
pub mod checkpoint;
pub mod config;
mod error;
pub mod inputs;
mod kinds;
pub mod losses;
pub mod nn;
pub mod replay;
pub mod state;
mod tensor;

pub use abi::{DType, EncoderSpec, NamedTensor, ParamInit, SiteInfo, TaskInfo, TokenBatch};
pub use config::parse_config;
pub use error::{panic_message, Error, Result};
pub use kinds::{Adapter, Encoder, Evaluator, GradientPass, Strategy, Tokenizer};
pub use replay::{Replay, ReplayMode, ReplayPolicy};
pub use tensor::{named, Host, LogLevel, Site, Tensor};

/// What most plugins import.
pub mod prelude {
    pub use crate::abi::modality;
    pub use crate::inputs;
    pub use crate::{
        bail, Adapter, DType, Encoder, EncoderSpec, Error, Evaluator, GradientPass, Host, NamedTensor, ParamInit,
        Replay, ReplayMode, ReplayPolicy, Result, Site, SiteInfo, Strategy, TaskInfo, Tensor, TokenBatch, Tokenizer,
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::config::{ResolveProbe, ResolveUnknown, ResolveViaSerialize};
    pub use crate::kinds::{
        adapter_module, encoder_module, evaluator_module, resolve_config_shim, set_plugin_name, strategy_module,
        tokenizer_module,
    };
    pub use abi_stable;
}

/// Export a type implementing one plugin-kind trait as this cdylib's Recall plugin.
///
/// ```ignore
/// recall_sdk::export_plugin! { name: "lora", description: "LoRA adapter", adapter: Lora }
/// ```
/// The kind is one of `tokenizer`, `encoder`, `adapter`, `strategy`, `evaluator`. The plugin's
/// version is its crate version.
#[macro_export]
macro_rules! export_plugin {
    (name: $name:literal, description: $desc:literal, $kind:ident: $ty:ty $(,)?) => {
        extern "C" fn __recall_plugin_info() -> $crate::abi::PluginInfo {
            use $crate::__private::abi_stable::std_types::RStr;
            $crate::abi::PluginInfo {
                name: RStr::from_str($name),
                version: RStr::from_str(env!("CARGO_PKG_VERSION")),
                description: RStr::from_str($desc),
                sdk_version: RStr::from_str($crate::abi::ABI_VERSION),
            }
        }

        extern "C" fn __recall_resolve_config(
            text: $crate::__private::abi_stable::std_types::RStr<'_>,
        ) -> $crate::abi::PluginResult<
            $crate::__private::abi_stable::std_types::ROption<$crate::__private::abi_stable::std_types::RString>,
        > {
            #[allow(unused_imports)]
            use $crate::__private::{ResolveUnknown as _, ResolveViaSerialize as _};
            $crate::__private::resolve_config_shim(|| {
                let probe = $crate::__private::ResolveProbe::<$crate::export_plugin!(@config $kind, $ty)>(
                    ::std::marker::PhantomData,
                );
                (&&probe).resolve(text.as_str())
            })
        }

        fn __recall_root_module() -> $crate::abi::PluginModuleRef {
            $crate::__private::set_plugin_name($name);
            $crate::export_plugin!(@module $kind, $ty)
        }

        // What abi_stable's `#[export_root_module]` expands to, written through `$crate` so
        // plugin crates need no direct abi_stable dependency. The symbol name is checked
        // against abi_stable's in the SDK's tests.
        #[doc(hidden)]
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static __RECALL_LIB_HEADER: $crate::__private::abi_stable::library::LibHeader = {
            extern "C" fn erased_module() -> $crate::__private::abi_stable::library::RootModuleResult {
                $crate::__private::abi_stable::library::__call_root_module_loader(__recall_root_module)
            }
            // SAFETY: `erased_module` returns the root module of type `PluginModuleRef`, the
            // type named here, exactly as `#[export_root_module]` arranges it.
            unsafe {
                $crate::__private::abi_stable::library::LibHeader::from_constructor::<$crate::abi::PluginModuleRef>(
                    erased_module,
                    $crate::__private::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
    (@module tokenizer, $ty:ty) => { $crate::__private::tokenizer_module::<$ty>(__recall_plugin_info, __recall_resolve_config) };
    (@config tokenizer, $ty:ty) => { <$ty as $crate::Tokenizer>::Config };
    (@module encoder, $ty:ty) => { $crate::__private::encoder_module::<$ty>(__recall_plugin_info, __recall_resolve_config) };
    (@config encoder, $ty:ty) => { <$ty as $crate::Encoder>::Config };
    (@module adapter, $ty:ty) => { $crate::__private::adapter_module::<$ty>(__recall_plugin_info, __recall_resolve_config) };
    (@config adapter, $ty:ty) => { <$ty as $crate::Adapter>::Config };
    (@module strategy, $ty:ty) => { $crate::__private::strategy_module::<$ty>(__recall_plugin_info, __recall_resolve_config) };
    (@config strategy, $ty:ty) => { <$ty as $crate::Strategy>::Config };
    (@module evaluator, $ty:ty) => { $crate::__private::evaluator_module::<$ty>(__recall_plugin_info, __recall_resolve_config) };
    (@config evaluator, $ty:ty) => { <$ty as $crate::Evaluator>::Config };
}
