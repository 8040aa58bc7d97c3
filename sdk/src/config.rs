//! Plugin configuration: the plugin's TOML section, deserialised into the plugin's own struct.
//!
//! The host hands each plugin its section as TOML text (without the `plugin = "..."` key).
//! Plugins declare their config with `#[serde(deny_unknown_fields)]`; [`parse_config`] turns
//! serde's complaint into an [`Error`] that names the key and suggests the nearest valid one,
//! and the host adds the file, line and column.

use serde::de::DeserializeOwned;

use crate::error::Error;

/// Deserialise a plugin's config section. Unknown keys are rejected (when the struct uses
/// `deny_unknown_fields`) with a suggestion for the nearest valid key.
pub fn parse_config<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    toml::from_str::<T>(text).map_err(|e| {
        let message = e.message().to_string();
        if let Some((key, expected)) = unknown_field(&message) {
            let hint = match nearest(&key, &expected) {
                Some(best) => format!("; did you mean `{best}`?"),
                None => String::new(),
            };
            let valid = if expected.is_empty() {
                "this plugin takes no keys".to_string()
            } else {
                format!("valid keys: {}", expected.join(", "))
            };
            return Error::config(key.clone(), format!("unknown key `{key}` ({valid}){hint}"));
        }
        match e.span().and_then(|span| key_at(text, span.start)) {
            Some(key) => Error::config(key.clone(), format!("bad value for `{key}`: {message}")),
            None => Error::new(format!("invalid config: {message}")),
        }
    })
}

/// Parse serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`", or
/// "there are no fields").
pub fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    let key = rest[..end].to_string();
    let expected = rest[end + 1..].split('`').skip(1).step_by(2).map(str::to_string).collect();
    Some((key, expected))
}

/// The candidate closest to `key` by edit distance, if it is plausibly a typo.
pub fn nearest<'a>(key: &str, candidates: &'a [String]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(key, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

/// The key on the line holding byte `offset` of a flat `key = value` document.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty()).then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Lora {
        rank: usize,
        #[serde(default)]
        alpha: f64,
    }

    #[test]
    fn typo_is_named_with_suggestion() {
        let e = parse_config::<Lora>("rnak = 4\n").unwrap_err();
        assert_eq!(e.config_key(), Some("rnak"));
        assert!(e.message().contains("did you mean `rank`?"), "{}", e.message());
    }

    #[test]
    fn bad_type_names_key() {
        let e = parse_config::<Lora>("rank = 4\nalpha = \"x\"\n").unwrap_err();
        assert_eq!(e.config_key(), Some("alpha"), "{}", e.message());
    }

    #[test]
    fn far_key_gets_no_suggestion() {
        let e = parse_config::<Lora>("rank = 1\nbanana = 4\n").unwrap_err();
        assert!(!e.message().contains("did you mean"), "{}", e.message());
    }
}

/// Whether a parameter name matches a glob pattern: `*` matches any run of characters
/// (dots included), everything else matches literally. Strategies use it for their `params`
/// option.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => name.starts_with(head) && (head.len()..=name.len()).any(|i| glob_match(tail, &name[i..])),
    }
}

#[cfg(test)]
mod glob_tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*", "vision.layers.0.mlp.fc1.weight"));
        assert!(glob_match("vision.*", "vision.layers.0.mlp.fc1.weight"));
        assert!(glob_match("*.bias", "vision.fc.bias"));
        assert!(!glob_match("*.bias", "vision.fc.weight"));
        assert!(!glob_match("text.*", "vision.proj.weight"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("vision", "vision.x"));
        assert!(glob_match("vision.*.fc?", "vision.a.fc?"));
    }
}

/// What `export_plugin!` uses to report a plugin's resolved config: for a config type that
/// implements `Serialize` the parsed section written back as TOML (its defaults filled in),
/// for any other type nothing. The choice is made at compile time, by method resolution on
/// `&&ResolveProbe<C>` (the first impl needs one auto-deref less than the second).
#[doc(hidden)]
pub struct ResolveProbe<C>(pub std::marker::PhantomData<C>);

#[doc(hidden)]
pub trait ResolveViaSerialize {
    fn resolve(&self, text: &str) -> Result<Option<String>, Error>;
}

impl<C: DeserializeOwned + serde::Serialize> ResolveViaSerialize for &ResolveProbe<C> {
    fn resolve(&self, text: &str) -> Result<Option<String>, Error> {
        let config: C = parse_config(text)?;
        toml::to_string(&config)
            .map(Some)
            .map_err(|e| Error::new(format!("cannot write the resolved config as TOML: {e}")))
    }
}

#[doc(hidden)]
pub trait ResolveUnknown {
    fn resolve(&self, _text: &str) -> Result<Option<String>, Error> {
        Ok(None)
    }
}

impl<C> ResolveUnknown for ResolveProbe<C> {}
