//! The resume journal parser on arbitrary bytes: what it accepts is a valid, duplicate-free
//! list of steps within range, and the well-formed prefix it reports is within the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mergestream::pipeline::journal::parse;

fuzz_target!(|data: &[u8]| {
    // Both with the header the fuzzer must find and with it given.
    let header = b"mergestream resume journal 1\nplan f\nsteps 7\n";
    let mut with_header = header.to_vec();
    with_header.extend_from_slice(data);
    for bytes in [data, &with_header[..]] {
        if let Some((done, valid)) = parse(bytes, "f", 7) {
            assert!(valid <= bytes.len());
            let mut seen = [false; 7];
            for s in done {
                assert!(s < 7 && !std::mem::replace(&mut seen[s], true));
            }
        }
    }
});
