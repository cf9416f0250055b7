//! MQTT topics from devices and other clients: parsing any topic as an AWS IoT Jobs request
//! or a fleetbatch request topic gives a thing and operation, or nothing, never a panic; and
//! a request the checks accept names a thing that holds no separator or wildcard, so it
//! cannot reach another device's storage keys.
#![no_main]

use devices::{aws, protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(topic) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((thing, operation)) = aws::parse(topic)
        && aws::check_request(thing, operation).is_ok()
    {
        assert!(
            !thing.contains([':', '/', '+', '#', '$', '{', '}']),
            "{thing:?} accepted from {topic:?}"
        );
    }
    let _ = protocol::device_of_request_topic("fleetbatch", topic);
});
