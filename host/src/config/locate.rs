//! Locating keys in experiment text: byte offsets to line:column, dotted paths into the
//! document, `--set` overrides applied to the text, and toml's errors turned into located ones.

use super::ConfigError;

/// 1-based line and column of byte `offset` in `src`.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
    (line, column)
}

/// A step in a path into the document: a key or an index into an array of tables.
#[derive(Debug, Clone)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// Byte span of the key at `path` in `src`; when the full path is absent, the span of the
/// deepest part that exists (the section), so an error still points near its cause.
pub fn locate(src: &str, path: &[PathStep]) -> Option<std::ops::Range<usize>> {
    enum Node<'a> {
        Item(&'a toml_edit::Item),
        Table(&'a toml_edit::Table),
    }
    let doc = toml_edit::Document::parse(src.to_string()).ok()?;
    let mut node = Node::Item(doc.as_item());
    let mut span = None;
    for step in path {
        match step {
            PathStep::Key(k) => {
                let table = match &node {
                    Node::Item(i) => i.as_table_like(),
                    Node::Table(t) => Some(*t as &dyn toml_edit::TableLike),
                };
                let Some((key, value)) = table.and_then(|t| t.get_key_value(k)) else { return span };
                span = key.span().or(span);
                node = Node::Item(value);
            }
            PathStep::Index(n) => {
                let Node::Item(item) = node else { return span };
                let Some(t) = item.as_array_of_tables().and_then(|a| a.get(*n)) else { return span };
                span = t.span().or(span);
                node = Node::Table(t);
            }
        }
    }
    span
}

/// Parse a dotted path like `strategy[0].rank` or `model.vision.width`.
pub fn parse_path(dotted: &str) -> Vec<PathStep> {
    // Segments are separated by dots; a segment may be quoted (`sweep.axes."optimizer.lr"`)
    // and may end in `[INDEX]`.
    let mut steps = Vec::new();
    let mut chars = dotted.chars().peekable();
    while chars.peek().is_some() {
        let mut key = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                key.push(c);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c == '[' {
                    break;
                }
                key.push(c);
                chars.next();
            }
        }
        steps.push(PathStep::Key(key));
        while chars.peek() == Some(&'[') {
            chars.next();
            let index: String = chars.by_ref().take_while(|&c| c != ']').collect();
            if let Ok(i) = index.parse() {
                steps.push(PathStep::Index(i));
            }
        }
        if chars.peek() == Some(&'.') {
            chars.next();
        }
    }
    steps
}

/// Apply `key=value` overrides (TOML values; bare words are strings) to the document text.
pub fn apply_overrides(src: &str, file: &str, overrides: &[String]) -> Result<String, ConfigError> {
    if overrides.is_empty() {
        return Ok(src.to_string());
    }
    let err = |message: String| ConfigError { file: "--set".into(), line: 1, column: 1, message };
    let mut doc: toml_edit::DocumentMut = src.parse().map_err(|e: toml_edit::TomlError| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(src, s.start));
        ConfigError { file: file.into(), line, column, message: e.message().to_string() }
    })?;
    for o in overrides {
        let (key, value) = o.split_once('=').ok_or_else(|| err(format!("`{o}` is not of the form key=value")))?;
        let value: toml_edit::Value = value.trim().parse().unwrap_or_else(|_| toml_edit::Value::from(value.trim()));
        let parts: Vec<&str> = key.trim().split('.').collect();
        let mut table = doc.as_table_mut() as &mut dyn toml_edit::TableLike;
        for p in &parts[..parts.len() - 1] {
            // `task[1]` steps into the second [[task]].
            let (name, index) = match p.split_once('[') {
                Some((n, rest)) => {
                    let i = rest
                        .strip_suffix(']')
                        .and_then(|i| i.parse::<usize>().ok())
                        .ok_or_else(|| err(format!("`{key}`: `{p}` is not NAME[INDEX]")))?;
                    (n, Some(i))
                }
                None => (*p, None),
            };
            table = match index {
                None => table
                    .entry(name)
                    .or_insert(toml_edit::Item::Table(toml_edit::Table::new()))
                    .as_table_like_mut()
                    .ok_or_else(|| err(format!("`{key}`: `{name}` is not a table")))?,
                Some(i) => {
                    let item = table.get_mut(name).ok_or_else(|| err(format!("`{key}`: there is no `{name}`")))?;
                    let len = item.as_array_of_tables().map(|a| a.len()).unwrap_or(0);
                    match item {
                        toml_edit::Item::ArrayOfTables(a) => {
                            a.get_mut(i).map(|t| t as &mut dyn toml_edit::TableLike).ok_or_else(|| {
                                err(format!("`{key}`: `{name}` has {len} entries, index {i} is past the end"))
                            })?
                        }
                        _ => return Err(err(format!("`{key}`: `{name}` is not an array of tables ([[{name}]])"))),
                    }
                }
            };
        }
        table.insert(parts[parts.len() - 1], toml_edit::Item::Value(value));
    }
    Ok(doc.to_string())
}

/// Turn a toml/serde error into a located error with a "did you mean" hint.
pub(super) fn located(file: &str, src: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e.span().map_or((1, 1), |s| line_col(src, s.start));
    let mut message = e.message().trim().to_string();
    let text_at = src.lines().nth(line.saturating_sub(1)).unwrap_or("").trim();
    if let Some(better) = explain_shape_error(&message, text_at) {
        message = better;
    }
    if let Some((key, expected)) = recall_sdk::config::unknown_field(&message) {
        message = format!("unknown key `{key}`; valid keys here: {}", expected.join(", "));
        if let Some(best) = recall_sdk::config::nearest(&key, &expected) {
            message.push_str(&format!("; did you mean `{best}`?"));
        }
    }
    ConfigError { file: file.into(), line, column, message }
}

/// Name the key in toml's shape errors, from the line they point at: "duplicate key" says
/// which, and a `[table]` where a list of tables is expected says to write `[[table]]`.
fn explain_shape_error(message: &str, line: &str) -> Option<String> {
    let header = line.strip_prefix('[').and_then(|l| l.split(']').next()).map(str::trim);
    if message.starts_with("duplicate key") {
        return Some(match header {
            Some(h) => format!("table `[{}]` is defined twice; merge the two into one", h.trim_matches('[')),
            None => {
                let key = line.split('=').next().unwrap_or(line).trim();
                format!("duplicate key `{key}`: it is already set in this table; keep one")
            }
        });
    }
    if message.contains("expected a sequence") {
        if let Some(h) = header.filter(|_| !line.starts_with("[[")) {
            return Some(format!(
                "`[{h}]` declares one table, but `{h}` is a list of tables: write `[[{h}]]` (one per entry)"
            ));
        }
    }
    None
}
