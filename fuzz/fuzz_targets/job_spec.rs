//! Job specs from untrusted callers: parsing and validating any bytes as JSON or TOML must
//! end in a spec or an error naming a field, never a panic.
#![no_main]

use shared::job::{JobSpec, SpecFormat, SpecLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = SpecLimits {
        max_document_bytes: 262_144,
        max_explicit_devices: 10_000,
    };
    for format in [SpecFormat::Json, SpecFormat::Toml] {
        if let Err(e) = JobSpec::parse(text, format, limits) {
            assert!(!e.to_string().is_empty());
        }
    }
});
