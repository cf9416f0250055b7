//! One module per command group.

pub(crate) mod access;
pub(crate) mod bench;
pub(crate) mod chaos;
pub(crate) mod demo;
pub(crate) mod devices;
pub(crate) mod dlq;
pub(crate) mod jobs;
pub(crate) mod queries;
pub(crate) mod schedules;
pub(crate) mod templates;

/// A job, schedule or template document read from `file`, with its content type (TOML for
/// a `.toml` file, else JSON).
///
/// # Errors
/// The file cannot be read.
pub(crate) async fn read_document(
    file: &std::path::Path,
) -> anyhow::Result<(&'static str, String)> {
    use anyhow::Context as _;
    let text = tokio::fs::read_to_string(file)
        .await
        .with_context(|| format!("reading {}", file.display()))?;
    let ct = if file.extension().is_some_and(|e| e == "toml") {
        "application/toml"
    } else {
        "application/json"
    };
    Ok((ct, text))
}
