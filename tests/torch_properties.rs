//! Property tests: arbitrary and mutated inputs give Ok or Err, never a panic, and
//! finish quickly. (The fuzz targets in fuzz/ explore the same space much longer.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![allow(clippy::arithmetic_side_effects)]

use crate::torch_common as common;

use std::io::Cursor;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use common::*;
use mergestream::format::pickle::{Limits, PidFlavor, parse_plain, parse_state_dict};
use mergestream::format::torch_bin::{gather_strided, index_torch_bin};
use proptest::prelude::*;

static PKL: LazyLock<Vec<u8>> = LazyLock::new(|| read("data_pkl_base_shard1.pkl"));
static ZIP: LazyLock<Vec<u8>> = LazyLock::new(|| read("mixed_zip.bin"));
static LEGACY: LazyLock<Vec<u8>> = LazyLock::new(|| read("mixed_legacy.bin"));

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Edit::Insert(i, v)),
        1 => (any::<usize>(), 1usize..32).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ];
    proptest::collection::vec(edit, 1..8)
}

fn apply(orig: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = orig.to_vec();
    for e in edits {
        if v.is_empty() {
            break;
        }
        match e {
            Edit::Set(i, b) => {
                let i = i % v.len();
                v[i] = *b;
            }
            Edit::Insert(i, bytes) => {
                let i = i % (v.len() + 1);
                v.splice(i..i, bytes.iter().copied());
            }
            Edit::Delete(i, n) => {
                let i = i % v.len();
                let end = (i + n).min(v.len());
                v.drain(i..end);
            }
            Edit::Truncate(n) => v.truncate(n % (v.len() + 1)),
        }
    }
    v
}

fn timed<T>(f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    r
}

fn all_pickle_modes(data: &[u8]) {
    let limits = Limits::default();
    for flavor in [PidFlavor::Zip, PidFlavor::Legacy] {
        if let Ok((sd, used)) = parse_state_dict(data, flavor, &limits) {
            assert!(used <= data.len());
            for (_, t) in &sd.tensors {
                t.storage_byte_span().unwrap();
            }
        }
    }
    let _ = parse_plain(data, &limits);
}

fn whole_file(data: Vec<u8>) {
    let len = data.len() as u64;
    if let Ok(bin) = index_torch_bin(Cursor::new(data.clone())) {
        for t in &bin.tensors {
            let end = t.byte_offset.checked_add(t.byte_len).unwrap();
            assert!(end <= len);
            if t.nbytes().unwrap() <= 1 << 20 {
                gather_strided(&data[t.byte_offset as usize..end as usize], t).unwrap();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        timed(|| all_pickle_modes(&data));
        timed(|| whole_file(data));
    }

    #[test]
    fn arbitrary_bytes_after_a_pickle_header(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut p = vec![0x80, 2];
        p.extend(data);
        timed(|| all_pickle_modes(&p));
    }

    #[test]
    fn mutated_real_pickle_never_panics(e in edits()) {
        let data = apply(&PKL, &e);
        timed(|| all_pickle_modes(&data));
    }

    #[test]
    fn mutated_zip_checkpoint_never_panics(e in edits()) {
        let data = apply(&ZIP, &e);
        timed(|| whole_file(data));
    }

    #[test]
    fn mutated_legacy_checkpoint_never_panics(e in edits()) {
        let data = apply(&LEGACY, &e);
        timed(|| whole_file(data));
    }
}
