//! The device registry in Redis.
//!
//! Owns device records (`{ns}:dev:{id}` hashes) and the sorted sets that index them (every
//! device, and each group's members), ordered by id so targets can be streamed with a cursor.
//! Parsing one imported record (CSV with a header row, or NDJSON) and writing devices in
//! pipelined batches; [`crate::import`] streams a whole file through them. It never touches jobs.

use shared::redis_conn::RedisConn;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shared::{
    device::{Device, validate_id},
    store::StoreError,
    topology::Names,
};

/// Import file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportFormat {
    /// `id,groups,model,hardware_revision,firmware_version,tags` with a header row; groups
    /// separated by `;`, tags as `key=value;key=value`.
    Csv,
    /// One JSON object per line, fields as in [`Device`].
    Ndjson,
}

/// A line that could not be imported.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LineError {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong.
    pub error: String,
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportReport {
    /// Devices written.
    pub imported: u64,
    /// Lines refused.
    pub failed: u64,
    /// The first refused lines (at most [`MAX_REPORTED_ERRORS`]).
    pub errors: Vec<LineError>,
}

/// How many line errors an import report lists.
pub const MAX_REPORTED_ERRORS: usize = 1000;

const CSV_COLUMNS: [&str; 6] = [
    "id",
    "groups",
    "model",
    "hardware_revision",
    "firmware_version",
    "tags",
];

/// Reads the CSV header record; the columns may come in any order, `id` is required.
///
/// # Errors
/// A missing `id` column or an unknown column.
pub fn parse_csv_header(header: &csv::StringRecord) -> Result<Vec<usize>, String> {
    let mut order = Vec::new();
    for f in header {
        let f = f.trim();
        match CSV_COLUMNS.iter().position(|c| *c == f) {
            Some(i) => order.push(i),
            None => {
                return Err(format!(
                    "unknown column {f:?}; expected some of {}",
                    CSV_COLUMNS.join(",")
                ));
            }
        }
    }
    if !order.contains(&0) {
        return Err("the header has no id column".into());
    }
    Ok(order)
}

/// Reads one CSV record given the header's column order.
///
/// # Errors
/// Wrong field count, an invalid id or group, or a malformed tag.
pub fn parse_csv_record(record: &csv::StringRecord, columns: &[usize]) -> Result<Device, String> {
    if record.len() != columns.len() {
        return Err(format!(
            "{} fields; the header has {}",
            record.len(),
            columns.len()
        ));
    }
    let mut d = Device {
        id: String::new(),
        groups: vec![],
        model: String::new(),
        hardware_revision: String::new(),
        firmware_version: String::new(),
        tags: BTreeMap::new(),
    };
    for (value, col) in record.iter().zip(columns) {
        let value = value.trim().to_owned();
        match col {
            0 => d.id = value,
            1 => {
                d.groups = value
                    .split(';')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            2 => d.model = value,
            3 => d.hardware_revision = value,
            4 => d.firmware_version = value,
            _ => {
                for pair in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .ok_or_else(|| format!("tag {pair:?} is not key=value"))?;
                    d.tags.insert(k.trim().to_owned(), v.trim().to_owned());
                }
            }
        }
    }
    validate(&d)?;
    Ok(d)
}

/// Parses one NDJSON line.
///
/// # Errors
/// Invalid JSON, a missing id, or an invalid id or group.
pub fn parse_ndjson_line(line: &str) -> Result<Device, String> {
    let d: Device = serde_json::from_str(line).map_err(|e| format!("not a device object: {e}"))?;
    validate(&d)?;
    Ok(d)
}

/// Changes to one device's record: each field given replaces the stored one (`tags`
/// replaces every tag; `null` values in `tags` are not accepted).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    /// Model.
    pub model: Option<String>,
    /// Hardware revision.
    pub hardware_revision: Option<String>,
    /// Firmware version.
    pub firmware_version: Option<String>,
    /// Groups (the device leaves groups not listed).
    pub groups: Option<Vec<String>>,
    /// Tags.
    pub tags: Option<BTreeMap<String, String>>,
}

/// One device, `None` if it is not in the registry.
///
/// # Errors
/// Redis errors.
pub async fn get(
    redis: &mut RedisConn,
    names: &Names,
    id: &str,
) -> Result<Option<Device>, StoreError> {
    Ok(shared::store::read_devices(redis, names, &[id.to_owned()])
        .await?
        .pop()
        .flatten())
}

/// Applies `patch` to device `id`; `Ok(None)` if there is no such device.
///
/// # Errors
/// An invalid group or tag (`Err(Ok(message))`), or Redis errors.
pub async fn update(
    redis: &mut RedisConn,
    names: &Names,
    id: &str,
    patch: DevicePatch,
) -> Result<Option<Device>, Result<String, StoreError>> {
    let Some(mut d) = get(redis, names, id).await.map_err(Err)? else {
        return Ok(None);
    };
    if let Some(v) = patch.model {
        d.model = v;
    }
    if let Some(v) = patch.hardware_revision {
        d.hardware_revision = v;
    }
    if let Some(v) = patch.firmware_version {
        d.firmware_version = v;
    }
    if let Some(v) = patch.groups {
        d.groups = v;
    }
    if let Some(v) = patch.tags {
        d.tags = v;
    }
    validate(&d).map_err(Ok)?;
    write_batch(redis, names, std::slice::from_ref(&d))
        .await
        .map_err(Err)?;
    Ok(Some(d))
}

/// Removes device `id` from the registry and its groups. Returns whether it was there.
/// Jobs that already target it keep their record of it.
///
/// # Errors
/// Redis errors.
pub async fn delete(redis: &mut RedisConn, names: &Names, id: &str) -> Result<bool, StoreError> {
    let Some(d) = get(redis, names, id).await? else {
        return Ok(false);
    };
    let mut pipe = redis::pipe();
    pipe.atomic()
        .del(names.device(id))
        .ignore()
        .zrem(names.devices(), id)
        .ignore();
    for g in &d.groups {
        pipe.zrem(names.group(g), id).ignore();
    }
    let () = pipe.query_async(redis).await?;
    Ok(true)
}

fn validate(d: &Device) -> Result<(), String> {
    validate_id(&d.id).map_err(|e| format!("id: {e}"))?;
    for g in &d.groups {
        validate_id(g).map_err(|e| format!("groups: {e}"))?;
    }
    for k in d.tags.keys() {
        validate_id(k).map_err(|e| format!("tags: {e}"))?;
    }
    Ok(())
}

/// Writes a batch of devices (upsert: a re-imported device leaves groups it no longer lists).
///
/// # Errors
/// Redis errors.
pub async fn write_batch(
    redis: &mut RedisConn,
    names: &Names,
    devices: &[Device],
) -> Result<(), StoreError> {
    if devices.is_empty() {
        return Ok(());
    }
    let mut read = redis::pipe();
    for d in devices {
        read.hget(names.device(&d.id), "groups");
    }
    let old: Vec<Option<String>> = read.query_async(redis).await?;
    let mut write = redis::pipe();
    for (d, old) in devices.iter().zip(old) {
        let key = names.device(&d.id);
        if let Some(old) = old {
            for g in old.split(',').filter(|g| !g.is_empty()) {
                if !d.groups.iter().any(|n| n == g) {
                    write.zrem(names.group(g), &d.id).ignore();
                }
            }
        }
        let tags = serde_json::to_string(&d.tags).unwrap_or_else(|_| "{}".into());
        write
            .hset_multiple(
                &key,
                &[
                    ("model", d.model.as_str()),
                    ("hw", d.hardware_revision.as_str()),
                    ("fw", d.firmware_version.as_str()),
                    ("groups", &d.groups.join(",")),
                    ("tags", &tags),
                ],
            )
            .ignore();
        write.zadd(names.devices(), &d.id, 0).ignore();
        for g in &d.groups {
            write.zadd(names.group(g), &d.id, 0).ignore();
            write.sadd(names.groups(), g).ignore();
        }
    }
    let () = write.query_async(redis).await?;
    Ok(())
}

/// Ids of a sorted set after `after` (exclusive), in id order, at most `limit`.
///
/// # Errors
/// Redis errors.
pub async fn range_after(
    redis: &mut RedisConn,
    key: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let min = match after {
        Some(a) => format!("({a}"),
        None => "-".to_owned(),
    };
    let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
        .arg(key)
        .arg(min)
        .arg("+")
        .arg("LIMIT")
        .arg(0)
        .arg(limit)
        .query_async(redis)
        .await?;
    Ok(ids)
}

/// A page of a registry scan.
#[derive(Debug, Clone, Default)]
pub struct ScanPage {
    /// Matching devices, in id order (none when only counting).
    pub devices: Vec<Device>,
    /// How many devices matched.
    pub matched: u64,
    /// Where the next page starts, when the scan stopped at its limit.
    pub next_cursor: Option<String>,
}

/// Scans the sorted set `key` in id order from after `cursor`, keeping the devices that
/// `filter` matches: up to `limit` of them (then `next_cursor` says where to go on), or, with
/// no limit, counting every match without keeping any. The one registry scan behind listings
/// and counts.
///
/// # Errors
/// Redis errors.
pub async fn scan(
    redis: &mut RedisConn,
    names: &Names,
    key: &str,
    matches: impl Fn(&Device) -> bool,
    cursor: Option<&str>,
    limit: Option<usize>,
) -> Result<ScanPage, StoreError> {
    const CHUNK: usize = 1000;
    let mut page = ScanPage::default();
    let mut after = cursor.map(str::to_owned);
    loop {
        let ids = range_after(redis, key, after.as_deref(), CHUNK).await?;
        let Some(last) = ids.last().cloned() else {
            return Ok(page);
        };
        for d in shared::store::read_devices(redis, names, &ids)
            .await?
            .into_iter()
            .flatten()
        {
            if !matches(&d) {
                continue;
            }
            page.matched += 1;
            if let Some(limit) = limit {
                let id = d.id.clone();
                page.devices.push(d);
                if page.devices.len() >= limit {
                    page.next_cursor = Some(id);
                    return Ok(page);
                }
            }
        }
        if ids.len() < CHUNK {
            return Ok(page);
        }
        after = Some(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(line: &str) -> csv::StringRecord {
        csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(line.as_bytes())
            .records()
            .next()
            .expect("a record")
            .expect("valid CSV")
    }

    fn parse_csv_header(line: &str) -> Result<Vec<usize>, String> {
        super::parse_csv_header(&record(line))
    }

    fn parse_csv_line(line: &str, columns: &[usize]) -> Result<Device, String> {
        parse_csv_record(&record(line), columns)
    }

    #[test]
    fn a_csv_line_parses_with_groups_and_tags() {
        let cols = parse_csv_header("id,groups,model,hardware_revision,firmware_version,tags")
            .expect("header");
        let d =
            parse_csv_line("d1,eu;canary,gw-100,B,1.2.0,site=berlin;rack=4", &cols).expect("line");
        assert_eq!(d.groups, vec!["eu", "canary"]);
        assert_eq!(d.tags.get("site").map(String::as_str), Some("berlin"));
        assert_eq!(d.hardware_revision, "B");
    }

    #[test]
    fn csv_columns_may_come_in_any_order_but_need_an_id() {
        let cols = parse_csv_header("model,id").expect("header");
        let d = parse_csv_line("gw,d9", &cols).expect("line");
        assert_eq!((d.id.as_str(), d.model.as_str()), ("d9", "gw"));
        assert!(parse_csv_header("model,colour").is_err());
        assert!(parse_csv_header("model").is_err());
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let cols = parse_csv_header("id,groups").expect("header");
        assert!(
            parse_csv_line("d1", &cols)
                .expect_err("count")
                .contains("fields")
        );
        assert!(
            parse_csv_line("bad id,g", &cols)
                .expect_err("id")
                .contains("id")
        );
        assert!(parse_ndjson_line("{\"model\":\"x\"}").is_err());
        assert!(parse_ndjson_line("{\"id\":\"d1\",\"groups\":[\"a b\"]}").is_err());
        assert_eq!(
            parse_ndjson_line("{\"id\":\"d1\",\"groups\":[\"g\"]}")
                .expect("ok")
                .groups,
            vec!["g"]
        );
    }

    #[test]
    fn stored_fields_round_trip() {
        let f = vec![
            Some("gw".to_owned()),
            Some("B".to_owned()),
            Some("1.0".to_owned()),
            Some("a,b".to_owned()),
            Some("{\"k\":\"v\"}".to_owned()),
        ];
        let d = shared::store::from_fields("d1", &f);
        assert_eq!(d.groups, vec!["a", "b"]);
        assert_eq!(d.tags.get("k").map(String::as_str), Some("v"));
    }
}
