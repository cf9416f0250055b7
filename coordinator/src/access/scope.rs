//! Group scopes: an operator confined to groups may only target devices of those groups.
//!
//! Owns the check of a job's targets against a caller's groups: groups outside the scope,
//! explicit devices in none of its groups, and targets that reach the whole fleet (no group,
//! no device list) are refused, named in the message. A rerun (targets taken from an earlier
//! job) stays inside when the earlier job's own targets did. It never changes a job.

use shared::redis_conn::RedisConn;
use shared::{job::TargetSpec, store::StoreError, topology::Names};

/// Devices named in a refusal, at most.
const SHOWN: usize = 10;

/// `Ok(Err(message))` when `target` leaves `scope` (the message names what is outside it);
/// `Ok(Ok(()))` when it stays inside, or when there is no scope.
///
/// # Errors
/// Redis errors.
pub async fn check(
    redis: &mut RedisConn,
    names: &Names,
    target: &TargetSpec,
    scope: Option<&[String]>,
) -> Result<Result<(), String>, StoreError> {
    let Some(scope) = scope else {
        return Ok(Ok(()));
    };
    // A rerun's devices are those of the earlier job (and of the jobs it reran): check
    // their targets, up to a bounded chain.
    let mut from = target.from_job.as_ref().map(|f| f.job_id);
    for _ in 0..MAX_RERUN_CHAIN {
        let Some(job) = from else { break };
        let Some(earlier) = shared::store::load_job(redis, names, job).await? else {
            break; // intake refuses a missing job, naming the field
        };
        if let Err(m) = check_own(redis, names, &earlier.spec.target, scope).await? {
            return Ok(Err(format!("job {job}, whose devices this targets: {m}")));
        }
        from = earlier.spec.target.from_job.map(|f| f.job_id);
    }
    if from.is_some() {
        return Ok(Err(format!(
            "the chain of reruns is longer than {MAX_RERUN_CHAIN} jobs"
        )));
    }
    if target.from_job.is_some() && target.groups.is_empty() && target.devices.is_empty() {
        return Ok(Ok(()));
    }
    check_own(redis, names, target, scope).await
}

/// Reruns of reruns followed when checking a scope.
const MAX_RERUN_CHAIN: usize = 16;

/// The check of a target's own groups and devices.
async fn check_own(
    redis: &mut RedisConn,
    names: &Names,
    target: &TargetSpec,
    scope: &[String],
) -> Result<Result<(), String>, StoreError> {
    if target.from_job.is_some() && target.groups.is_empty() && target.devices.is_empty() {
        return Ok(Ok(()));
    }
    if let Err(m) = check_groups(target, scope) {
        return Ok(Err(m));
    }
    if target.devices.is_empty() {
        return Ok(Ok(()));
    }
    // One ZSCORE per (device, scope group): a device is inside when any group holds it.
    let mut pipe = redis::pipe();
    for d in &target.devices {
        for g in scope {
            pipe.zscore(names.group(g), d);
        }
    }
    let scores: Vec<Option<f64>> = pipe.query_async(redis).await?;
    let outside: Vec<&str> = target
        .devices
        .iter()
        .zip(scores.chunks(scope.len().max(1)))
        .filter(|(_, s)| s.iter().all(Option::is_none))
        .map(|(d, _)| d.as_str())
        .collect();
    if outside.is_empty() {
        return Ok(Ok(()));
    }
    Ok(Err(format!(
        "{} device(s) outside your groups ({}): {}{}",
        outside.len(),
        scope.join(", "),
        outside[..outside.len().min(SHOWN)].join(", "),
        if outside.len() > SHOWN { ", ..." } else { "" }
    )))
}

/// The part of the check that needs no registry: named groups inside the scope, and some
/// group or device list to bound the targets.
fn check_groups(target: &TargetSpec, scope: &[String]) -> Result<(), String> {
    let outside: Vec<&str> = target
        .groups
        .iter()
        .filter(|g| !scope.contains(g))
        .map(String::as_str)
        .collect();
    if !outside.is_empty() {
        return Err(format!(
            "group(s) outside your scope: {} (you may target: {})",
            outside.join(", "),
            scope.join(", ")
        ));
    }
    if target.groups.is_empty() && target.devices.is_empty() {
        return Err(format!(
            "the job targets the whole fleet; you may target only groups {}",
            scope.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(groups: &[&str], devices: &[&str]) -> TargetSpec {
        TargetSpec {
            from_job: None,
            groups: groups.iter().map(|s| (*s).to_owned()).collect(),
            devices: devices.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn groups_outside_the_scope_are_named() {
        let scope = ["eu-west".to_owned()];
        assert!(check_groups(&target(&["eu-west"], &[]), &scope).is_ok());
        let e = check_groups(&target(&["eu-west", "us-east"], &[]), &scope).expect_err("out");
        assert!(e.contains("us-east") && !e.contains("eu-west,"), "{e}");
    }

    #[test]
    fn a_scoped_caller_cannot_target_the_whole_fleet() {
        let scope = ["eu-west".to_owned()];
        let e = check_groups(&target(&[], &[]), &scope).expect_err("whole fleet");
        assert!(e.contains("whole fleet"), "{e}");
        assert!(check_groups(&target(&[], &["d1"]), &scope).is_ok());
    }
}
