//! # recall-host
//!
//! The Recall host runtime: experiment config, plugin discovery and loading, the candle
//! runtime behind the plugin ABI, the optimizer, the training engine, evaluation and reports.
//! It is the only crate that knows candle.

pub mod fsutil;
pub mod runtime;
