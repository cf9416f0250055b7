//! Streaming a device import: CSV (read by the csv crate, so quoted fields may hold commas,
//! quotes and newlines) or NDJSON, record by record, written to the registry in pipelined
//! batches of 1,000. A record that does not parse is reported by its line number and the
//! others are still imported; memory stays bounded whatever the file's size.
//!
//! The csv reader is synchronous: it runs on a blocking thread reading the request body
//! through a bridge, and hands parsed records over a bounded channel.

use futures::{Stream, TryStreamExt};
use shared::redis_conn::RedisConn;
use shared::{device::Device, store::StoreError, topology::Names};
use tokio::io::{AsyncBufReadExt, AsyncRead};
use tokio::sync::mpsc;

use crate::registry::{self, ImportFormat, ImportReport, LineError};

/// Devices written per pipeline.
const BATCH: usize = 1000;

/// Why an import stopped before the end of its input.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The body could not be read, or the CSV header is unusable.
    #[error("{0}")]
    Input(String),
    /// Redis failed; devices before the failure are imported.
    #[error("cannot write devices")]
    Store(#[from] StoreError),
}

/// One parsed record: its line number and the device, or what is wrong with it.
type Parsed = (u64, Result<Device, String>);

/// Imports every record of `body` in `format`.
///
/// # Errors
/// An unreadable body or CSV header ([`ImportError::Input`]), or Redis errors.
pub async fn run<S>(
    redis: &mut RedisConn,
    names: &Names,
    format: ImportFormat,
    body: S,
) -> Result<ImportReport, ImportError>
where
    S: Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static,
{
    let reader = tokio_util::io::StreamReader::new(body);
    let (tx, mut rx) = mpsc::channel::<Result<Parsed, String>>(BATCH);
    let parser = match format {
        ImportFormat::Csv => tokio::task::spawn_blocking(move || parse_csv(reader, &tx)),
        ImportFormat::Ndjson => tokio::spawn(async move { parse_ndjson(reader, &tx).await }),
    };
    let mut report = ImportReport::default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut failure = None;
    while let Some(item) = rx.recv().await {
        match item {
            Ok((_, Ok(device))) => batch.push(device),
            Ok((line, Err(error))) => {
                report.failed += 1;
                if report.errors.len() < registry::MAX_REPORTED_ERRORS {
                    report.errors.push(LineError { line, error });
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        if batch.len() >= BATCH {
            registry::write_batch(redis, names, &batch).await?;
            report.imported += batch.len() as u64;
            batch.clear();
        }
    }
    // Dropping the receiver stops a parser still running after a failure.
    drop(rx);
    let _ = parser.await;
    registry::write_batch(redis, names, &batch).await?;
    report.imported += batch.len() as u64;
    match failure {
        Some(e) => Err(ImportError::Input(e)),
        None => Ok(report),
    }
}

/// Parses CSV records on a blocking thread; stops when the receiver is gone.
fn parse_csv<R>(reader: R, tx: &mpsc::Sender<Result<Parsed, String>>)
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .comment(Some(b'#'))
        .from_reader(bridge);
    let columns = match csv.headers() {
        // An empty body imports nothing.
        Ok(h) if h.is_empty() => return,
        Ok(h) => match registry::parse_csv_header(h) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.blocking_send(Err(format!("line 1: {e}")));
                return;
            }
        },
        Err(e) => {
            let _ = tx.blocking_send(Err(format!("reading the header: {e}")));
            return;
        }
    };
    for record in csv.records() {
        let item = match record {
            Ok(r) => {
                let line = r.position().map_or(0, |p| p.line());
                if r.iter().all(|f| f.trim().is_empty()) {
                    continue;
                }
                Ok((line, registry::parse_csv_record(&r, &columns)))
            }
            // A record that is not CSV (e.g. bad UTF-8) is reported and skipped; a read
            // error of the body itself ends the import.
            Err(e) => match e.kind() {
                csv::ErrorKind::Io(io) => Err(format!("reading the body: {io}")),
                _ => Ok((
                    e.position().map_or(0, |p| p.line()),
                    Err(format!("not valid CSV: {e}")),
                )),
            },
        };
        let stop = item.is_err();
        if tx.blocking_send(item).is_err() || stop {
            return;
        }
    }
}

/// Parses NDJSON lines; stops when the receiver is gone.
async fn parse_ndjson<R>(reader: R, tx: &mpsc::Sender<Result<Parsed, String>>)
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let mut lines = tokio::io::BufReader::new(reader).lines();
    let mut line_no = 0u64;
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(format!("reading the body: {e}"))).await;
                return;
            }
        };
        line_no += 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if tx
            .send(Ok((line_no, registry::parse_ndjson_line(line))))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Bounds an import's body before anything is buffered: a line (an NDJSON record, a CSV row)
/// longer than `max_line` bytes, or a body longer than `max_total`, ends the stream with an
/// error naming the limit, so a body without newlines is refused at the limit instead of
/// being read whole.
pub fn limited<S>(
    body: S,
    max_line: usize,
    max_total: u64,
) -> impl Stream<Item = Result<bytes::Bytes, std::io::Error>>
where
    S: Stream<Item = Result<bytes::Bytes, std::io::Error>>,
{
    let (mut run, mut line, mut total) = (0usize, 1u64, 0u64);
    body.and_then(move |chunk| {
        let checked = (|| {
            total += chunk.len() as u64;
            if total > max_total {
                return Err(std::io::Error::other(format!(
                    "the import is larger than {max_total} bytes (coordinator.import_max_bytes)"
                )));
            }
            for &b in chunk.iter() {
                if b == b'\n' {
                    run = 0;
                    line += 1;
                } else {
                    run += 1;
                    if run > max_line {
                        return Err(std::io::Error::other(format!(
                            "line {line} is longer than {max_line} bytes (coordinator.import_max_line_bytes)"
                        )));
                    }
                }
            }
            Ok(chunk)
        })();
        std::future::ready(checked)
    })
}

/// Adapts a byte stream with any error type to what [`run`] reads.
pub fn io_stream<S, B, E>(s: S) -> impl Stream<Item = Result<bytes::Bytes, std::io::Error>>
where
    S: Stream<Item = Result<B, E>>,
    B: Into<bytes::Bytes>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    s.map_ok(Into::into).map_err(std::io::Error::other)
}

#[cfg(test)]
mod limit_tests {
    use futures::StreamExt;

    use super::*;

    async fn read(chunks: &[&str], max_line: usize, max_total: u64) -> Result<usize, String> {
        let owned: Vec<Result<bytes::Bytes, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(bytes::Bytes::from(c.to_string())))
            .collect();
        let mut s = Box::pin(limited(futures::stream::iter(owned), max_line, max_total));
        let mut n = 0;
        while let Some(c) = s.next().await {
            n += c.map_err(|e| e.to_string())?.len();
        }
        Ok(n)
    }

    #[tokio::test]
    async fn lines_and_bodies_past_their_limits_end_the_stream_naming_the_limit() {
        assert_eq!(read(&["abc\nde", "f\n"], 3, 100).await, Ok(8));
        let long = read(&["abc\nde", "fg\n"], 3, 100)
            .await
            .expect_err("line 2");
        assert!(long.contains("line 2 is longer than 3 bytes"), "{long}");
        let big = read(&["ab\n", "cd\n"], 10, 5).await.expect_err("total");
        assert!(big.contains("larger than 5 bytes"), "{big}");
    }
}
