//! `clip-bpe`: OpenAI CLIP's byte-level BPE tokenizer, as open_clip implements it.
//!
//! Text is cleaned (HTML entities unescaped twice, whitespace collapsed, lower-cased), split
//! with CLIP's pattern, mapped byte-by-byte to printable characters, merged with the 48,894
//! BPE merges of `bpe_simple_vocab_16e6.txt.gz` (shipped in `data/`, MIT, from open_clip)
//! and wrapped in `<start_of_text>` / `<end_of_text>`. Sequences longer than the context are
//! truncated keeping the end-of-text token last, as open_clip does.
//!
//! open_clip first runs `ftfy.fix_text`; [`fix_text`] implements the parts of it that change
//! well-formed text (HTML unescaping, ligatures, character width, curly quotes, line breaks,
//! control characters, NFC). Not done: ftfy's mojibake repair (`fix_encoding`,
//! `fix_c1_controls`), which only changes text that was mis-decoded upstream.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;

use recall_sdk::prelude::*;
use serde::{Deserialize, Serialize};

static VOCAB_GZ: &[u8] = include_bytes!("../data/bpe_simple_vocab_16e6.txt.gz");

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Default context length (tokens per row, including start and end tokens).
    #[serde(default = "default_context")]
    pub context_length: usize,
}

fn default_context() -> usize {
    77
}

/// The tokenizer proper, independent of the plugin machinery.
pub struct Bpe {
    byte_encoder: [char; 256],
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    pattern: regex::Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
    pub sot: u32,
    pub eot: u32,
}

/// GPT-2's reversible byte -> printable character table, and the characters in the order
/// the vocabulary lists them (printable bytes first, as the Python dict's insertion order).
fn bytes_to_unicode() -> ([char; 256], Vec<char>) {
    let mut bs: Vec<u32> =
        ('!' as u32..='~' as u32).chain('¡' as u32..='¬' as u32).chain('®' as u32..='ÿ' as u32).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = ['\0'; 256];
    let mut order = Vec::with_capacity(256);
    for (b, c) in bs.into_iter().zip(cs) {
        let c = char::from_u32(c).expect("valid code point");
        table[b as usize] = c;
        order.push(c);
    }
    (table, order)
}

impl Bpe {
    pub fn new() -> std::result::Result<Self, String> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(VOCAB_GZ)
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read the BPE vocabulary: {e}"))?;
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(49152 - 256 - 2)
            .map(|l| {
                let mut it = l.split_whitespace();
                (it.next().unwrap_or("").to_string(), it.next().unwrap_or("").to_string())
            })
            .collect();
        let (byte_encoder, order) = bytes_to_unicode();
        let mut vocab: Vec<String> = order.iter().map(|c| c.to_string()).collect();
        vocab.extend(order.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        let encoder: HashMap<String, u32> = vocab.into_iter().enumerate().map(|(i, v)| (v, i as u32)).collect();
        let ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i)).collect();
        let pattern = regex::Regex::new(
            r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| e.to_string())?;
        let sot = encoder["<start_of_text>"];
        let eot = encoder["<end_of_text>"];
        Ok(Bpe { byte_encoder, encoder, ranks, pattern, cache: Mutex::new(HashMap::new()), sot, eot })
    }

    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    fn bpe(&self, token: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().ok().and_then(|c| c.get(token).cloned()) {
            return ids;
        }
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, _)) = best else { break };
            let (first, second) = {
                let (_, i) = best.unwrap();
                (word[i].clone(), word[i + 1].clone())
            };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        let ids: Vec<u32> = word.iter().filter_map(|w| self.encoder.get(w).copied()).collect();
        if let Ok(mut c) = self.cache.lock() {
            c.insert(token.to_string(), ids.clone());
        }
        ids
    }

    /// Clean as open_clip's `lower` cleaner: ftfy, HTML-unescape twice, collapse whitespace,
    /// lower-case.
    pub fn clean(text: &str) -> String {
        let fixed = fix_text(text);
        let once = html_escape::decode_html_entities(&fixed);
        let twice = html_escape::decode_html_entities(&once);
        twice.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
    }

    /// Token ids of `text` without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = Self::clean(text);
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&cleaned) {
            match m.as_str() {
                "<start_of_text>" => ids.push(self.sot),
                "<end_of_text>" => ids.push(self.eot),
                tok => {
                    let mapped: String = tok.bytes().map(|b| self.byte_encoder[b as usize]).collect();
                    ids.extend(self.bpe(&mapped));
                }
            }
        }
        ids
    }

    /// `[sot] + ids + [eot]`, truncated to `context` keeping `eot` last, zero-padded.
    pub fn encode_row(&self, text: &str, context: usize) -> Vec<u32> {
        let mut row = vec![self.sot];
        row.extend(self.encode(text));
        row.push(self.eot);
        if row.len() > context {
            row.truncate(context);
            if let Some(last) = row.last_mut() {
                *last = self.eot;
            }
        }
        row.resize(context, 0);
        row
    }
}

/// The text fixes of `ftfy.fix_text` that apply to well-formed text, in ftfy's order.
pub fn fix_text(text: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    // ftfy unescapes HTML only when the text has no literal tags.
    let text = if text.contains('<') { text.to_string() } else { html_escape::decode_html_entities(text).into_owned() };
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // Ligatures.
            'Ĳ' => out.push_str("IJ"),
            'ĳ' => out.push_str("ij"),
            'ŉ' => out.push_str("ʼn"),
            'Ǳ' => out.push_str("DZ"),
            'ǲ' => out.push_str("Dz"),
            'ǳ' => out.push_str("dz"),
            'Ǆ' => out.push_str("DŽ"),
            'ǅ' => out.push_str("Dž"),
            'ǆ' => out.push_str("dž"),
            'Ǉ' => out.push_str("LJ"),
            'ǈ' => out.push_str("Lj"),
            'ǉ' => out.push_str("lj"),
            'Ǌ' => out.push_str("NJ"),
            'ǋ' => out.push_str("Nj"),
            'ǌ' => out.push_str("nj"),
            'ﬀ' => out.push_str("ff"),
            'ﬁ' => out.push_str("fi"),
            'ﬂ' => out.push_str("fl"),
            'ﬃ' => out.push_str("ffi"),
            'ﬄ' => out.push_str("ffl"),
            'ﬅ' => out.push_str("ſt"),
            'ﬆ' => out.push_str("st"),
            // Character width: the ideographic space, and full/half-width forms by NFKC.
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ffef}' => out.extend(std::iter::once(c).nfkc()),
            // Curly quotes.
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => out.push('\''),
            '\u{201c}'..='\u{201f}' => out.push('"'),
            // Line breaks.
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push('\n');
            }
            '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            // Terminal escapes (ESC [ ... letter).
            '\u{1b}' if chars.peek() == Some(&'[') => {
                chars.next();
                while let Some(&n) = chars.peek() {
                    chars.next();
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            // Control characters.
            '\u{0}'..='\u{8}'
            | '\u{b}'
            | '\u{e}'..='\u{1f}'
            | '\u{7f}'
            | '\u{206a}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffc}' => {}
            c => out.push(c),
        }
    }
    out.nfc().collect()
}

pub struct ClipBpe {
    bpe: Bpe,
    context_length: usize,
}

impl Tokenizer for ClipBpe {
    type Config = Config;

    fn create(_host: &Host, cfg: Config) -> Result<Self> {
        if cfg.context_length < 2 {
            return Err(Error::config("context_length", "context_length must be at least 2 (start and end tokens)"));
        }
        Ok(ClipBpe { bpe: Bpe::new().map_err(Error::new)?, context_length: cfg.context_length })
    }

    fn vocab_size(&self) -> usize {
        self.bpe.vocab_size()
    }

    fn encode(&self, texts: &[&str], context_length: Option<usize>) -> Result<TokenBatch> {
        let ctx = context_length.unwrap_or(self.context_length);
        if ctx < 2 {
            bail!("context length must be at least 2, got {ctx}");
        }
        let mut ids = Vec::with_capacity(texts.len() * ctx);
        let mut mask = Vec::with_capacity(texts.len() * ctx);
        for t in texts {
            let row = self.bpe.encode_row(t, ctx);
            let len = row.iter().position(|&i| i == self.bpe.eot).map_or(ctx, |p| p + 1);
            mask.extend((0..ctx).map(|i| u32::from(i < len)));
            ids.extend(row);
        }
        Ok(TokenBatch { ids: ids.into(), attention_mask: mask.into(), n_rows: texts.len() as u64, n_cols: ctx as u64 })
    }
}

recall_sdk::export_plugin! {
    name: "clip-bpe",
    description: "OpenAI CLIP byte-level BPE tokenizer (open_clip semantics, 49,408 ids)",
    tokenizer: ClipBpe,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids() {
        let bpe = Bpe::new().unwrap();
        assert_eq!(bpe.vocab_size(), 49408);
        assert_eq!((bpe.sot, bpe.eot), (49406, 49407));
        // open_clip: tokenize("a photo of a cat") -> 49406 320 1125 539 320 2368 49407
        assert_eq!(bpe.encode("a photo of a cat"), vec![320, 1125, 539, 320, 2368]);
        assert_eq!(bpe.encode("A  PHOTO\tof a CAT"), bpe.encode("a photo of a cat"));
        assert_eq!(bpe.encode("a red circle at the top"), vec![320, 736, 7117, 536, 518, 1253]);
        assert_eq!(
            bpe.encode("hello, world! it's 2024 &amp; caf\u{e9}"),
            vec![3306, 267, 1002, 256, 585, 568, 273, 271, 273, 275, 261, 15304]
        );
    }

    #[test]
    fn truncation_keeps_end_token() {
        let bpe = Bpe::new().unwrap();
        let long = "word ".repeat(100);
        let row = bpe.encode_row(&long, 77);
        assert_eq!(row.len(), 77);
        assert_eq!(row[0], bpe.sot);
        assert_eq!(row[76], bpe.eot);
        let short = bpe.encode_row("hi", 8);
        assert_eq!(short[short.len() - 1], 0);
    }
}
