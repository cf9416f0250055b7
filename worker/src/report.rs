//! Publishing results.
//!
//! Owns the one way a [`TaskResult`] leaves a worker: to the results exchange, persistent,
//! mandatory, with the trace context in its headers, and confirmed by the broker before the
//! caller may ack the task. It never decides outcomes.

use lapin::types::FieldTable;
use shared::{
    amqp::{self, AmqpError, Outgoing, Publisher},
    messages::{self, RESULT_TYPE, TaskResult},
    topology::{HEADER_ATTEMPT, HEADER_JOB_ID, Names, RESULT_ROUTING_KEY},
};

/// Publishes `result` and waits for the broker's confirm.
///
/// # Errors
/// Encoding (never for this type), a closed channel, a nack, or no confirm in time.
pub async fn publish(
    publisher: &Publisher,
    names: &Names,
    result: &TaskResult,
) -> Result<(), AmqpError> {
    let payload = messages::encode(result)?;
    let mut headers = FieldTable::default();
    amqp::set_header(&mut headers, HEADER_JOB_ID, &result.job_id.to_string());
    amqp::set_header(&mut headers, HEADER_ATTEMPT, &result.attempts.to_string());
    amqp::inject_current_context(&mut headers);
    publisher
        .publish(Outgoing {
            exchange: &names.results_exchange(),
            routing_key: RESULT_ROUTING_KEY,
            payload: &payload,
            properties: amqp::properties(RESULT_TYPE, &result.execution_id.to_string(), headers),
        })
        .await
}
