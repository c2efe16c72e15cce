//! The shard index parser on arbitrary text: accepted shard names never leave the folder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mergestream::format::index::{is_safe_relative, parse_index};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(idx) = parse_index(text)
    {
        for (_, shard) in &idx.weight_map {
            assert!(is_safe_relative(shard));
        }
    }
});
