//! The text a configuration came from, and mapping keys and byte offsets in it to lines.
//!
//! Serde gives spans only for parse errors; `validate()` finds the line of a key by
//! re-reading the document with `toml_edit`, which keeps the span of every key and value.

use std::path::PathBuf;
use std::sync::Arc;

use toml_edit::{ImDocument, Item, Table};

use super::error::{ConfigError, Location, Reason};

/// Where a [`Config`](super::Config) came from. Its `Debug` leaves out the text, which
/// may hold secrets.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// File name or label used in error messages.
    pub(crate) name: String,
    /// The TOML text, when there is one.
    pub(crate) text: Option<Arc<str>>,
    /// The file it was read from ([`Config::load`](super::Config::load)); `None` for text
    /// and the embedded default.
    pub(crate) path: Option<PathBuf>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("text_bytes", &self.text.as_ref().map(|t| t.len()))
            .finish()
    }
}

impl Default for Origin {
    fn default() -> Self {
        Self {
            name: "<embedded default>".to_owned(),
            text: None,
            path: None,
        }
    }
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// Splits `peers.deny[2]` into `peers`, `deny`, `[2]`.
fn segments(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Seg::Key(name));
        }
        while let Some(stripped) = rest.strip_prefix('[') {
            let Some(end) = stripped.find(']') else { break };
            if let Ok(i) = stripped[..end].parse() {
                out.push(Seg::Index(i));
            }
            rest = &stripped[end + 1..];
        }
    }
    out
}

impl Origin {
    /// An error at `key` (a dotted path such as `relay.max_port` or `peers.deny[1]`).
    pub(crate) fn error_at(&self, key: &str, reason: Reason) -> ConfigError {
        let offset = self.text.as_deref().and_then(|text| {
            let doc = ImDocument::parse(text.to_owned()).ok()?;
            span_of(doc.as_table(), &segments(key))
        });
        self.error_at_offset(offset, Some(key.to_owned()), reason)
    }

    /// An error at a byte offset; `key` if known.
    pub(crate) fn error_at_offset(
        &self,
        offset: Option<usize>,
        key: Option<String>,
        reason: Reason,
    ) -> ConfigError {
        let (line, column) = match (offset, self.text.as_deref()) {
            (Some(off), Some(text)) => {
                let (l, c) = line_col(text, off);
                (Some(l), Some(c))
            }
            _ => (None, None),
        };
        ConfigError::new(
            Location {
                file: self.name.clone(),
                line,
                column,
                key,
            },
            reason,
        )
    }

    /// The dotted key path of the innermost key or value covering `offset`.
    pub(crate) fn key_at(&self, offset: usize) -> Option<String> {
        let text = self.text.as_deref()?;
        let doc = ImDocument::parse(text.to_owned()).ok()?;
        let mut path = String::new();
        find_in_table(doc.as_table(), offset, &mut path).then_some(path)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The start offset of `path`: the key's own span for a table entry, the value's for
/// an array element; falls back to the deepest ancestor that has a span.
fn span_of(table: &Table, path: &[Seg<'_>]) -> Option<usize> {
    let (Seg::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let (key, item) = table.get_key_value(first)?;
    let here = key.span().map(|s| s.start);
    if rest.is_empty() {
        return here;
    }
    span_in_item(item, rest).or(here)
}

fn span_in_item(item: &Item, path: &[Seg<'_>]) -> Option<usize> {
    match (item, path.first()?) {
        (Item::Table(t), Seg::Key(_)) => span_of(t, path),
        (Item::Value(toml_edit::Value::InlineTable(t)), Seg::Key(k)) => {
            let (key, v) = t.get_key_value(k)?;
            let here = key.span().map(|s| s.start);
            if path.len() == 1 {
                return here;
            }
            span_in_item(v, &path[1..]).or(here)
        }
        (Item::Value(toml_edit::Value::Array(a)), Seg::Index(i)) => {
            let v = a.get(*i)?;
            let here = v.span().map(|s| s.start);
            if path.len() == 1 {
                return here;
            }
            span_in_item(&Item::Value(v.clone()), &path[1..]).or(here)
        }
        (Item::ArrayOfTables(a), Seg::Index(i)) => {
            let t = a.get(*i)?;
            if path.len() == 1 {
                // The first key of that table is the best line we have.
                return t.iter().next().and_then(|(k, _)| {
                    t.get_key_value(k)
                        .and_then(|(key, _)| key.span().map(|s| s.start))
                });
            }
            span_of(t, &path[1..])
        }
        _ => None,
    }
}

fn contains(span: Option<std::ops::Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

fn find_in_table(table: &Table, offset: usize, path: &mut String) -> bool {
    let entries = table
        .iter()
        .filter_map(|(name, _)| table.get_key_value(name));
    find_in_entries(entries, offset, path)
}

/// Whether `offset` falls on one of a table's `entries` (key and value), `path` then naming it.
fn find_in_entries<'a>(
    entries: impl Iterator<Item = (&'a toml_edit::Key, &'a Item)>,
    offset: usize,
    path: &mut String,
) -> bool {
    for (key, item) in entries {
        let len = path.len();
        push_key(path, key.get());
        if contains(key.span(), offset) || find_in_item(item, offset, path) {
            return true;
        }
        path.truncate(len);
    }
    false
}

/// Whether `offset` falls in one of an array's `elements`, `path` then naming it (`[i]`).
fn find_in_elements<T>(
    elements: impl Iterator<Item = T>,
    offset: usize,
    path: &mut String,
    find: impl Fn(T, usize, &mut String) -> bool,
) -> bool {
    for (i, element) in elements.enumerate() {
        let len = path.len();
        path.push_str(&format!("[{i}]"));
        if find(element, offset, path) {
            return true;
        }
        path.truncate(len);
    }
    false
}

fn find_in_item(item: &Item, offset: usize, path: &mut String) -> bool {
    match item {
        Item::Table(t) => find_in_table(t, offset, path),
        Item::ArrayOfTables(a) => find_in_elements(a.iter(), offset, path, find_in_table),
        Item::Value(v) => find_in_value(v, offset, path),
        Item::None => false,
    }
}

fn find_in_value(value: &toml_edit::Value, offset: usize, path: &mut String) -> bool {
    match value {
        toml_edit::Value::Array(a) => {
            find_in_elements(a.iter(), offset, path, find_in_value) || contains(a.span(), offset)
        }
        toml_edit::Value::InlineTable(t) => {
            let entries = t.iter().filter_map(|(name, _)| t.get_key_value(name));
            find_in_entries(entries, offset, path) || contains(t.span(), offset)
        }
        other => contains(other.span(), offset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_keys_and_indices() {
        assert_eq!(
            segments("peers.deny[2]"),
            vec![Seg::Key("peers"), Seg::Key("deny"), Seg::Index(2)]
        );
        assert_eq!(
            segments("auth.users[1].key"),
            vec![
                Seg::Key("auth"),
                Seg::Key("users"),
                Seg::Index(1),
                Seg::Key("key")
            ]
        );
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn error_at_finds_keys_values_and_table_arrays() {
        let text = "[relay]\nmin_port = 5\n\n[peers]\ndeny = [\n  \"a\",\n  \"b\",\n]\n\n\
                    [[auth.users]]\nname = \"x\"\n[[auth.users]]\nname = \"y\"\nkey = \"z\"\n";
        let origin = Origin {
            name: "f.toml".into(),
            text: Some(text.into()),
            path: None,
        };
        let line = |k: &str| origin.error_at(k, Reason::NoCredentials).location.line;
        assert_eq!(line("relay.min_port"), Some(2));
        assert_eq!(line("peers.deny[1]"), Some(7));
        assert_eq!(line("auth.users[1].key"), Some(14));
        assert_eq!(line("auth.users[1]"), Some(13));
        assert_eq!(
            line("relay.absent"),
            Some(1),
            "falls back to the parent key"
        );
    }

    #[test]
    fn key_at_names_the_innermost_key() {
        let text = "[relay]\nmin_port = 5\n[peers]\ndeny = [\"a\", \"b\"]\n";
        let origin = Origin {
            name: "f.toml".into(),
            text: Some(text.into()),
            path: None,
        };
        let off = text.find("\"b\"").expect("in text");
        assert_eq!(origin.key_at(off).as_deref(), Some("peers.deny[1]"));
        let off = text.find("min_port").expect("in text");
        assert_eq!(origin.key_at(off).as_deref(), Some("relay.min_port"));
    }
}
