//! Redis keys and MQTT names of the device side: the built-in simulator's device memory, AWS
//! IoT Jobs executions, the workers' shared-subscription group. They live in the deployment's
//! namespace like every other key ([`crate::topology::Names`]). The workers' device transports
//! and `fleet-sim` write and read them; the coordinator never reads them, and only deletes
//! those named after a job with the job's other data (retention).

use crate::topology::Names;
use uuid::Uuid;

/// The device side's keys, on a deployment's [`Names`].
pub trait DeviceKeys {
    /// Hash execution id -> deliveries seen by the simulated device.
    fn sim_deliveries(&self, job: Uuid) -> String;
    /// Hash execution id -> 1 once the simulated device applied it (its memory of repeats).
    fn sim_done(&self, job: Uuid) -> String;
    /// Hash device id -> times the simulated device applied this job.
    fn sim_applied(&self, job: Uuid) -> String;
    /// Hash of the simulator's totals for a job (deliveries, applications, duplicates).
    fn sim_totals(&self, job: Uuid) -> String;
    /// Hash of the simulator's delivery log per execution (`worker/attempt;...`), kept when
    /// `simulator.record_deliveries` is on.
    fn sim_log(&self, job: Uuid) -> String;
    /// Prefix of AWS IoT Jobs execution hashes: `{prefix}{job}:{thing}`.
    fn aws_execution_prefix(&self) -> String;
    /// Hash of one AWS IoT Jobs execution (status, versions, times, holder).
    fn aws_execution(&self, job: &str, thing: &str) -> String;
    /// Sorted set of a thing's pending (QUEUED or IN_PROGRESS) job ids, by queue time.
    fn aws_pending(&self, thing: &str) -> String;
    /// MQTT shared-subscription group of this deployment's workers.
    fn mqtt_share_group(&self) -> String;
}

impl DeviceKeys for Names {
    fn sim_deliveries(&self, job: Uuid) -> String {
        format!("{}:sim:{job}:deliveries", self.key_prefix())
    }
    fn sim_done(&self, job: Uuid) -> String {
        format!("{}:sim:{job}:done", self.key_prefix())
    }
    fn sim_applied(&self, job: Uuid) -> String {
        format!("{}:sim:{job}:applied", self.key_prefix())
    }
    fn sim_totals(&self, job: Uuid) -> String {
        format!("{}:sim:{job}:totals", self.key_prefix())
    }
    fn sim_log(&self, job: Uuid) -> String {
        format!("{}:sim:{job}:log", self.key_prefix())
    }
    fn aws_execution_prefix(&self) -> String {
        format!("{}:aws:exec:", self.key_prefix())
    }
    fn aws_execution(&self, job: &str, thing: &str) -> String {
        format!("{}{job}:{thing}", self.aws_execution_prefix())
    }
    fn aws_pending(&self, thing: &str) -> String {
        format!("{}:aws:pending:{thing}", self.key_prefix())
    }
    fn mqtt_share_group(&self) -> String {
        format!("fleetbatch-{}", self.namespace())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_live_in_the_namespace() {
        let n = Names::new("ns1");
        let job = Uuid::nil();
        assert!(n.sim_totals(job).starts_with("{ns1}:sim:"));
        assert_eq!(
            n.aws_execution("j", "t"),
            format!("{}j:t", n.aws_execution_prefix())
        );
        assert!(n.aws_pending("t").starts_with("{ns1}:aws:pending:"));
        assert_eq!(n.mqtt_share_group(), "fleetbatch-ns1");
    }
}
