//! Turning a job and the registry into a stream of per-device decisions.
//!
//! Owns target resolution: the union of explicit ids, group members and an earlier job's
//! devices (snapshotted at creation), or the whole registry, narrowed by the attribute filter, in device-id order, resumable from any
//! device id (the planner's checkpoint). For each device it decides: send a task, or skip it
//! (incompatible, or not in the registry). It reads a bounded batch at a time and never holds
//! the fleet in memory. It never publishes or records anything.

use shared::redis_conn::RedisConn;
use shared::{
    device::AttributeFilter,
    job::{Compatibility, JobSpec},
    store::StoreError,
    topology::Names,
};

use crate::registry;
use shared::device::Device;

/// What happens to one targeted device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Publish a task for it.
    Send(String),
    /// Record it SKIPPED with the reason, without sending anything.
    Skip {
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
}

impl Decision {
    /// The device concerned.
    pub fn device(&self) -> &str {
        match self {
            Decision::Send(d) => d,
            Decision::Skip { device, .. } => device,
        }
    }
}

/// Where target ids come from.
#[derive(Debug, Clone)]
enum Source {
    /// Explicit ids, sorted and deduplicated.
    Explicit(Vec<String>),
    /// A sorted set of ids (a group, or every device).
    SortedSet(String),
}

/// A job's targets, read in id order from a cursor.
#[derive(Debug)]
pub struct Targets {
    sources: Vec<Source>,
    filter: Option<AttributeFilter>,
    query: Option<shared::query::Query>,
    compatibility: Option<Compatibility>,
    batch: usize,
}

impl Targets {
    /// The targets of job `job` with `spec`, read `batch` ids at a time. Targets taken from
    /// an earlier job are read from the job's snapshot of them ([`Names::job_targets`]).
    pub fn new(names: &Names, job: uuid::Uuid, spec: &JobSpec, batch: usize) -> Self {
        let mut sources = Vec::new();
        if spec.target.from_job.is_some() {
            sources.push(Source::SortedSet(names.job_targets(job)));
        }
        if !spec.target.devices.is_empty() {
            let mut ids = spec.target.devices.clone();
            ids.sort();
            ids.dedup();
            sources.push(Source::Explicit(ids));
        }
        let mut groups = spec.target.groups.clone();
        groups.sort();
        groups.dedup();
        sources.extend(groups.iter().map(|g| Source::SortedSet(names.group(g))));
        if sources.is_empty() {
            sources.push(Source::SortedSet(names.devices()));
        }
        Self {
            sources,
            filter: spec.target.filter.clone(),
            // Checked at intake: a stored query parses.
            query: spec
                .target
                .query
                .as_deref()
                .and_then(|q| shared::query::Query::parse(q).ok()),
            compatibility: spec.compatibility.clone(),
            batch: batch.max(1),
        }
    }

    /// Reads `batch` ids at a time from now on (the planner follows its rate).
    pub fn set_batch(&mut self, batch: usize) {
        self.batch = batch.max(1);
    }

    /// The next decisions after device id `after` (exclusive), in id order; empty when the
    /// targets are exhausted. Devices the filter excludes are not targeted at all, so the
    /// returned batch may be shorter than the batch size (or empty while more follow: check
    /// the returned cursor).
    ///
    /// Returns the decisions and the new cursor (`None` once exhausted).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn next_batch(
        &self,
        redis: &mut RedisConn,
        names: &Names,
        after: Option<&str>,
    ) -> Result<(Vec<Decision>, Option<String>), StoreError> {
        let (decided, cursor) = self.next_devices(redis, names, after).await?;
        Ok((decided.into_iter().map(|(d, _)| d).collect(), cursor))
    }

    /// [`Self::next_batch`] with each decision's device record (absent for devices not in
    /// the registry), for previews that break the targets down by attribute.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn next_devices(
        &self,
        redis: &mut RedisConn,
        names: &Names,
        after: Option<&str>,
    ) -> Result<(Vec<(Decision, Option<Device>)>, Option<String>), StoreError> {
        let mut fetched = Vec::with_capacity(self.sources.len());
        for source in &self.sources {
            let ids = match source {
                Source::Explicit(ids) => {
                    let start = after.map_or(0, |a| ids.partition_point(|id| id.as_str() <= a));
                    ids[start..(start + self.batch).min(ids.len())].to_vec()
                }
                Source::SortedSet(key) => {
                    registry::range_after(redis, key, after, self.batch).await?
                }
            };
            fetched.push(ids);
        }
        let ids = merge(fetched, self.batch);
        let Some(cursor) = ids.last().cloned() else {
            return Ok((Vec::new(), None));
        };
        let devices = shared::store::read_devices(redis, names, &ids).await?;
        let decisions = ids
            .into_iter()
            .zip(devices)
            .filter_map(|(id, device)| {
                if let (Some(q), Some(d)) = (&self.query, &device)
                    && !q.matches(d)
                {
                    return None;
                }
                decide(
                    id,
                    device.as_ref(),
                    self.filter.as_ref(),
                    self.compatibility.as_ref(),
                )
                .map(|d| (d, device))
            })
            .collect();
        Ok((decisions, Some(cursor)))
    }
}

/// Merges per-source batches (each sorted, each at most `batch` long) into one sorted,
/// deduplicated batch that is complete up to its last id: ids beyond the smallest last id of
/// a full source batch are left for the next call, since that source may hold smaller ids
/// not fetched yet.
fn merge(sources: Vec<Vec<String>>, batch: usize) -> Vec<String> {
    let bound = sources
        .iter()
        .filter(|ids| ids.len() >= batch)
        .filter_map(|ids| ids.last().cloned())
        .min();
    let mut all: Vec<String> = sources.into_iter().flatten().collect();
    all.sort();
    all.dedup();
    if let Some(bound) = bound {
        all.retain(|id| *id <= bound);
    }
    all.truncate(batch);
    all
}

/// The decision for one device id: `None` when the filter excludes it.
fn decide(
    id: String,
    device: Option<&Device>,
    filter: Option<&AttributeFilter>,
    compatibility: Option<&Compatibility>,
) -> Option<Decision> {
    let Some(device) = device else {
        return Some(Decision::Skip {
            device: id,
            reason: "device is not in the registry".into(),
        });
    };
    if filter.is_some_and(|f| !f.matches(device)) {
        return None;
    }
    if let Some(c) = compatibility {
        if !c.hardware_revisions.is_empty()
            && !c.hardware_revisions.contains(&device.hardware_revision)
        {
            return Some(Decision::Skip {
                device: id,
                reason: format!(
                    "hardware revision {:?} is not among {:?}",
                    device.hardware_revision, c.hardware_revisions
                ),
            });
        }
        if !c.models.is_empty() && !c.models.contains(&device.model) {
            return Some(Decision::Skip {
                device: id,
                reason: format!("model {:?} is not among {:?}", device.model, c.models),
            });
        }
    }
    Some(Decision::Send(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn device(id: &str, hw: &str) -> Device {
        Device {
            id: id.into(),
            groups: vec![],
            model: "gw".into(),
            hardware_revision: hw.into(),
            firmware_version: "1.0".into(),
            tags: BTreeMap::from([("site".to_owned(), "a".to_owned())]),
        }
    }

    #[test]
    fn merging_deduplicates_and_stops_where_a_full_source_may_continue() {
        // Source A returned a full batch ending at "c"; B may be complete.
        let merged = merge(vec![ids(&["a", "b", "c"]), ids(&["b", "d"])], 3);
        assert_eq!(merged, ids(&["a", "b", "c"]));
        // Both exhausted: everything, deduplicated, up to the batch size.
        let merged = merge(vec![ids(&["a", "c"]), ids(&["b", "c"])], 5);
        assert_eq!(merged, ids(&["a", "b", "c"]));
    }

    #[test]
    fn merged_batches_cover_every_id_exactly_once() {
        // Simulate the cursor loop over two overlapping sources.
        let a: Vec<String> = (0..50).map(|i| format!("d{i:03}")).collect();
        let b: Vec<String> = (25..90).step_by(2).map(|i| format!("d{i:03}")).collect();
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let after = |src: &Vec<String>| -> Vec<String> {
                src.iter()
                    .filter(|id| cursor.as_ref().is_none_or(|c| *id > c))
                    .take(7)
                    .cloned()
                    .collect()
            };
            let batch = merge(vec![after(&a), after(&b)], 7);
            let Some(last) = batch.last().cloned() else {
                break;
            };
            seen.extend(batch);
            cursor = Some(last);
        }
        let mut expected: Vec<String> = a.iter().chain(b.iter()).cloned().collect();
        expected.sort();
        expected.dedup();
        assert_eq!(seen, expected);
    }

    #[test]
    fn incompatible_and_unknown_devices_are_skipped_with_a_reason() {
        let compat = Compatibility {
            hardware_revisions: vec!["A".into()],
            models: vec![],
        };
        assert_eq!(
            decide("d1".into(), Some(&device("d1", "A")), None, Some(&compat)),
            Some(Decision::Send("d1".into()))
        );
        match decide("d2".into(), Some(&device("d2", "B")), None, Some(&compat)) {
            Some(Decision::Skip { reason, .. }) => assert!(reason.contains("\"B\"")),
            other => panic!("expected a skip, got {other:?}"),
        }
        assert!(matches!(
            decide("d3".into(), None, None, None),
            Some(Decision::Skip { .. })
        ));
    }

    #[test]
    fn the_filter_excludes_devices_without_counting_them() {
        let f = AttributeFilter {
            hardware_revision: Some("A".into()),
            tags: BTreeMap::from([("site".to_owned(), "a".to_owned())]),
            ..Default::default()
        };
        assert!(decide("d1".into(), Some(&device("d1", "A")), Some(&f), None).is_some());
        assert!(decide("d2".into(), Some(&device("d2", "B")), Some(&f), None).is_none());
    }
}
