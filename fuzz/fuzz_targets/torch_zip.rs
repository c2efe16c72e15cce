//! A whole zip-format .bin from arbitrary bytes: central directory, local headers, the
//! pickle, and the tensor/storage cross-checks. Also exercises gather on what it accepts.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use mergestream::format::torch_bin::{gather_strided, index_torch_bin};
use mergestream::format::torch_zip::index_zip;

fuzz_target!(|data: &[u8]| {
    let _ = index_zip(Cursor::new(data));
    if let Ok(bin) = index_torch_bin(Cursor::new(data)) {
        for t in &bin.tensors {
            let end = t
                .byte_offset
                .checked_add(t.byte_len)
                .expect("span overflow");
            assert!(end <= data.len() as u64, "span past end of file");
            // Gather only what stays small (an expanded tensor can be huge by design).
            if t.nbytes().is_some_and(|n| n <= 1 << 20) {
                let span = &data[t.byte_offset as usize..end as usize];
                let out = gather_strided(span, t).expect("gather of a validated tensor");
                assert_eq!(out.len() as u64, t.nbytes().unwrap_or(0));
            }
        }
    }
});
