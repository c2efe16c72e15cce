//! The safetensors header parser on arbitrary bytes: Ok or a specific error, never a panic;
//! an accepted header's tensors tile the data exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mergestream::format::safetensors::parse_header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_header(data, data.len() as u64) {
        let total: u64 = h.tensors.iter().map(|t| t.end - t.begin).sum();
        assert_eq!(h.data_start + total, data.len() as u64);
    }
});
