//! The restricted unpickler on arbitrary bytes, in every mode it has.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mergestream::format::pickle::{Limits, PidFlavor, parse_plain, parse_state_dict};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    for flavor in [PidFlavor::Zip, PidFlavor::Legacy] {
        if let Ok((sd, used)) = parse_state_dict(data, flavor, &limits) {
            assert!(used <= data.len());
            for (_, t) in &sd.tensors {
                // Every accepted tensor must fit its storage.
                assert!(t.storage_byte_span().is_ok());
            }
        }
    }
    let _ = parse_plain(data, &limits);
});
