//! The JSON documents AWS IoT Jobs devices receive (execution summaries and states), and the
//! validation of what they send (status details, step timeouts).

use serde_json::{Value, json};

use super::scripts::Record;

/// Seconds of a millisecond timestamp, as AWS IoT Jobs documents carry them.
pub(super) fn secs(ms: u64) -> u64 {
    ms / 1000
}

/// Longest step timeout AWS IoT Jobs accepts, in minutes (7 days).
pub(super) const MAX_STEP_MINUTES: u64 = 10_080;

/// A rejected request: the AWS error document.
#[derive(Debug)]
pub(super) struct Rejection {
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) state: Option<Record>,
}

pub(super) fn reject(code: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        code,
        message: message.into(),
        state: None,
    }
}

/// IN_PROGRESS first, then the oldest QUEUED.
pub(super) fn pick_next(list: &[Record]) -> Option<&Record> {
    list.iter()
        .find(|e| e.status() == "IN_PROGRESS")
        .or_else(|| list.iter().find(|e| e.status() == "QUEUED"))
}

pub(super) fn summary(e: &Record) -> Value {
    let mut v = json!({
        "jobId": e.str("job").unwrap_or_default(),
        "queuedAt": secs(e.num("queued").unwrap_or(0)),
        "lastUpdatedAt": secs(e.num("updated").unwrap_or(0)),
        "versionNumber": e.num("version").unwrap_or(1),
        "executionNumber": e.num("number").unwrap_or(1),
    });
    if let Some(s) = e.num("started") {
        v["startedAt"] = json!(secs(s));
    }
    v
}

pub(super) fn execution_state(e: &Record) -> Value {
    json!({
        "status": e.status(),
        "statusDetails": e.details(),
        "versionNumber": e.num("version").unwrap_or(1),
    })
}

/// `statusDetails` as JSON text: an object of string values, as AWS IoT Jobs requires.
pub(super) fn status_details(body: &Value) -> Result<Option<String>, Rejection> {
    match body.get("statusDetails") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) if m.values().all(Value::is_string) => {
            Ok(Some(Value::Object(m.clone()).to_string()))
        }
        Some(_) => Err(reject(
            "InvalidRequest",
            "statusDetails must be an object of string values",
        )),
    }
}

/// `stepTimeoutInMinutes`, 1 to 10080.
pub(super) fn step_minutes(body: &Value) -> Result<Option<u64>, Rejection> {
    match body.get("stepTimeoutInMinutes") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(m) if (1..=MAX_STEP_MINUTES).contains(&m) => Ok(Some(m)),
            _ => Err(reject(
                "InvalidRequest",
                format!("stepTimeoutInMinutes must be between 1 and {MAX_STEP_MINUTES}"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn status_details_must_be_strings_and_step_timeouts_in_range() {
        assert!(status_details(&json!({"statusDetails": {"a": "1"}})).is_ok());
        assert_eq!(
            status_details(&json!({"statusDetails": {"a": 1}}))
                .err()
                .map(|r| r.code),
            Some("InvalidRequest")
        );
        assert_eq!(
            step_minutes(&json!({"stepTimeoutInMinutes": 5})).ok(),
            Some(Some(5))
        );
        assert!(step_minutes(&json!({"stepTimeoutInMinutes": 0})).is_err());
        assert!(step_minutes(&json!({"stepTimeoutInMinutes": 10081})).is_err());
    }

    #[test]
    fn next_prefers_the_execution_in_progress() {
        let rec = |job: &str, status: &str| {
            Record(HashMap::from([
                ("job".to_owned(), json!(job)),
                ("status".to_owned(), json!(status)),
            ]))
        };
        let list = vec![rec("a", "QUEUED"), rec("b", "IN_PROGRESS")];
        assert_eq!(pick_next(&list).and_then(|e| e.str("job")), Some("b"));
        assert_eq!(pick_next(&list[..1]).and_then(|e| e.str("job")), Some("a"));
        assert!(pick_next(&[]).is_none());
    }
}
