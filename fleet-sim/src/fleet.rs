//! The simulated devices' memory and counters.
//!
//! Owns what each simulated device remembers: how many times each job reached it, which jobs
//! it applied (it applies a job once and acknowledges repeats without re-running it), and
//! the readings it sent. Behaviour comes from [`devices::simdevice`], the same functions the
//! worker's built-in simulator uses. It never speaks a protocol.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use devices::simdevice::{self, Answer, SimOutcome};
use serde::Serialize;
use shared::{config::SimulatorSettings, job::Action, state::Readings};

/// What one device remembers. Kept small (a fleet-sim process plays 100,000s of devices):
/// one entry a job that reached the device, job ids shared between devices, execution ids
/// as integers.
#[derive(Debug, Default)]
struct DeviceMemory {
    /// Per job that reached the device (or that it applied), in the order they came.
    jobs: Vec<JobMemory>,
    /// Executions applied: the device's memory that makes repeats harmless.
    executions: Vec<u128>,
}

/// What a device remembers of one job.
#[derive(Debug)]
struct JobMemory {
    job: Arc<str>,
    /// Deliveries received.
    deliveries: u32,
    /// Times applied (more than 1 would be a duplicate application: the same job reaching
    /// the device under two execution ids).
    applied: u32,
    /// When the first and the last delivery arrived; `None` until one did.
    contact: Option<Contact>,
    /// Readings sent.
    readings: Option<Box<Readings>>,
}

/// The devices' memories, and the job ids they share. A device named as fleet-sim names its
/// own (`dev-` and seven or more digits) is kept under its number; any other id, under its
/// name.
#[derive(Debug, Default)]
struct Memories {
    numbered: HashMap<u32, DeviceMemory>,
    named: HashMap<String, DeviceMemory>,
    job_ids: HashSet<Arc<str>>,
}

/// The number of a device named `dev-NNNNNNN` (seven digits at least, as [`device_name`]
/// writes it), if that is its name exactly.
fn number_of(device: &str) -> Option<u32> {
    let n = u32::try_from(index(device)?).ok()?;
    (device_name(n) == device).then_some(n)
}

/// The name of device number `n`.
fn device_name(n: u32) -> String {
    format!("dev-{n:07}")
}

impl Memories {
    /// Memories for a fleet of `size` devices (room for them made at once, so the table is
    /// never copied into a larger one while the fleet fills).
    fn with_capacity(size: u64) -> Self {
        Self {
            numbered: HashMap::with_capacity(usize::try_from(size).unwrap_or(0)),
            ..Self::default()
        }
    }

    fn device(&self, device: &str) -> Option<&DeviceMemory> {
        match number_of(device) {
            Some(n) => self.numbered.get(&n),
            None => self.named.get(device),
        }
    }

    fn device_mut(&mut self, device: &str) -> &mut DeviceMemory {
        match number_of(device) {
            Some(n) => self.numbered.entry(n).or_default(),
            None => self.named.entry(device.to_owned()).or_default(),
        }
    }

    /// `job`'s entry in `device`'s memory, if it has one.
    fn job_mut(&mut self, device: &str, job: &str) -> Option<&mut JobMemory> {
        let mem = match number_of(device) {
            Some(n) => self.numbered.get_mut(&n),
            None => self.named.get_mut(device),
        }?;
        mem.jobs.iter_mut().find(|j| &*j.job == job)
    }

    /// `job`'s entry in `device`'s memory, made if missing.
    fn job(&mut self, device: &str, job: &str) -> &mut JobMemory {
        let shared = match self.job_ids.get(job) {
            Some(j) => j.clone(),
            None => {
                let j: Arc<str> = Arc::from(job);
                self.job_ids.insert(j.clone());
                j
            }
        };
        let mem = self.device_mut(device);
        if let Some(i) = mem.jobs.iter().position(|j| &*j.job == job) {
            return &mut mem.jobs[i];
        }
        // Exactly the room needed: most devices hear of one job in a run.
        mem.jobs.reserve_exact(1);
        mem.jobs.push(JobMemory {
            job: shared,
            deliveries: 0,
            applied: 0,
            contact: None,
            readings: None,
        });
        mem.jobs.last_mut().expect("just pushed")
    }

    /// Whether `device` applied the execution `key`.
    fn applied(&self, device: &str, key: u128) -> bool {
        self.device(device)
            .is_some_and(|m| m.executions.contains(&key))
    }

    /// Each device's entry for `job`, where it has one, by device.
    fn by_device<T>(&self, job: &str, f: impl Fn(&JobMemory) -> Option<T>) -> BTreeMap<String, T> {
        let entry = |m: &DeviceMemory| m.jobs.iter().find(|j| &*j.job == job).and_then(&f);
        self.numbered
            .iter()
            .filter_map(|(n, m)| entry(m).map(|v| (device_name(*n), v)))
            .chain(
                self.named
                    .iter()
                    .filter_map(|(d, m)| entry(m).map(|v| (d.clone(), v))),
            )
            .collect()
    }
}

/// An execution id as an integer: its UUID, or a hash of any other text.
fn execution_key(execution: &str) -> u128 {
    match uuid::Uuid::parse_str(execution) {
        Ok(u) => u.as_u128(),
        Err(_) => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, execution.as_bytes()).as_u128(),
    }
}

/// When a job reached a device: its first and its last delivery (ms since the epoch).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Contact {
    pub(crate) first_ms: u64,
    pub(crate) last_ms: u64,
    /// When the device last answered (HTTP devices): with `last_ms`, the span it was busy.
    pub(crate) replied_ms: Option<u64>,
}

/// Totals over the fleet, served at `/stats`.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Totals {
    /// Deliveries received (requests or job notifications).
    pub(crate) deliveries: u64,
    /// Deliveries of a job the device had already applied.
    pub(crate) redundant_deliveries: u64,
    /// Deliveries left unanswered (offline, hung).
    pub(crate) silent: u64,
    /// Deliveries answered with a transient error (or, over AWS IoT Jobs, left unanswered
    /// until the device asks again).
    pub(crate) transient: u64,
    /// Jobs applied.
    pub(crate) applications: u64,
    /// Jobs applied a second time on the same device: must stay 0.
    pub(crate) duplicate_applications: u64,
    /// Final answers sent, by status.
    pub(crate) answers: BTreeMap<String, u64>,
    /// Deliveries for devices this fleet does not have (ignored).
    pub(crate) unknown_devices: u64,
    /// Health reports sent, by status.
    pub(crate) health_reports: BTreeMap<String, u64>,
    /// Deliveries to a device while it was announced offline (a real device would never
    /// have received them): must stay 0.
    pub(crate) offline_deliveries: u64,
    /// Deliveries over HTTP, by HTTP version (`HTTP/1.1`, `HTTP/2.0`).
    pub(crate) http_versions: BTreeMap<String, u64>,
    /// HTTP connections accepted (deliveries and report endpoints alike).
    pub(crate) http_connections: u64,
    /// Devices played as offline (`--offline`), and when they came online (ms since the
    /// epoch; absent while they are offline).
    pub(crate) offline_devices: u64,
    pub(crate) came_online_at_ms: Option<u64>,
}

/// The simulated fleet.
#[derive(Debug)]
pub(crate) struct Fleet {
    settings: SimulatorSettings,
    /// Keys job documents must be signed with (none: not checked).
    trusted: shared::signing::TrustedKeys,
    size: u64,
    memories: Mutex<Memories>,
    totals: Mutex<Totals>,
    /// Devices `dev-0000000` .. below this index are offline until they are brought online.
    offline_below: std::sync::atomic::AtomicU64,
    /// When each device that was offline announced itself online (ms since the epoch).
    online_at: Mutex<BTreeMap<String, u64>>,
    /// Cancel requests received, by job: device to what it did ("stopped", "refused", or
    /// "finished" when the job was already done).
    cancels: Mutex<HashMap<String, BTreeMap<String, &'static str>>>,
}

/// What the device will do with a delivery.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    /// The device's answer, or silence.
    pub(crate) answer: Answer,
    /// Readings to report if it succeeds (data-retrieval jobs).
    pub(crate) readings: Option<Readings>,
}

impl Fleet {
    /// A fleet of `size` devices named `dev-0000000`...; 0 plays any device id.
    pub(crate) fn new(settings: SimulatorSettings, size: u64) -> Self {
        Self {
            trusted: Default::default(),
            settings,
            size,
            memories: Mutex::new(Memories::with_capacity(size)),
            totals: Mutex::new(Totals::default()),
            offline_below: std::sync::atomic::AtomicU64::new(0),
            online_at: Mutex::new(BTreeMap::new()),
            cancels: Mutex::new(HashMap::new()),
        }
    }

    /// Devices accept only job documents signed by one of `keys` (`key_id=hex`).
    ///
    /// # Errors
    /// A key that does not parse.
    pub(crate) fn trusting(mut self, keys: &[String]) -> Result<Self, String> {
        self.trusted = shared::signing::TrustedKeys::parse(keys)?;
        Ok(self)
    }

    /// Why a device refuses a request's job document, if it does: with trusted keys, the
    /// document must be signed by one of them, for this job, and be the action requested.
    pub(crate) fn refuses(&self, req: &devices::protocol::DeviceRequest) -> Option<String> {
        if self.trusted.is_empty() {
            return None;
        }
        if let Err(e) = self.trusted.verify(req.job_id, req.signed.as_ref()) {
            return Some(e);
        }
        let signed: serde_json::Value = req
            .signed
            .as_ref()
            .and_then(|s| serde_json::from_str(&s.document).ok())
            .unwrap_or_default();
        let asked = serde_json::to_value(&req.action).unwrap_or_default();
        (signed["action"] != asked)
            .then(|| "signature does not cover the action requested".to_owned())
    }

    /// Plays the first `n` devices as offline until [`Self::bring_online`].
    pub(crate) fn set_offline(&self, n: u64) {
        self.offline_below
            .store(n, std::sync::atomic::Ordering::SeqCst);
        self.totals().offline_devices = n;
    }

    /// The offline devices come online now.
    pub(crate) fn bring_online(&self) {
        self.offline_below
            .store(0, std::sync::atomic::Ordering::SeqCst);
        self.totals().came_online_at_ms = Some(shared::now_ms());
    }

    /// Notes that `device` announced itself online now.
    pub(crate) fn announced_online(&self, device: &str) {
        self.online_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device.to_owned(), shared::now_ms());
    }

    /// When each device that was offline announced itself online.
    pub(crate) fn online_times(&self) -> BTreeMap<String, u64> {
        self.online_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `device` is offline now.
    pub(crate) fn is_offline(&self, device: &str) -> bool {
        let below = self.offline_below.load(std::sync::atomic::Ordering::SeqCst);
        below > 0 && index(device).is_some_and(|n| n < below)
    }

    /// Whether `device` is one of ours.
    pub(crate) fn has(&self, device: &str) -> bool {
        if self.size == 0 {
            return true;
        }
        index(device).is_some_and(|n| n < self.size && device.len() >= 11)
    }

    /// Registers a delivery of `job` (`execution`) to `device` and decides the answer.
    /// `None` for devices not in this fleet.
    pub(crate) fn receive(
        &self,
        device: &str,
        job: &str,
        execution: &str,
        attempt: u32,
        action: Option<&Action>,
    ) -> Option<Decision> {
        if !self.has(device) {
            self.totals().unknown_devices += 1;
            return None;
        }
        if self.is_offline(device) {
            // Sent to a device that had announced itself offline: it never gets it.
            self.totals().offline_deliveries += 1;
            return None;
        }
        let (delivery, applied) = {
            let mut memories = self.memories();
            let now = shared::now_ms();
            let j = memories.job(device, job);
            match &mut j.contact {
                Some(c) => c.last_ms = now,
                None => {
                    j.contact = Some(Contact {
                        first_ms: now,
                        last_ms: now,
                        replied_ms: None,
                    });
                }
            }
            j.deliveries += 1;
            let n = j.deliveries;
            let applied = memories.applied(device, execution_key(execution));
            (n, applied)
        };
        let reboot = matches!(action, Some(Action::Reboot(_)));
        let answer = simdevice::decide(
            &self.settings,
            device,
            execution,
            delivery,
            attempt.max(delivery),
            applied,
            reboot,
        );
        {
            let mut t = self.totals();
            t.deliveries += 1;
            if applied {
                t.redundant_deliveries += 1;
            }
            match &answer {
                Answer::Silent => t.silent += 1,
                Answer::Reply {
                    outcome: SimOutcome::Transient,
                    ..
                } => t.transient += 1,
                Answer::Reply { .. } => {}
            }
        }
        let readings = match action {
            Some(Action::DataRetrieval(d)) => {
                Some(simdevice::readings(&self.settings, device, &d.metrics))
            }
            _ => None,
        };
        Some(Decision { answer, readings })
    }

    /// Registers a fleetbatch-protocol request and decides the answer.
    pub(crate) fn receive_request(
        &self,
        req: &devices::protocol::DeviceRequest,
    ) -> Option<Decision> {
        self.receive(
            &req.device_id,
            &req.job_id.to_string(),
            &req.execution_id.to_string(),
            req.attempt,
            Some(&req.action),
        )
    }

    /// The device applies `execution` of `job` now, unless it already has (then it only
    /// acknowledges).
    pub(crate) fn apply(
        &self,
        device: &str,
        job: &str,
        execution: &str,
        readings: Option<&Readings>,
    ) {
        let first = {
            let key = execution_key(execution);
            let mut memories = self.memories();
            if memories.applied(device, key) {
                return;
            }
            let j = memories.job(device, job);
            j.applied += 1;
            if let Some(r) = readings {
                j.readings = Some(Box::new(r.clone()));
            }
            let n = j.applied;
            let executions = &mut memories.device_mut(device).executions;
            executions.reserve_exact(1);
            executions.push(key);
            n
        };
        let mut t = self.totals();
        t.applications += 1;
        if first > 1 {
            t.duplicate_applications += 1;
        }
    }

    /// The answer to a health probe for `req`'s execution: the device's health after
    /// applying it (PENDING if it has not applied it). Not a delivery: nothing is counted.
    pub(crate) fn health(
        &self,
        req: &devices::protocol::DeviceRequest,
    ) -> Option<devices::protocol::DeviceReply> {
        if !self.has(&req.device_id) {
            return None;
        }
        let key = req.execution_id.as_u128();
        let applied = self.memories().applied(&req.device_id, key);
        let health = if applied {
            simdevice::health(&self.settings, &req.device_id, &req.action)
        } else {
            devices::protocol::HealthReport {
                status: devices::protocol::HealthStatus::Pending,
                version: None,
                reason: None,
            }
        };
        *self
            .totals()
            .health_reports
            .entry(format!("{:?}", health.status).to_uppercase())
            .or_default() += 1;
        Some(devices::protocol::DeviceReply {
            execution_id: req.execution_id,
            status: devices::protocol::ReplyStatus::Succeeded,
            retryable: false,
            error: None,
            readings: None,
            nonce: req.nonce.clone(),
            health: Some(health),
        })
    }

    /// Counts a final answer sent.
    pub(crate) fn answered(&self, status: &str) {
        *self.totals().answers.entry(status.to_owned()).or_default() += 1;
    }

    /// The totals.
    pub(crate) fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Readings sent for `job`, by device.
    pub(crate) fn readings(&self, job: &str) -> BTreeMap<String, Readings> {
        self.memories()
            .by_device(job, |j| j.readings.as_deref().cloned())
    }

    fn memories(&self) -> std::sync::MutexGuard<'_, Memories> {
        self.memories.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deliveries of `job` received, by device (each attempt a worker made reached the
    /// device once; more than the recorded attempts are extra deliveries).
    pub(crate) fn deliveries(&self, job: &str) -> BTreeMap<String, u32> {
        self.memories()
            .by_device(job, |j| j.contact.is_some().then_some(j.deliveries))
    }

    /// Notes that `device` answered a delivery of `job` now.
    pub(crate) fn replied(&self, device: &str, job: &str) {
        let mut memories = self.memories();
        if let Some(c) = memories
            .job_mut(device, job)
            .and_then(|j| j.contact.as_mut())
        {
            c.replied_ms = Some(shared::now_ms());
        }
    }

    /// When `job` first and last reached each device it reached (rollout order and stop
    /// times are checked from these).
    pub(crate) fn contacts(&self, job: &str) -> BTreeMap<String, Contact> {
        self.memories().by_device(job, |j| j.contact)
    }

    /// Notes what `device` did with a cancel request for `job`.
    pub(crate) fn cancel_seen(&self, job: &str, device: &str, what: &'static str) {
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(job.to_owned())
            .or_default()
            .insert(device.to_owned(), what);
    }

    /// The cancel requests of `job`: device to what it did.
    pub(crate) fn cancels(&self, job: &str) -> BTreeMap<String, &'static str> {
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `device` refuses to stop a job it is running.
    pub(crate) fn refuses_cancel(&self, device: &str) -> bool {
        simdevice::refuses_cancel(&self.settings, device)
    }

    /// One device's memory, as JSON.
    pub(crate) fn device(&self, device: &str) -> Option<serde_json::Value> {
        let memories = self.memories();
        let m = memories.device(device)?;
        let deliveries: BTreeMap<&str, u32> = m
            .jobs
            .iter()
            .filter(|j| j.contact.is_some())
            .map(|j| (&*j.job, j.deliveries))
            .collect();
        let applied: BTreeMap<&str, u32> = m
            .jobs
            .iter()
            .filter(|j| j.applied > 0)
            .map(|j| (&*j.job, j.applied))
            .collect();
        let readings: BTreeMap<&str, &Readings> = m
            .jobs
            .iter()
            .filter_map(|j| Some((&*j.job, j.readings.as_deref()?)))
            .collect();
        Some(serde_json::json!({
            "deliveries": deliveries,
            "applied": applied,
            "readings": readings,
        }))
    }
}

/// The number in a device id `dev-NNNNNNN`.
fn index(device: &str) -> Option<u64> {
    device
        .strip_prefix("dev-")
        .and_then(|n| n.parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SimulatorSettings {
        SimulatorSettings {
            seed: 1,
            trusted_keys: vec![],
            latency_ms: 0,
            latency_jitter_ms: 0,
            transient_failure_rate: 0.0,
            permanent_failure_rate: 0.0,
            reject_rate: 0.0,
            offline_rate: 0.0,
            offline_attempts: 0,
            hang_rate: 0.0,
            unhealthy_rate: 0.0,
            rollback_rate: 0.0,
            reboot_ms: 0,
            record_deliveries: false,
        }
    }

    #[test]
    fn a_fleet_plays_only_its_own_devices() {
        let f = Fleet::new(settings(), 10);
        assert!(f.has("dev-0000009"));
        assert!(!f.has("dev-0000010"));
        assert!(!f.has("dev-9"));
        assert!(f.receive("other", "j", "x", 1, None).is_none());
        assert_eq!(f.totals().unknown_devices, 1);
        assert!(Fleet::new(settings(), 0).has("anything"));
    }

    #[test]
    fn repeats_are_counted_and_a_second_application_is_flagged() {
        let f = Fleet::new(settings(), 0);
        let d = f.receive("d", "j", "x", 1, None).expect("ours");
        assert!(matches!(
            d.answer,
            Answer::Reply {
                outcome: simdevice::SimOutcome::Applied,
                ..
            }
        ));
        f.apply("d", "j", "x", None);
        let d = f.receive("d", "j", "x", 2, None).expect("ours");
        assert!(matches!(
            d.answer,
            Answer::Reply {
                outcome: simdevice::SimOutcome::AlreadyApplied,
                ..
            }
        ));
        assert_eq!(f.totals().redundant_deliveries, 1);
        // A repeat of the execution is acknowledged, not applied again.
        f.apply("d", "j", "x", None);
        assert_eq!(f.totals().applications, 1);
        assert_eq!(f.totals().duplicate_applications, 0);
        // The same job under another execution id would be applied twice: flagged.
        f.apply("d", "j", "y", None);
        assert_eq!(f.totals().duplicate_applications, 1);
    }

    #[test]
    fn numbered_and_named_devices_keep_their_own_memories_under_their_own_names() {
        assert_eq!(number_of("dev-0000042"), Some(42));
        assert_eq!(number_of("dev-12345678"), Some(12_345_678));
        // Another spelling of a number is another device, kept under its name.
        assert_eq!(number_of("dev-42"), None);
        assert_eq!(number_of("dev-00000042"), None);
        let f = Fleet::new(settings(), 0);
        for d in ["dev-0000042", "dev-42", "dev-00000042"] {
            f.receive(d, "j", &format!("x-{d}"), 1, None).expect("ours");
        }
        f.apply("dev-42", "j", "x-dev-42", None);
        let deliveries = f.deliveries("j");
        assert_eq!(
            deliveries.keys().map(String::as_str).collect::<Vec<_>>(),
            ["dev-00000042", "dev-0000042", "dev-42"]
        );
        assert!(f.memories().applied("dev-42", execution_key("x-dev-42")));
        assert!(
            !f.memories()
                .applied("dev-0000042", execution_key("x-dev-42"))
        );
    }
}
