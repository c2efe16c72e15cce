//! Pickle features no torch fixture covers: legacy storage views, protocol-0 text opcodes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::torch_common as common;

use common::P;
use mergestream::dtype::DType;
use mergestream::format::pickle::{
    Limits, PickleError, PidFlavor, Plain, parse_plain, parse_state_dict,
};

/// `{"w": _rebuild_tensor_v2(legacy pid with view (vkey, view_off, view_len) of a 8-float root, 0, shape, (1,))}`
fn legacy_view(view_off: i32, view_len: i32, len: i64) -> Vec<u8> {
    P::new()
        .op(b'}')
        .str("w")
        .global("torch._utils", "_rebuild_tensor_v2")
        .mark()
        .mark()
        .str("storage")
        .global("torch", "FloatStorage")
        .str("root")
        .str("cpu")
        .int(8)
        .mark()
        .str("view")
        .int(view_off)
        .int(view_len)
        .tuple()
        .tuple()
        .op(b'Q')
        .int(0)
        .ints(&[len])
        .ints(&[1])
        .op(0x89)
        .op(b'}')
        .tuple()
        .op(b'R')
        .op(b's')
        .stop()
}

#[test]
fn legacy_storage_views_fold_into_the_offset() {
    let (sd, _) =
        parse_state_dict(&legacy_view(2, 4, 4), PidFlavor::Legacy, &Limits::default()).unwrap();
    let t = &sd.tensors[0].1;
    assert_eq!(
        (&*t.storage_key, t.storage_offset, t.storage_numel, t.dtype),
        ("root", 2, 8, DType::F32)
    );
    assert_eq!(t.storage_byte_span().unwrap(), (8, 24));
    // longer than the view (though it would fit the root): refused
    assert!(matches!(
        parse_state_dict(&legacy_view(2, 4, 5), PidFlavor::Legacy, &Limits::default()),
        Err(PickleError::BadArguments { .. })
    ));
    // a view past the root
    assert!(matches!(
        parse_state_dict(&legacy_view(6, 4, 1), PidFlavor::Legacy, &Limits::default()),
        Err(PickleError::BadPersistentId { .. })
    ));
}

#[test]
fn protocol_0_text_opcodes() {
    // a protocol-0 dict: DICT, PUT, STRING with escapes, INT bool, UNICODE, LONG, FLOAT
    let p = b"(dp0\nS'a\\x41'\np1\nI01\nsV\\u00e9\nL5L\nsS'f'\nF1.5\nsg1\nI2\ns.";
    let (v, used) = parse_plain(p, &Limits::default()).unwrap();
    assert_eq!(used, p.len());
    let Plain::Dict(pairs) = v else {
        panic!("{v:?}")
    };
    assert_eq!(pairs[0], (Plain::Str("aA".into()), Plain::Bool(true)));
    assert_eq!(pairs[1], (Plain::Str("\u{e9}".into()), Plain::Int(5)));
    assert_eq!(pairs[2], (Plain::Str("f".into()), Plain::Float(1.5)));
    // GET of the memoized key
    assert_eq!(pairs[3], (Plain::Str("aA".into()), Plain::Int(2)));
    // a dict containing itself is fine to hold, and refused when expanded as plain data
    let cyclic = b"(dp0\nS'k'\ng0\ns.";
    assert!(matches!(
        parse_plain(cyclic, &Limits::default()),
        Err(PickleError::LimitExceeded {
            what: "levels of nesting",
            ..
        })
    ));
}

#[test]
fn consumed_length_allows_back_to_back_pickles() {
    let mut two = P::new().int(7).stop();
    two.extend(P::new().str("x").stop());
    let (a, n) = parse_plain(&two, &Limits::default()).unwrap();
    assert_eq!(a, Plain::Int(7));
    let (b, _) = parse_plain(&two[n..], &Limits::default()).unwrap();
    assert_eq!(b, Plain::Str("x".into()));
}
