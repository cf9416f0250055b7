//! How the CLI prints: pretty JSON for `--json`, aligned tables (comfy-table) otherwise, and
//! the one set of pagination words (`--limit`, `--cursor`; the API's `limit`, `cursor` and
//! `next_cursor`).

use comfy_table::{ContentArrangement, Table as Grid, presets::NOTHING};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

/// Prints `v` as pretty JSON.
pub(crate) fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A string field of `v`, or empty.
pub(crate) fn text(v: &Value, field: &str) -> String {
    match &v[field] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A query string from `(key, value)` pairs, values percent-encoded.
pub(crate) fn query<K: AsRef<str>>(pairs: &[(K, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                k.as_ref(),
                utf8_percent_encode(v, NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Paging of a listing: the same words on every command.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Page {
    /// Most items on this page.
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: usize,
    /// Where to start: the `next_cursor` of the previous page.
    #[arg(long)]
    pub(crate) cursor: Option<String>,
}

impl Page {
    /// The page as query parameters.
    pub(crate) fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = vec![("limit", self.limit.to_string())];
        if let Some(c) = &self.cursor {
            q.push(("cursor", c.clone()));
        }
        q
    }
}

/// Tells the reader, on stderr, how to get the next page when there is one.
pub(crate) fn next_page(v: &Value) {
    if let Some(c) = v["next_cursor"].as_str() {
        eprintln!("more: --cursor {c}");
    }
}

/// A plain, aligned table on stdout.
#[derive(Debug)]
pub(crate) struct Table(Grid);

impl Table {
    /// A table with these column headers.
    pub(crate) fn new<const N: usize>(header: [&str; N]) -> Self {
        let mut t = Grid::new();
        t.load_preset(NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(header);
        Self(t)
    }

    /// Adds a row.
    pub(crate) fn row<const N: usize>(&mut self, cells: [String; N]) {
        self.0.add_row(cells);
    }

    /// Prints the table.
    pub(crate) fn print(&self) {
        println!("{}", self.0.trim_fmt());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        let q = query(&[("group", "eu west/1".to_owned()), ("limit", "5".to_owned())]);
        assert_eq!(q, "group=eu%20west%2F1&limit=5");
    }
}
