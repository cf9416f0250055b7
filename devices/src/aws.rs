//! The AWS IoT Jobs device API's MQTT topics, spelled in one place for both sides: the
//! workers that serve the API and the simulated devices (`fleet-sim`) that call it.
//!
//! Owns the topic names `$aws/things/{thing}/jobs/...` (building and parsing them) and the
//! subscription filters of each side. It never holds execution state (the worker's AWS
//! transport does) and never decides what a device does (the simulated device does).

/// The requests a device sends, as the operation part of their topics.
pub const REQUEST_OPERATIONS: [&str; 4] = ["get", "start-next", "+/get", "+/update"];

/// The answers and notifications an AWS IoT Device SDK jobs agent subscribes to.
pub const AGENT_OPERATIONS: [&str; 5] = [
    "notify-next",
    "start-next/accepted",
    "start-next/rejected",
    "+/update/accepted",
    "+/update/rejected",
];

/// The same answers and notifications in three filters a thing, as a client that subscribes
/// to each of its things' topics uses them (fewer filters for the broker to hold and match).
pub const AGENT_FILTERS: [&str; 3] = ["notify-next", "start-next/+", "+/update/+"];

/// The topic of `operation` for `thing`: `$aws/things/{thing}/jobs/{operation}`.
pub fn topic(thing: &str, operation: &str) -> String {
    format!("$aws/things/{thing}/jobs/{operation}")
}

/// The topic of `operation` on one job of `thing`: `$aws/things/{thing}/jobs/{job}/{operation}`.
pub fn job_topic(thing: &str, job: &str, operation: &str) -> String {
    format!("$aws/things/{thing}/jobs/{job}/{operation}")
}

/// Filters matching `operations` of every thing, shared among the subscribers of `group`
/// when given. The thing level is `+`; a filter begins with `$aws` explicitly because
/// wildcards never match `$` topics.
pub fn filters(operations: &[&str], group: Option<&str>) -> Vec<String> {
    let share = group.map(|g| format!("$share/{g}/")).unwrap_or_default();
    operations
        .iter()
        .map(|op| format!("{share}{}", topic("+", op)))
        .collect()
}

/// `(thing, operation)` of a topic `$aws/things/{thing}/jobs/{operation}`
/// (e.g. `("dev-1", "start-next/accepted")`).
pub fn parse(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let (thing, rest) = rest.split_once('/')?;
    Some((thing, rest.strip_prefix("jobs/")?))
}

/// Checks what a device's request topic names before anything is looked up or stored: the
/// thing must be a valid device id, and a job id one fleetbatch issued (a UUID; `$next` for
/// `get`). So no separator can be smuggled into a storage key: thing `ee:ff` cannot reach
/// the execution of job `aa:bb:cc:dd` on thing `..:ee:ff`.
///
/// # Errors
/// What is wrong, for the `rejected` answer.
pub fn check_request(thing: &str, operation: &str) -> Result<(), String> {
    shared::device::validate_id(thing).map_err(|e| format!("thing name: {e}"))?;
    if let Some((job, action)) = operation.rsplit_once('/') {
        let next_ok = job == "$next" && action == "get";
        if !next_ok && uuid::Uuid::parse_str(job).is_err() {
            return Err(format!("job id {job:?} is not one fleetbatch issued"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_naming_a_foreign_thing_or_job_id_are_refused() {
        let job = "0193d3a2-6a4b-7c2d-9e1f-0a1b2c3d4e5f";
        assert!(check_request("dev-1", "get").is_ok());
        assert!(check_request("dev-1", "start-next").is_ok());
        assert!(check_request("dev-1", "$next/get").is_ok());
        assert!(check_request("dev-1", &format!("{job}/update")).is_ok());
        // Separator injection: neither a thing nor a job id may carry ':'.
        assert!(check_request("ee:ff", &format!("{job}/update")).is_err());
        assert!(check_request("ff", "aa:bb:cc:dd:ee/update").is_err());
        assert!(check_request("dev-1", "$next/update").is_err());
        assert!(check_request("dev+1", "get").is_err());
    }

    #[test]
    fn topics_split_into_thing_and_operation() {
        assert_eq!(
            parse("$aws/things/dev-1/jobs/abc/update"),
            Some(("dev-1", "abc/update"))
        );
        assert_eq!(parse("$aws/things/dev-1/jobs/get"), Some(("dev-1", "get")));
        assert_eq!(parse("fleetbatch/devices/x/jobs"), None);
        assert_eq!(
            parse(&job_topic("t", "j", "update")),
            Some(("t", "j/update"))
        );
        assert_eq!(parse(&topic("t", "notify")), Some(("t", "notify")));
    }

    #[test]
    fn request_filters_are_shared_and_spell_out_the_dollar_prefix() {
        let subs = filters(&REQUEST_OPERATIONS, Some("fleetbatch-x"));
        assert!(subs.contains(&"$share/fleetbatch-x/$aws/things/+/jobs/+/update".to_owned()));
        assert!(subs.iter().all(|s| s.contains("/$aws/things/+/jobs/")));
        let direct = filters(&REQUEST_OPERATIONS, None);
        assert!(direct.contains(&"$aws/things/+/jobs/start-next".to_owned()));
    }
}
