//! A per-process cache of job documents and states.
//!
//! Owns the answer to "is this job still live, and what does it ask for?" for every task,
//! without a Redis round trip per task: documents never change once stored, and states are
//! trusted for `job_cache_ms` (a cancel, pause or abort therefore stops new deliveries within
//! that bound, or at once when the coordinator's control broadcast arrives). It never writes to Redis.

use shared::redis_conn::RedisConn;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use shared::{
    job::JobSpec,
    state::JobState,
    store::{self, StoreError},
    topology::Names,
};
use uuid::Uuid;

/// What a task handler needs to know about its job.
#[derive(Debug, Clone)]
pub struct JobView {
    /// The job's document.
    pub spec: Arc<JobSpec>,
    /// Its state when last read.
    pub state: JobState,
    /// When devices not done by then end TIMED_OUT (ms since epoch).
    pub deadline_ms: Option<u64>,
    /// The signed document every request carries, when the deployment signs.
    pub signed: Option<Arc<shared::signing::SignedDocument>>,
}

#[derive(Debug)]
struct Entry {
    view: JobView,
    fetched: Instant,
}

/// The cache.
#[derive(Debug)]
pub struct JobCache {
    entries: Mutex<HashMap<Uuid, Entry>>,
    ttl: Duration,
}

impl JobCache {
    /// An empty cache whose states are trusted for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// The job, from cache when fresh; `None` when no such job exists.
    ///
    /// # Errors
    /// Redis errors or a corrupt job record.
    pub async fn get(
        &self,
        redis: &mut RedisConn,
        names: &Names,
        id: Uuid,
    ) -> Result<Option<JobView>, StoreError> {
        let cached = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries
                .get(&id)
                .map(|e| (e.view.clone(), e.fetched.elapsed() < self.ttl))
        };
        match cached {
            Some((view, true)) => Ok(Some(view)),
            // The document is immutable: refresh only the state.
            Some((mut view, false)) => {
                let Some(state) = store::load_job_state(redis, names, id).await? else {
                    return Ok(None);
                };
                view.state = state;
                self.put(id, view.clone());
                Ok(Some(view))
            }
            None => {
                let Some(record) = store::load_job(redis, names, id).await? else {
                    return Ok(None);
                };
                let view = JobView {
                    signed: record.signed.clone().map(Arc::new),
                    deadline_ms: record.deadline_ms(),
                    spec: Arc::new(record.spec),
                    state: record.state,
                };
                self.put(id, view.clone());
                Ok(Some(view))
            }
        }
    }

    fn put(&self, id: Uuid, view: JobView) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Finished jobs are dropped after their TTL; bound the map anyway.
        if entries.len() > 10_000 {
            let ttl = self.ttl;
            entries.retain(|_, e| e.fetched.elapsed() < ttl);
        }
        entries.insert(
            id,
            Entry {
                view,
                fetched: Instant::now(),
            },
        );
    }

    /// Forces the next lookup of `id` to read Redis (a control message said it changed).
    pub fn invalidate(&self, id: Uuid) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(&id);
    }
}
