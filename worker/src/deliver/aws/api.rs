//! The device requests of the AWS IoT Jobs API, answered by any worker: `get`,
//! `start-next`, `{jobId}/get` (`$next` included) and `{jobId}/update`, with the AWS error
//! documents for rejected ones.

use devices::{aws, mqtt::Message};
use serde_json::{Map, Value, json};
use shared::coalesce::ScriptItem;
use uuid::Uuid;

use super::super::mqtt::Routed;
use super::{
    AwsJobs,
    documents::{
        Rejection, execution_state, pick_next, reject, secs, status_details, step_minutes, summary,
    },
    scripts::Record,
};

impl AwsJobs {
    /// The name under which workers claim request `m` when they all receive it (no shared
    /// subscription): its topic and payload, and how many identical messages came before it
    /// within the window. Every worker sees one device's messages in the same order, so the
    /// n-th copy of a request has the same name everywhere, while a device that repeats a
    /// request sends a new one. Called in arrival order.
    pub(crate) fn request_name(&self, m: &Message) -> Option<String> {
        self.0.dedupe?;
        let mut id = xxhash_rust::xxh3::Xxh3::new();
        id.update(m.topic.as_bytes());
        id.update(&[0]);
        id.update(&m.payload);
        let hash = id.digest128();
        let copy = self
            .0
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next(hash, std::time::Instant::now());
        Some(format!(
            "{}:aws:req:{hash:032x}:{}",
            self.0.names.key_prefix(),
            copy
        ))
    }

    /// Whether this worker answers a request: always with a shared subscription; otherwise
    /// when it is the first worker to claim the request's name in Redis.
    async fn claim_request(&self, name: Option<String>) -> bool {
        let (Some(name), Some(window), Some(claims)) = (name, self.0.dedupe, &self.0.claims) else {
            return true;
        };
        let claimed = claims
            .call(ScriptItem {
                keys: vec![name],
                args: vec![window.as_millis().to_string().into_bytes()],
            })
            .await;
        match claimed {
            Ok(won) => won == 1,
            Err(e) => {
                tracing::warn!(error.message = %e, "request not claimed: Redis unavailable");
                false
            }
        }
    }

    /// Answers one request from a device.
    pub(crate) async fn handle_request(&self, m: Message, name: Option<String>) {
        let Some((thing, op)) = aws::parse(&m.topic) else {
            return;
        };
        if !self.claim_request(name).await {
            return;
        }
        if let Err(problem) = aws::check_request(thing, op) {
            tracing::warn!(security_event = "aws_request_refused", topic = %m.topic, %problem, "refusing a device request");
            self.respond(&m.topic, None, Err(reject("InvalidRequest", &problem)))
                .await;
            return;
        }
        let thing = thing.to_owned();
        let body: Value = if m.payload.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(&m.payload) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    self.respond(
                        &m.topic,
                        None,
                        Err(reject(
                            "InvalidJson",
                            "the request body is not a JSON object",
                        )),
                    )
                    .await;
                    return;
                }
            }
        };
        let token = body.get("clientToken").cloned();
        let answer = match op {
            "get" => self.get_pending(&thing).await,
            "start-next" => self.start_next(&thing, &body).await,
            op => match op.rsplit_once('/') {
                Some((job, "get")) => self.describe(&thing, job, &body).await,
                Some((job, "update")) => self.update(&thing, job, &body).await,
                _ => return,
            },
        };
        self.respond(&m.topic, token, answer).await;
    }

    async fn respond(&self, topic: &str, token: Option<Value>, answer: Result<Value, Rejection>) {
        let now = secs(shared::now_ms());
        let (suffix, mut body) = match answer {
            Ok(v) => ("accepted", v),
            Err(r) => {
                let mut v = json!({"code": r.code, "message": r.message});
                if let Some(s) = r.state {
                    v["executionState"] = execution_state(&s);
                }
                ("rejected", v)
            }
        };
        if let Value::Object(map) = &mut body {
            map.insert("timestamp".into(), json!(now));
            if let Some(t) = token {
                map.insert("clientToken".into(), t);
            }
        }
        self.send(&format!("{topic}/{suffix}"), body).await;
    }

    async fn get_pending(&self, thing: &str) -> Result<Value, Rejection> {
        let (list, _) = self
            .pending(thing, &[])
            .await
            .map_err(|e| reject("InternalError", e))?;
        let of = |status: &str| -> Vec<Value> {
            list.iter()
                .filter(|e| e.status() == status)
                .map(summary)
                .collect()
        };
        Ok(json!({"inProgressJobs": of("IN_PROGRESS"), "queuedJobs": of("QUEUED")}))
    }

    async fn start_next(&self, thing: &str, body: &Value) -> Result<Value, Rejection> {
        let details = status_details(body)?.unwrap_or_default();
        let step = step_minutes(body)?
            .map(|s| s.to_string())
            .unwrap_or_default();
        let retention = self.0.retention.as_secs().to_string();
        // One call when the thing has nothing pending, two otherwise: the script names the
        // pending jobs, and the second call withdraws those of canceled jobs and starts the
        // next one.
        let a = self
            .run_over_pending(
                &self.0.start_next,
                thing,
                (&self.parking_keys(thing), &[]),
                |jobs| {
                    let (details, step, retention) =
                        (details.clone(), step.clone(), retention.clone());
                    async move {
                        Ok(vec![
                            details,
                            step,
                            self.stopped_of(&jobs).await?,
                            retention,
                            shared::now_ms().to_string(),
                        ])
                    }
                },
            )
            .await
            .map_err(|e| reject("InternalError", e))?;
        Ok(match a.exec {
            // The script woke the task waiting for this execution (it started, and may carry
            // a step timer now).
            Some(e) => {
                json!({"execution": self.execution(thing, &e, a.now, true).await})
            }
            None => json!({}),
        })
    }

    async fn describe(&self, thing: &str, job: &str, body: &Value) -> Result<Value, Rejection> {
        let with_doc = body
            .get("includeJobDocument")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        if job == "$next" {
            let (list, now) = self
                .pending(thing, &[])
                .await
                .map_err(|e| reject("InternalError", e))?;
            return Ok(match pick_next(&list) {
                Some(e) => json!({"execution": self.execution(thing, e, now, with_doc).await}),
                None => json!({}),
            });
        }
        let a = self
            .run(
                &self.0.check,
                &self.exec_keys(job, thing),
                &[job.to_owned()],
            )
            .await
            .map_err(|e| reject("InternalError", e))?;
        match a.exec {
            Some(mut e) => {
                e.0.insert("job".into(), json!(job));
                Ok(json!({"execution": self.execution(thing, &e, a.now, with_doc).await}))
            }
            None => Err(reject(
                "ResourceNotFound",
                format!("no execution of job {job} on thing {thing}"),
            )),
        }
    }

    async fn update(&self, thing: &str, job: &str, body: &Value) -> Result<Value, Rejection> {
        let status = body
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !matches!(status, "IN_PROGRESS" | "SUCCEEDED" | "FAILED" | "REJECTED") {
            return Err(reject(
                "InvalidRequest",
                format!("status {status:?} is not one of IN_PROGRESS, SUCCEEDED, FAILED, REJECTED"),
            ));
        }
        let details = status_details(body)?;
        let step = step_minutes(body)?;
        let expected = match body.get("expectedVersion") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| reject("InvalidRequest", "expectedVersion must be a number"))?,
            ),
        };
        let [parked, due] = self.parking_keys(thing);
        let mut keys = self.exec_keys(job, thing);
        keys.extend([parked, due]);
        let a = self
            .run(
                &self.0.update,
                &keys,
                &[
                    job.to_owned(),
                    status.to_owned(),
                    details.unwrap_or_default(),
                    expected.map(|v| v.to_string()).unwrap_or_default(),
                    step.map(|s| s.to_string()).unwrap_or_default(),
                    self.0.retention.as_secs().to_string(),
                    shared::now_ms().to_string(),
                ],
            )
            .await
            .map_err(|e| reject("InternalError", e))?;
        if let Some(code) = a.code.as_deref() {
            let (code, message) = match code {
                "ResourceNotFound" => (
                    "ResourceNotFound",
                    format!("no execution of job {job} on thing {thing}"),
                ),
                "VersionMismatch" => (
                    "VersionMismatch",
                    format!(
                        "expectedVersion {} does not match the execution's versionNumber",
                        expected.unwrap_or(0)
                    ),
                ),
                _ => (
                    "InvalidStateTransition",
                    format!(
                        "the execution is {} and cannot be updated",
                        a.exec.as_ref().map(Record::status).unwrap_or("finished")
                    ),
                ),
            };
            return Err(Rejection {
                code,
                message,
                state: a.exec,
            });
        }
        let Some(mut e) = a.exec else {
            return Err(reject("InternalError", "execution vanished"));
        };
        e.0.insert("job".into(), json!(job));
        if e.is_terminal() {
            // Wake the worker holding the task, then move the thing on to its next job.
            if let (Some(holder), Ok(id)) = (e.str("holder"), Uuid::parse_str(job)) {
                let execution = shared::state::execution_id(id, thing);
                // The holder is this worker: woken here with the final execution (its task
                // needs no read), not through the broker.
                let here = holder == self.0.holder
                    && self
                        .0
                        .waiting
                        .route(execution, Routed::Concluded(Box::new(e.clone())));
                if !here {
                    self.send(holder, json!({"executionId": execution})).await;
                }
            }
            if a.alone {
                self.send_notifications(thing, &[], a.now).await;
            } else {
                self.notify(thing, &[]).await;
            }
        }
        let mut out = Map::new();
        if body
            .get("includeJobExecutionState")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            out.insert("executionState".into(), execution_state(&e));
        }
        if body
            .get("includeJobDocument")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            && let Some(doc) = self.document(job).await
        {
            out.insert("jobDocument".into(), doc);
        }
        Ok(Value::Object(out))
    }
}
