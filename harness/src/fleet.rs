//! Generated fleets for the demo, the benchmark and tests: reproducible device records with
//! a realistic mix of models, hardware revisions, firmware versions, regions and tags.

use std::collections::BTreeMap;

use shared::device::Device;

/// Models in the generated fleet.
pub const MODELS: [&str; 3] = ["gw-100", "gw-200", "sensor-s1"];
/// Regions (each also a group).
pub const REGIONS: [&str; 4] = ["eu-west", "eu-central", "us-east", "ap-south"];

/// Id of the `i`-th generated device (zero-padded so id order is numeric order).
pub fn device_id(i: u64) -> String {
    format!("dev-{i:07}")
}

/// The `i`-th device: in group `fleet` and its region's group; hardware revisions A, B, C
/// with 2 % on the old revision `D`.
pub fn device(i: u64) -> Device {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    let region = REGIONS[(h % REGIONS.len() as u64) as usize];
    let hw = match (h >> 8) % 100 {
        0..=1 => "D",
        2..=40 => "A",
        41..=75 => "B",
        _ => "C",
    };
    Device {
        id: device_id(i),
        groups: vec!["fleet".into(), region.into()],
        model: MODELS[((h >> 16) % MODELS.len() as u64) as usize].into(),
        hardware_revision: hw.into(),
        firmware_version: format!("1.{}.0", (h >> 24) % 4),
        tags: BTreeMap::from([("site".to_owned(), format!("site-{}", (h >> 32) % 50))]),
    }
}

/// NDJSON lines of devices `0..n`.
pub fn ndjson(n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n as usize * 160);
    for i in 0..n {
        if let Ok(line) = serde_json::to_vec(&device(i)) {
            out.extend(line);
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_fleet_is_reproducible_and_mixed() {
        assert_eq!(device(42), device(42));
        let hw_d = (0..10_000)
            .filter(|i| device(*i).hardware_revision == "D")
            .count();
        assert!((100..=300).contains(&hw_d), "{hw_d}");
        let lines = ndjson(10);
        assert_eq!(lines.iter().filter(|b| **b == b'\n').count(), 10);
    }
}
