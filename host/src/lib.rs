//! # recall-host
//!
//! The Recall host runtime: experiment config, plugin discovery and loading, the candle
//! runtime behind the plugin ABI, the optimizer, the training engine, evaluation and reports.
//! It is the only crate that knows candle.

pub mod bench;
pub mod config;
pub mod conformance;
pub mod data;
pub mod devcheck;
pub mod embed;
pub mod engine;
pub mod fetch;
pub mod finite;
pub mod fsutil;
pub mod identity;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod optim;
pub mod plugin;
pub mod reconstruction;
pub mod reference;
pub mod report;
pub mod report_html;
pub mod resolved;
pub mod rundir;
pub mod runlog;
pub mod runtime;
pub mod scaffold;
pub mod slurm;
pub mod stop;
pub mod sweep;
pub mod tracking;
