//! `wordpiece`: BERT-family tokenizers from a Hugging Face `tokenizer.json` (WordPiece with
//! BERT's normaliser and pre-tokeniser, as sentence-transformers models ship them), through
//! the `tokenizers` crate. Rows are `[CLS] ... [SEP]`, truncated to the context length and
//! padded with the tokenizer's pad id.

use std::path::PathBuf;

use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A `tokenizer.json`, or a model directory holding one.
    pub path: String,
    /// Tokens per row; default: `max_seq_length` of the directory's
    /// `sentence_bert_config.json`, else 512.
    pub context_length: Option<usize>,
}

pub struct WordPiece {
    tokenizer: tokenizers::Tokenizer,
    context_length: usize,
}

fn max_seq_length(dir: &std::path::Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("sentence_bert_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("max_seq_length")?.as_u64().map(|n| n as usize)
}

impl Tokenizer for WordPiece {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        let p = PathBuf::from(&cfg.path);
        let file = if p.is_dir() { p.join("tokenizer.json") } else { p.clone() };
        if !file.is_file() {
            return Err(Error::config("path", format!("no tokenizer.json at `{}`", cfg.path)));
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| Error::config("path", format!("cannot load {}: {e}", file.display())))?;
        let dir = file.parent().map(PathBuf::from).unwrap_or_default();
        let context_length = cfg.context_length.or_else(|| max_seq_length(&dir)).unwrap_or(512);
        if context_length < 2 {
            return Err(Error::config("context_length", "context_length must be at least 2"));
        }
        Ok(WordPiece { tokenizer, context_length })
    }

    fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    fn encode(&self, texts: &[&str], context_length: Option<usize>) -> Result<TokenBatch> {
        let ctx = context_length.unwrap_or(self.context_length);
        let mut tok = self.tokenizer.clone();
        tok.with_truncation(Some(TruncationParams { max_length: ctx, ..Default::default() }))
            .map_err(|e| Error::new(format!("cannot set truncation: {e}")))?;
        let pad = tok.get_padding().cloned().unwrap_or_default();
        tok.with_padding(Some(PaddingParams { strategy: PaddingStrategy::Fixed(ctx), ..pad }));
        let encodings =
            tok.encode_batch(texts.to_vec(), true).map_err(|e| Error::new(format!("tokenization failed: {e}")))?;
        let mut ids = Vec::with_capacity(texts.len() * ctx);
        let mut mask = Vec::with_capacity(texts.len() * ctx);
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        Ok(TokenBatch { ids: ids.into(), attention_mask: mask.into(), n_rows: texts.len() as u64, n_cols: ctx as u64 })
    }
}

recall_sdk::export_plugin! {
    name: "wordpiece",
    description: "BERT WordPiece tokenizer from a Hugging Face tokenizer.json",
    tokenizer: WordPiece,
}
