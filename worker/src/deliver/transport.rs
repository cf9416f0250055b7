//! Which transport carries deliveries in this deployment, and the calls every transport
//! answers.

use shared::state::ExecutionState;

use super::{
    http, mqtt,
    request::{DeliverError, DeliveryRequest, Reply},
    simulator,
};

/// The transport chosen for this deployment.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The built-in fleet simulator.
    Simulator(Box<simulator::Simulator>),
    /// An MQTT broker, with the fleetbatch protocol or the AWS IoT Jobs API.
    Mqtt(mqtt::MqttTransport),
    /// HTTP POSTs.
    Http(http::HttpTransport),
    /// Answers from a script, for unit tests of the attempt loop.
    #[cfg(test)]
    #[allow(private_interfaces)]
    Scripted(std::sync::Arc<super::attempts::tests::Script>),
}

impl Transport {
    /// One attempt, without timeout (the caller adds it).
    ///
    /// # Errors
    /// What the device (or the way to it) answered.
    pub async fn attempt(&self, req: &DeliveryRequest) -> Result<Reply, DeliverError> {
        match self {
            Transport::Simulator(sim) => sim.deliver(req).await,
            Transport::Mqtt(m) => m.deliver(req).await,
            Transport::Http(h) => h.deliver(req).await,
            #[cfg(test)]
            Transport::Scripted(script) => script.next().await.map(|()| Reply::default()),
        }
    }

    /// Whether devices reached this way answer health probes after success.
    pub fn probes_health(&self) -> bool {
        match self {
            Transport::Mqtt(m) => m.probes_health(),
            _ => true,
        }
    }

    /// Whether devices reached this way announce their presence (MQTT), so the tasks of a
    /// device known to be offline wait for it instead of spending attempts.
    pub fn announces_presence(&self) -> bool {
        match self {
            Transport::Mqtt(m) => m.announces_presence(),
            _ => false,
        }
    }

    /// Tells the transport how an execution ended when the device did not say so itself
    /// (attempts spent, job deadline, cancel), so device-side state agrees with the job.
    pub async fn conclude(&self, req: &DeliveryRequest, state: ExecutionState) {
        if let Transport::Mqtt(m) = self {
            m.conclude(req, state).await;
        }
    }

    /// Whether the device changed the execution of `req` since the worker read it at
    /// `version` (AWS IoT Jobs only; elsewhere nothing waits in storage). A read error
    /// counts as a change: the task is then looked at again rather than left waiting.
    pub async fn execution_changed(&self, req: &DeliveryRequest, version: u64) -> bool {
        match self {
            Transport::Mqtt(m) => m.execution_changed(req, version).await,
            _ => false,
        }
    }
}
