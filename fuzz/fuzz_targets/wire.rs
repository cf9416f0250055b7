//! Queue messages from anyone who can publish: decoding any bytes as a task, a result, a
//! batch of results or a control message must end in a message or an error, never a panic.
#![no_main]

use shared::messages;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = messages::decode_task(data);
    let _ = messages::decode_result(data);
    let _ = messages::decode_results(data);
    let _ = messages::decode_control(data);
});
