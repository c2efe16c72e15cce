//! DESIGN.md section 7 for .bin files: every hostile or broken input is a specific error,
//! never a panic, and never expensive.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![allow(clippy::arithmetic_side_effects)]

use crate::torch_common as common;

use std::fs::File;
use std::io::Cursor;
use std::time::{Duration, Instant};

use common::*;
use mergestream::format::pickle::{Limits, PickleError, PidFlavor, parse_plain, parse_state_dict};
use mergestream::format::torch_bin::{TorchBinError, index_torch_bin};
use mergestream::format::torch_legacy::LegacyError;
use mergestream::format::torch_zip::ZipError;

fn sd(data: &[u8]) -> Result<usize, PickleError> {
    parse_state_dict(data, PidFlavor::Zip, &Limits::default()).map(|(s, _)| s.tensors.len())
}

fn bin(bytes: Vec<u8>) -> Result<usize, TorchBinError> {
    index_torch_bin(Cursor::new(bytes)).map(|b| b.tensors.len())
}

fn fixture_bin(rel: &str) -> Result<usize, TorchBinError> {
    index_torch_bin(File::open(fixture(rel)).unwrap()).map(|b| b.tensors.len())
}

// ---- forbidden globals and calls ----

#[test]
fn os_system_is_rejected_naming_the_global() {
    let p = P::new()
        .global("os", "system")
        .str("touch /tmp/pwned")
        .op(0x85)
        .op(b'R')
        .stop();
    let e = sd(&p).unwrap_err();
    assert_eq!(
        e,
        PickleError::ForbiddenGlobal {
            module: "os".into(),
            name: "system".into(),
            pos: 2
        }
    );
    assert!(e.to_string().contains("os.system"), "{e}");
}

#[test]
fn other_dangerous_globals_are_rejected() {
    for (m, n) in [
        ("builtins", "eval"),
        ("__builtin__", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("posix", "system"),
        ("nt", "system"),
        ("subprocess", "Popen"),
        ("subprocess", "check_output"),
        ("torch", "load"),
        ("torch.storage", "_load_from_bytes"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("collections", "defaultdict"),
        ("torch", "Storage"),
        ("torch.cuda", "float16"),
    ] {
        let p = P::new().global(m, n).str("x").op(0x85).op(b'R').stop();
        match sd(&p) {
            Err(PickleError::ForbiddenGlobal { module, name, .. }) => {
                assert_eq!(module, m.escape_debug().to_string());
                assert!(n.starts_with(name.as_str()), "{name}");
            }
            other => panic!("{m}.{n}: {other:?}"),
        }
    }
}

#[test]
fn builtins_eval_via_inst_is_rejected() {
    let p = P::new().mark().str("1+1").raw(b"ibuiltins\neval\n").stop();
    assert!(
        matches!(sd(&p), Err(PickleError::ForbiddenGlobal { ref module, ref name, .. }) if module == "builtins" && name == "eval")
    );
}

#[test]
fn allowlisted_non_callables_cannot_be_called() {
    let p = P::new()
        .global("torch", "FloatStorage")
        .op(b')')
        .op(b'R')
        .stop();
    let e = sd(&p).unwrap_err();
    assert!(
        matches!(
            e,
            PickleError::ForbiddenCall {
                opcode: "REDUCE",
                ..
            }
        ),
        "{e:?}"
    );
    // NEWOBJ on a rebuild function, REDUCE on a string
    let p = P::new()
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(b')')
        .op(0x81)
        .stop();
    assert!(matches!(
        sd(&p),
        Err(PickleError::ForbiddenCall {
            opcode: "NEWOBJ",
            ..
        })
    ));
    let p = P::new().str("os.system").op(b')').op(b'R').stop();
    assert!(matches!(sd(&p), Err(PickleError::ForbiddenCall { .. })));
    // OrderedDict with arguments
    let p = P::new()
        .global("collections", "OrderedDict")
        .str("x")
        .op(0x85)
        .op(b'R')
        .stop();
    assert!(matches!(sd(&p), Err(PickleError::BadArguments { .. })));
}

// ---- opcodes and protocols ----

#[test]
fn unknown_opcode_names_byte_and_position() {
    assert_eq!(
        sd(&P::new().op(b'}').op(0xff).stop()).unwrap_err(),
        PickleError::UnknownOpcode { byte: 0xff, pos: 3 }
    );
}

#[test]
fn protocol_4_and_5_are_refused() {
    assert_eq!(
        sd(&[0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0, b'}', b'.']).unwrap_err(),
        PickleError::UnsupportedProtocol { version: 4, pos: 0 }
    );
    assert_eq!(
        sd(&[0x80, 5, b'}', b'.']).unwrap_err(),
        PickleError::UnsupportedProtocol { version: 5, pos: 0 }
    );
    // protocol 4 opcodes without a PROTO header are refused by name
    for (byte, name) in [
        (0x95u8, "FRAME"),
        (0x93, "STACK_GLOBAL"),
        (0x94, "MEMOIZE"),
        (0x8c, "SHORT_BINUNICODE"),
        (0x97, "NEXT_BUFFER"),
    ] {
        match sd(&[b'}', byte, b'.']) {
            Err(PickleError::UnsupportedOpcode { opcode, pos: 1, .. }) => assert_eq!(opcode, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    // a real torch file written with pickle_protocol=4
    match fixture_bin("proto4.bin") {
        Err(TorchBinError::Pickle(PickleError::UnsupportedProtocol { version: 4, .. })) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn ext_and_text_persid_are_refused() {
    assert!(matches!(
        sd(&[0x82, 1, b'.']),
        Err(PickleError::UnsupportedOpcode { opcode: "EXT1", .. })
    ));
    assert!(matches!(
        sd(b"Pabc\n."),
        Err(PickleError::UnsupportedOpcode {
            opcode: "PERSID",
            ..
        })
    ));
}

#[test]
fn malformed_stop_and_stack_errors() {
    assert!(matches!(
        sd(b"NN."),
        Err(PickleError::MalformedStop { stack: 2, .. })
    ));
    assert!(matches!(
        sd(b"(N."),
        Err(PickleError::MalformedStop { marks: 1, .. })
    ));
    assert!(matches!(
        sd(b"."),
        Err(PickleError::MalformedStop { stack: 0, .. })
    ));
    assert!(matches!(
        sd(b"R."),
        Err(PickleError::StackUnderflow {
            opcode: "REDUCE",
            pos: 0
        })
    ));
    assert!(matches!(
        sd(b"N(s."),
        Err(PickleError::StackUnderflow {
            opcode: "SETITEM",
            ..
        })
    ));
    assert!(matches!(
        sd(b"t."),
        Err(PickleError::NoMark {
            opcode: "TUPLE",
            ..
        })
    ));
    assert!(matches!(
        sd(b"h\x05."),
        Err(PickleError::MemoMissing { index: 5, .. })
    ));
    assert!(matches!(
        sd(b"Na."),
        Err(PickleError::StackUnderflow { .. })
    ));
    assert!(matches!(
        sd(b"NNa."),
        Err(PickleError::TypeMismatch {
            opcode: "APPEND",
            ..
        })
    ));
}

// ---- truncation ----

#[test]
fn truncation_at_every_byte_of_a_real_data_pkl() {
    let pkl = read("data_pkl_base_shard1.pkl");
    assert_eq!(sd(&pkl).unwrap(), 25);
    for n in 0..pkl.len() {
        let e = sd(&pkl[..n]).unwrap_err();
        assert!(e.is_truncation(), "cut at {n}: {e:?}");
    }
}

#[test]
fn truncation_at_every_byte_of_legacy_pickles_and_sampled_bytes_of_files() {
    let legacy = read("golden/other_legacy_bin/pytorch_model-00001-of-00003.bin");
    let zip = read("golden/base_bin/pytorch_model-00001-of-00003.bin");
    for file in [&legacy, &zip] {
        // every byte of the first 4 KiB (the pickles, the first headers) and the last
        // 4 KiB (the zip central directory, the last legacy record); a stride elsewhere
        let len = file.len();
        let cuts = (0..len).filter(|&n| n < 4096 || n + 4096 > len || n % 61 == 0);
        for n in cuts {
            assert!(bin(file[..n].to_vec()).is_err(), "cut at {n} parsed");
        }
    }
}

#[test]
fn truncated_legacy_errors_are_specific() {
    let legacy = read("golden/other_legacy_bin/pytorch_model-00001-of-00003.bin");
    match bin(legacy[..legacy.len() - 1].to_vec()) {
        Err(TorchBinError::Legacy(LegacyError::Truncated { .. })) => {}
        other => panic!("{other:?}"),
    }
    match bin(legacy[..100].to_vec()) {
        Err(TorchBinError::Legacy(LegacyError::Pickle {
            which: "sys_info",
            source,
            ..
        })) => assert!(source.is_truncation()),
        other => panic!("{other:?}"),
    }
}

// ---- bombs and limits ----

fn quick<T>(f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    r
}

/// L0 = [1]; L(i) = [L(i-1)] * 10, 40 levels deep: 10^40 elements if expanded.
fn billion_laughs() -> Vec<u8> {
    let mut p = P::new().op(b']').put(0).mark().int(1).op(b'e').op(b'0');
    for i in 1..40u8 {
        p = p.op(b']').put(i).mark();
        for _ in 0..10 {
            p = p.get(i - 1);
        }
        p = p.op(b'e');
        p = p.op(b'0'); // pop it, it stays reachable through the memo
    }
    p.get(39).stop()
}

#[test]
fn memo_bomb_is_cheap() {
    let p = billion_laughs();
    assert!(matches!(
        quick(|| sd(&p)),
        Err(PickleError::NotAStateDict { found: "a list" })
    ));
    // Expanding it into plain data hits the node budget instead of eating memory.
    assert!(matches!(
        quick(|| parse_plain(&p, &Limits::default())),
        Err(PickleError::LimitExceeded {
            what: "plain nodes",
            ..
        })
    ));
    // The same key object repeated a million times is caught by identity.
    let mut p = P::new().op(b'}').str(&"k".repeat(1 << 16)).put(0);
    p = p
        .tensor("FloatStorage", "0", 1, 0, &[1], &[1])
        .put(1)
        .op(b's');
    for _ in 0..(1 << 20) {
        p = p.get(0).get(1).op(b's');
    }
    assert!(matches!(
        quick(|| sd(&p.stop())),
        Err(PickleError::DuplicateName { .. })
    ));
}

#[test]
fn memo_entry_limit() {
    let mut p = P::new().op(b'N');
    for i in 0..5000u32 {
        p = p.op(b'r').raw(&i.to_le_bytes());
    }
    let p = p.stop();
    let small = Limits {
        max_memo: 1000,
        ..Limits::default()
    };
    assert!(matches!(
        parse_state_dict(&p, PidFlavor::Zip, &small),
        Err(PickleError::LimitExceeded {
            what: "memo entries",
            limit: 1000,
            ..
        })
    ));
}

#[test]
fn mark_and_stack_bombs_hit_limits() {
    let marks = vec![b'('; 1 << 20];
    assert!(matches!(
        quick(|| sd(&marks)),
        Err(PickleError::LimitExceeded {
            what: "open MARKs",
            ..
        })
    ));
    let nones = vec![b'N'; 1 << 20];
    assert!(matches!(
        quick(|| sd(&nones)),
        Err(PickleError::LimitExceeded {
            what: "stack values",
            ..
        })
    ));
    let lists = vec![b']'; Limits::default().max_stack + 10];
    assert!(matches!(
        quick(|| sd(&lists)),
        Err(PickleError::LimitExceeded { .. })
    ));
}

#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    // 4M nested 1-tuples with a constant-size stack: fine to hold, refused as plain data.
    let mut p = vec![b'N'];
    p.extend(std::iter::repeat_n(0x85u8, 4 << 20));
    p.push(b'.');
    assert!(matches!(
        quick(|| sd(&p)),
        Err(PickleError::NotAStateDict { found: "a tuple" })
    ));
    assert!(matches!(
        quick(|| parse_plain(&p, &Limits::default())),
        Err(PickleError::LimitExceeded {
            what: "levels of nesting",
            ..
        })
    ));
    // and a cycle (a list appended to itself) is harmless too
    let p = P::new().op(b']').put(0).get(0).op(b'a').stop();
    assert!(matches!(sd(&p), Err(PickleError::NotAStateDict { .. })));
    assert!(parse_plain(&p, &Limits::default()).is_err());
}

#[test]
fn huge_length_fields_are_truncation_not_allocation() {
    for p in [
        P::new().op(b'X').raw(&u32::MAX.to_le_bytes()).stop(),
        P::new().op(b'B').raw(&u32::MAX.to_le_bytes()).stop(),
        P::new().op(b'T').raw(&i32::MAX.to_le_bytes()).stop(),
        P::new().op(0x8b).raw(&i32::MAX.to_le_bytes()).stop(),
    ] {
        match quick(|| sd(&p)) {
            Err(PickleError::Truncated { needed, .. }) => assert!(needed > 1 << 30),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        sd(&P::new().op(b'T').raw(&(-5i32).to_le_bytes()).stop()),
        Err(PickleError::BadOperand {
            opcode: "BINSTRING",
            ..
        })
    ));
    assert!(matches!(
        sd(&P::new().op(0x8b).raw(&(-1i32).to_le_bytes()).stop()),
        Err(PickleError::BadOperand {
            opcode: "LONG4",
            ..
        })
    ));
}

// ---- persistent ids and tensor geometry ----

#[test]
fn bad_persistent_ids() {
    let pid = |tuple: P| tuple.op(b'Q').stop();
    let module = P::new()
        .mark()
        .str("module")
        .global("torch", "FloatStorage")
        .str("0")
        .str("cpu")
        .int(4)
        .tuple();
    assert!(matches!(
        sd(&pid(module)),
        Err(PickleError::BadPersistentId { .. })
    ));
    let short = P::new()
        .mark()
        .str("storage")
        .global("torch", "FloatStorage")
        .str("0")
        .str("cpu")
        .tuple();
    assert!(matches!(
        sd(&pid(short)),
        Err(PickleError::BadPersistentId { .. })
    ));
    let not_a_class = P::new()
        .mark()
        .str("storage")
        .str("FloatStorage")
        .str("0")
        .str("cpu")
        .int(4)
        .tuple();
    assert!(matches!(
        sd(&pid(not_a_class)),
        Err(PickleError::BadPersistentId { .. })
    ));
    let negative = P::new()
        .mark()
        .str("storage")
        .global("torch", "FloatStorage")
        .str("0")
        .str("cpu")
        .int(-4)
        .tuple();
    assert!(matches!(
        sd(&pid(negative)),
        Err(PickleError::BadPersistentId { .. })
    ));
    let not_tuple = P::new().str("storage");
    assert!(matches!(
        sd(&pid(not_tuple)),
        Err(PickleError::BadPersistentId { .. })
    ));
    // the legacy 6-tuple is refused in a zip pickle and vice versa
    let six = P::new()
        .mark()
        .str("storage")
        .global("torch", "FloatStorage")
        .str("0")
        .str("cpu")
        .int(4)
        .op(b'N')
        .tuple()
        .op(b'Q')
        .stop();
    assert!(matches!(sd(&six), Err(PickleError::BadPersistentId { .. })));
    assert!(matches!(
        parse_state_dict(
            &one_tensor_pickle(4, 0, &[4], &[1]),
            PidFlavor::Legacy,
            &Limits::default()
        ),
        Err(PickleError::BadPersistentId { .. })
    ));
}

#[test]
fn one_storage_key_with_two_sizes_conflicts() {
    let p = P::new()
        .op(b'}')
        .str("a")
        .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
        .op(b's')
        .str("b")
        .tensor("FloatStorage", "0", 8, 0, &[4], &[1])
        .op(b's')
        .stop();
    assert!(matches!(sd(&p), Err(PickleError::StorageConflict { ref key, .. }) if key == "0"));
}

#[test]
fn tensor_geometry_is_checked_against_the_storage() {
    assert_eq!(sd(&one_tensor_pickle(6, 0, &[2, 3], &[3, 1])), Ok(1));
    assert_eq!(sd(&one_tensor_pickle(6, 0, &[3, 2], &[1, 3])), Ok(1)); // transposed
    assert_eq!(sd(&one_tensor_pickle(6, 100, &[0, 3], &[3, 1])), Ok(1)); // empty: unchecked, as torch
    for (numel, offset, shape, stride) in [
        (6, 1, &[2i64, 3][..], &[3i64, 1][..]), // one past the end
        (6, 0, &[2, 4], &[4, 1]),               // too big
        (6, 0, &[2, 3], &[4, 1]),               // strides reach past the end
        (6, 0, &[2, 3], &[3]),                  // rank mismatch
        (6, -1, &[1], &[1]),                    // negative offset
        (6, 0, &[-1], &[1]),                    // negative size
        (6, 0, &[1 << 62, 4], &[4, 1]),         // overflow
        (6, 0, &[2, 2], &[i64::MAX, 1]),        // overflow through the stride
    ] {
        let r = sd(&one_tensor_pickle(numel, offset, shape, stride));
        assert!(
            matches!(
                r,
                Err(PickleError::BadArguments {
                    callable: "torch._utils._rebuild_tensor_v2",
                    ..
                })
            ),
            "{shape:?} {stride:?}: {r:?}"
        );
    }
}

#[test]
fn top_level_shapes_other_than_a_flat_state_dict() {
    assert!(matches!(
        sd(&P::new().op(b']').stop()),
        Err(PickleError::NotAStateDict { found: "a list" })
    ));
    let nested = P::new().op(b'}').str("model").op(b'}').op(b's').stop();
    assert!(
        matches!(sd(&nested), Err(PickleError::NotATensor { ref name, found: "a dict" }) if name == "model")
    );
    let epoch = P::new().op(b'}').str("epoch").int(3).op(b's').stop();
    assert!(matches!(
        sd(&epoch),
        Err(PickleError::NotATensor {
            found: "an int",
            ..
        })
    ));
    let int_key = P::new().op(b'}').int(3).op(b'N').op(b's').stop();
    assert!(matches!(
        sd(&int_key),
        Err(PickleError::NonStringKey {
            index: 0,
            found: "an int"
        })
    ));
    let dup = P::new()
        .op(b'}')
        .str("a")
        .tensor("FloatStorage", "0", 1, 0, &[1], &[1])
        .op(b's')
        .str("a")
        .get(0)
        .op(b's')
        .stop();
    // `get(0)` is memo 0, never stored here: MemoMissing; build a real duplicate instead
    assert!(sd(&dup).is_err());
    let dup = P::new()
        .op(b'}')
        .str("a")
        .tensor("FloatStorage", "0", 1, 0, &[1], &[1])
        .put(9)
        .op(b's')
        .str("a")
        .get(9)
        .op(b's')
        .stop();
    assert!(matches!(sd(&dup), Err(PickleError::DuplicateName { ref name }) if name == "a"));
}

// ---- zip container ----

#[test]
fn compressed_storage_is_refused() {
    match fixture_bin("bad_compressed.bin") {
        Err(TorchBinError::Zip(ZipError::Compressed { name, method: 8 })) => {
            assert_eq!(name, "mixed_zip/data/0")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_storage_is_refused() {
    match fixture_bin("bad_missing_storage.bin") {
        Err(TorchBinError::MissingStorage { key, .. }) => assert_eq!(key, "1"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_record_size_is_refused() {
    match fixture_bin("bad_record_size.bin") {
        Err(TorchBinError::WrongRecordSize {
            key,
            found,
            expected,
        }) => {
            assert_eq!(key, "0");
            assert_eq!(found, expected + 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn model_errors_keep_the_torch_error_and_name_file_and_tensor() {
    use mergestream::{ErrorKind, Model};
    let path = fixture("bad_missing_storage.bin");
    let e = Model::open(&path).unwrap_err();
    assert!(matches!(
        &e.kind,
        ErrorKind::Torch(t) if matches!(**t, TorchBinError::MissingStorage { .. })
    ));
    assert_eq!(e.file.as_deref(), Some(path.as_path()));
    assert_eq!(e.tensor.as_deref(), Some("f16"));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: f16: uses storage \"1\", which the file does not contain",
            path.display()
        )
    );
    let e = Model::open(&fixture("bad_compressed.bin")).unwrap_err();
    assert!(matches!(
        &e.kind,
        ErrorKind::Torch(t) if matches!(**t, TorchBinError::Zip(ZipError::Compressed { .. }))
    ));
    assert_eq!(e.tensor, None);
}

#[test]
fn entries_outside_the_folder_are_refused() {
    assert!(matches!(
        fixture_bin("bad_two_folders.bin"),
        Err(TorchBinError::Zip(ZipError::NotInFolder { .. }))
    ));
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn local_header_disagreeing_with_central_directory() {
    let orig = read("golden/base_bin/pytorch_model-00001-of-00003.bin");
    // rename data/1 in its local header only
    let mut f = orig.clone();
    // the first occurrence of the name is in data/0's local header (the central
    // directory is at the end); "pytorch_model-00001-of-" is 23 bytes, the fixed header 30
    let name_at = find(&f, b"00003/data/0") + 11;
    let at = name_at - 11 - 23 - 30;
    assert_eq!(&f[at..at + 4], b"PK\x03\x04");
    f[name_at] = b'9';
    assert!(matches!(
        bin(f),
        Err(TorchBinError::Zip(ZipError::BadLocalHeader { .. }))
    ));
    // local header says deflate
    let mut f = orig.clone();
    f[at + 8] = 8;
    assert!(matches!(
        bin(f),
        Err(TorchBinError::Zip(ZipError::Compressed { method: 8, .. }))
    ));
    // encrypted flag
    let mut f = orig.clone();
    f[at + 6] |= 1;
    assert!(matches!(
        bin(f),
        Err(TorchBinError::Zip(ZipError::Encrypted { .. }))
    ));
    // data descriptor after data/0 no longer matches
    let mut f = orig.clone();
    let dd = find(&f[at..], b"PK\x07\x08") + at;
    f[dd + 8] ^= 1;
    assert!(matches!(
        bin(f),
        Err(TorchBinError::Zip(ZipError::BadLocalHeader { .. }))
    ));
    // local signature destroyed
    let mut f = orig.clone();
    f[at] = b'X';
    assert!(matches!(
        bin(f),
        Err(TorchBinError::Zip(ZipError::BadLocalHeader { .. }))
    ));
}

#[test]
fn corrupt_data_pkl_fails_crc_and_bad_byteorder_is_refused() {
    let orig = read("golden/base_bin/pytorch_model-00001-of-00003.bin");
    let mut f = orig.clone();
    let at = find(&f, b"model.embed_tokens.weight");
    f[at] = b'M';
    assert!(matches!(
        bin(f),
        Err(TorchBinError::Zip(ZipError::Crc { .. }))
    ));
    let mut f = orig.clone();
    let at = find(&f, b"ZZlittlePK") + 2;
    f[at..at + 6].copy_from_slice(b"middle");
    // the CRC of byteorder is not checked by us (only data.pkl's), so the value is
    // what is refused
    assert!(
        matches!(bin(f), Err(TorchBinError::Zip(ZipError::BadByteorder(ref s))) if s == "middle")
    );
}

#[test]
fn not_a_checkpoint() {
    assert!(matches!(bin(vec![]), Err(TorchBinError::UnknownFormat(_))));
    assert!(matches!(
        bin(b"{\"a\": 1}".to_vec()),
        Err(TorchBinError::UnknownFormat(_))
    ));
    assert!(matches!(
        bin(b"PK\x03\x04".to_vec()),
        Err(TorchBinError::Zip(_))
    ));
    assert!(matches!(
        bin(b"PK\x03\x04garbage garbage garbage".to_vec()),
        Err(TorchBinError::Zip(ZipError::Archive(_)))
    ));
}

// ---- legacy container ----

fn legacy_data_start(f: &[u8]) -> usize {
    // the key-list pickle is the last one: APPENDS then STOP
    find(f, b"e.") + 2
}

#[test]
fn legacy_record_count_mismatch() {
    let mut f = read("golden/other_legacy_bin/pytorch_model-00001-of-00003.bin");
    let at = legacy_data_start(&f);
    f[at] ^= 1;
    match bin(f) {
        Err(TorchBinError::Legacy(LegacyError::WrongRecordSize {
            found, expected, ..
        })) => assert_eq!(found ^ 1, expected as i64),
        other => panic!("{other:?}"),
    }
}

#[test]
fn legacy_trailing_bytes_and_bad_magic() {
    let mut f = read("golden/other_legacy_bin/pytorch_model-00001-of-00003.bin");
    f.extend_from_slice(b"xyz");
    assert!(matches!(
        bin(f),
        Err(TorchBinError::Legacy(LegacyError::TrailingBytes(3)))
    ));
    let mut f = read("golden/other_legacy_bin/pytorch_model-00001-of-00003.bin");
    f[5] ^= 0xff;
    assert!(matches!(
        bin(f),
        Err(TorchBinError::Legacy(LegacyError::BadMagic))
    ));
    let mut f = read("golden/other_legacy_bin/pytorch_model-00001-of-00003.bin");
    f[18] = 0xea; // protocol version 1001 -> 1002
    assert!(matches!(
        bin(f),
        Err(TorchBinError::Legacy(LegacyError::BadProtocolVersion(_)))
    ));
}

#[test]
fn legacy_forbidden_global_in_object_pickle() {
    let mut f = read("golden/other_legacy_bin/pytorch_model-00001-of-00003.bin");
    let at = find(&f, b"torch._utils\n_rebuild_tensor_v2");
    f[at..at + 12].copy_from_slice(b"subprocess\n_");
    match bin(f) {
        Err(TorchBinError::Legacy(LegacyError::Pickle {
            which: "object",
            source: PickleError::ForbiddenGlobal { module, .. },
            ..
        })) => assert_eq!(module, "subprocess"),
        other => panic!("{other:?}"),
    }
}
