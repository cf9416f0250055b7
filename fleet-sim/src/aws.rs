//! The AWS IoT Jobs device API, device side, as an AWS IoT Device SDK jobs agent does it:
//! on `notify-next`, `start-next`; on `start-next/accepted`, do the job, then
//! `{jobId}/update` with the final status and the execution's `expectedVersion`.
//!
//! Owns the agent's message handling for every simulated thing over one connection
//! (subscriptions use `+` for the thing name). It never keeps device state itself
//! ([`crate::fleet`] does).
//!
//! Like an agent with request timeouts, a device repeats `start-next` and its final `update`
//! until it hears an answer (a broker may drop a QoS 1 message for a client that falls
//! behind); the API answers a repeat as it answered the first.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use devices::aws;
use devices::{
    mqtt::{Link, Message},
    simdevice::{self, Answer, SimOutcome},
};
use serde_json::{Value, json};
use shared::job::Action;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Decision, Fleet};

/// Topics the agent subscribes to, for every thing.
pub(crate) fn subscriptions() -> Vec<String> {
    aws::filters(&aws::AGENT_OPERATIONS, None)
}

/// The same topics for the named things only (a connection playing a share of the fleet:
/// a broker that cannot share `$aws/...` subscriptions still spreads the fleet's messages
/// over several connections, as over the devices' own), three filters a thing.
pub(crate) fn subscriptions_of(things: impl Iterator<Item = String>) -> Vec<String> {
    things
        .flat_map(|t| aws::AGENT_FILTERS.iter().map(move |op| aws::topic(&t, op)))
        .collect()
}

/// Serves the jobs topics until shutdown.
pub(crate) async fn serve(
    fleet: Arc<Fleet>,
    link: Link,
    mut messages: mpsc::Receiver<Message>,
    shutdown: CancellationToken,
) {
    // Decisions taken at notify-next, carried out at start-next/accepted.
    let pending: Pending = Arc::default();
    // Requests sent and not answered yet, repeated by one task.
    let unanswered: Unanswered = Arc::default();
    tokio::spawn(repeat_unanswered(
        link.clone(),
        unanswered.clone(),
        pending.clone(),
        shutdown.clone(),
    ));
    loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = messages.recv() => match m { Some(m) => m, None => return },
        };
        let Some((thing, rest)) = aws::parse(&m.topic) else {
            continue;
        };
        let thing = thing.to_owned();
        let Ok(body) = serde_json::from_slice::<Value>(&m.payload) else {
            tracing::warn!(topic = %m.topic, "unreadable jobs message ignored");
            continue;
        };
        match rest {
            "notify-next" => {
                let Some(exec) = body.get("execution") else {
                    continue;
                };
                let Some(job) = exec.get("jobId").and_then(Value::as_str) else {
                    continue;
                };
                if fleet.is_offline(&thing) {
                    // Not connected: the notification never reaches it.
                    continue;
                }
                let number = exec
                    .get("executionNumber")
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                let action: Option<Action> = exec
                    .get("jobDocument")
                    .and_then(|d| serde_json::from_value(d.clone()).ok());
                let execution = format!("{job}#{number}");
                let Some(decision) = fleet.receive(&thing, job, &execution, 0, action.as_ref())
                else {
                    continue;
                };
                match decision.answer {
                    // Offline, hung, or a glitch: the notification goes unanswered, and the
                    // device asks for its next job when it is back.
                    Answer::Silent
                    | Answer::Reply {
                        outcome: SimOutcome::Transient,
                        ..
                    } => {
                        ask_again(&link, &thing);
                        continue;
                    }
                    Answer::Reply { .. } => {}
                }
                pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((thing.clone(), job.to_owned()), decision);
                let topic = aws::topic(&thing, "start-next");
                let token = format!("{thing}:{job}");
                send(&link, &topic, json!({"clientToken": token})).await;
                let again = json!({"clientToken": format!("{thing}:{job}:again")});
                wait_for_answer(
                    &unanswered,
                    (thing, job.to_owned(), Asked::StartNext),
                    serialized(&again),
                );
            }
            "start-next/accepted" => {
                let Some(exec) = body.get("execution") else {
                    continue;
                };
                let Some(job) = exec.get("jobId").and_then(Value::as_str).map(str::to_owned) else {
                    continue;
                };
                let number = exec
                    .get("executionNumber")
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                let taken = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(thing.clone(), job.clone()));
                lock(&unanswered).remove(&(thing.clone(), job.clone(), Asked::StartNext));
                // Asked for on connecting, without a notification first: the device takes
                // the job now.
                let decision = match taken {
                    Some(d) => d,
                    None => {
                        let action: Option<Action> = exec
                            .get("jobDocument")
                            .and_then(|d| serde_json::from_value(d.clone()).ok());
                        let execution = format!("{job}#{number}");
                        match fleet.receive(&thing, &job, &execution, 0, action.as_ref()) {
                            Some(d) => d,
                            None => continue,
                        }
                    }
                };
                let (after, outcome) = match decision.answer.clone() {
                    Answer::Reply { after, outcome } if outcome != SimOutcome::Transient => {
                        (after, outcome)
                    }
                    // It dropped off with the job: back, it asks again and carries on.
                    _ => {
                        ask_again(&link, &thing);
                        continue;
                    }
                };
                let version = exec
                    .get("versionNumber")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let (fleet, link, unanswered) = (fleet.clone(), link.clone(), unanswered.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let (status, details) = match outcome {
                        SimOutcome::Applied | SimOutcome::AlreadyApplied => {
                            fleet.apply(
                                &thing,
                                &job,
                                &format!("{job}#{number}"),
                                decision.readings.as_ref(),
                            );
                            let details: serde_json::Map<String, Value> = decision
                                .readings
                                .iter()
                                .flatten()
                                .map(|(k, v)| (k.clone(), Value::String(v.to_string())))
                                .collect();
                            ("SUCCEEDED", Value::Object(details))
                        }
                        SimOutcome::Failed => {
                            ("FAILED", json!({"reason": simdevice::PERMANENT_ERROR}))
                        }
                        SimOutcome::Rejected => {
                            ("REJECTED", json!({"reason": simdevice::REJECT_ERROR}))
                        }
                        // Asked again above.
                        SimOutcome::Transient => return,
                    };
                    fleet.answered(status);
                    let topic = aws::job_topic(&thing, &job, "update");
                    let body = json!({
                        "status": status,
                        "statusDetails": details,
                        "expectedVersion": version,
                        "clientToken": format!("{thing}:{job}:final"),
                    });
                    let payload = serialized(&body);
                    wait_for_answer(&unanswered, (thing, job, Asked::Update), payload.clone());
                    send_bytes(&link, &topic, payload).await;
                });
            }
            r if r.ends_with("/update/accepted") || r.ends_with("/update/rejected") => {
                let job = r.split('/').next().unwrap_or_default().to_owned();
                lock(&unanswered).remove(&(thing.clone(), job, Asked::Update));
                if r.ends_with("/rejected") {
                    tracing::debug!(thing = %thing, topic = %m.topic, body = %body, "update rejected");
                }
            }
            r if r.ends_with("/rejected") => {
                tracing::debug!(thing = %thing, topic = %m.topic, body = %body, "request rejected");
            }
            _ => {}
        }
    }
}

/// Decisions taken at notify-next, by (thing, job).
type Pending = Arc<Mutex<HashMap<(String, String), Decision>>>;

/// Which request of a device waits for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Asked {
    /// `start-next`, answered once `start-next/accepted` names the job notified.
    StartNext,
    /// The final `{jobId}/update`, answered by `update/accepted` or `update/rejected`.
    Update,
}

/// A request sent and not answered yet: what to send again, when, and how many more times.
#[derive(Debug)]
struct Repeat {
    payload: Vec<u8>,
    due: tokio::time::Instant,
    left: u32,
}

/// Requests sent and not answered yet, by (thing, job, which), repeated by one task
/// ([`repeat_unanswered`]) rather than a task each: when the broker is busy, tens of
/// thousands wait at once, and a task each held about 1 KB.
type Unanswered = Arc<Mutex<HashMap<(String, String, Asked), Repeat>>>;

fn lock(u: &Unanswered) -> std::sync::MutexGuard<'_, HashMap<(String, String, Asked), Repeat>> {
    u.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a device waits for an answer before it repeats a request, and how often at most.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);
const REPEATS: u32 = 12;

/// Notes that request `key` waits for its answer: `payload` is sent again after
/// [`ANSWER_WITHIN`] while it does, at most [`REPEATS`] times.
fn wait_for_answer(unanswered: &Unanswered, key: (String, String, Asked), payload: Vec<u8>) {
    let due = tokio::time::Instant::now() + ANSWER_WITHIN;
    lock(unanswered).insert(
        key,
        Repeat {
            payload,
            due,
            left: REPEATS,
        },
    );
}

/// The topic a request is sent on.
fn topic_of(thing: &str, job: &str, asked: Asked) -> String {
    match asked {
        Asked::StartNext => aws::topic(thing, "start-next"),
        Asked::Update => aws::job_topic(thing, job, "update"),
    }
}

/// Sends again, once a second, the requests whose answer is overdue; drops those answered
/// (a `start-next` whose notified job was taken) and those repeated [`REPEATS`] times.
async fn repeat_unanswered(
    link: Link,
    unanswered: Unanswered,
    pending: Pending,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        let mut again = Vec::new();
        {
            let pending = pending.lock().unwrap_or_else(|p| p.into_inner());
            lock(&unanswered).retain(|(thing, job, asked), r| {
                if r.due > now {
                    return true;
                }
                let answered = *asked == Asked::StartNext
                    && !pending.contains_key(&(thing.clone(), job.clone()));
                if answered || r.left == 0 {
                    return false;
                }
                r.left -= 1;
                r.due = now + ANSWER_WITHIN;
                again.push((topic_of(thing, job, *asked), r.payload.clone()));
                true
            });
        }
        for (topic, payload) in again {
            send_bytes(&link, &topic, payload).await;
        }
    }
}

/// A device that missed a notification or dropped off with its job asks for its next job
/// once it is back, a moment later.
fn ask_again(link: &Link, thing: &str) {
    let (link, thing) = (link.clone(), thing.to_owned());
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        connected(&link, &thing).await;
    });
}

/// What an agent does on connecting: ask for its next job.
pub(crate) async fn connected(link: &Link, thing: &str) {
    let body = json!({"clientToken": format!("{thing}:connect")});
    send(link, &aws::topic(thing, "start-next"), body).await;
}

async fn send(link: &Link, topic: &str, body: Value) {
    send_bytes(link, topic, serialized(&body)).await;
}

/// A request's body as sent (a JSON value always serializes).
fn serialized(body: &Value) -> Vec<u8> {
    serde_json::to_vec(body).unwrap_or_default()
}

async fn send_bytes(link: &Link, topic: &str, payload: Vec<u8>) {
    if let Err(e) = link.publish(topic, payload, None).await {
        tracing::warn!(topic, error.message = %e, "publish failed");
    }
}
