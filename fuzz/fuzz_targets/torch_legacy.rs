//! A whole legacy-format .bin from arbitrary bytes.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use mergestream::format::torch_bin::index_torch_bin;
use mergestream::format::torch_legacy::index_legacy;

fuzz_target!(|data: &[u8]| {
    let _ = index_legacy(Cursor::new(data));
    if let Ok(bin) = index_torch_bin(Cursor::new(data)) {
        for t in &bin.tensors {
            let end = t
                .byte_offset
                .checked_add(t.byte_len)
                .expect("span overflow");
            assert!(end <= data.len() as u64, "span past end of file");
        }
    }
});
