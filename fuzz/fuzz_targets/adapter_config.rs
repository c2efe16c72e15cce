//! The PEFT adapter config parser and key classifier on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mergestream::format::peft::{classify_key, parse_adapter_config};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = parse_adapter_config(text) {
            assert!(cfg.r > 0);
        }
        let _ = classify_key(text);
    }
});
