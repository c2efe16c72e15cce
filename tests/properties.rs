//! Property tests of the parsers (the CI's stand-in for the cargo-fuzz targets in fuzz/):
//! arbitrary and mutated inputs give Ok or Err, never a panic; what is written parses back.

use proptest::prelude::*;

use mergestream::dtype::DType;
use mergestream::format::index::{is_safe_relative, parse_index};
use mergestream::format::peft::{classify_key, parse_adapter_config};
use mergestream::format::safetensors::{OutEntry, parse_header, write_header};

fn valid_file(tensors: &[(String, DType, Vec<u64>)]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut off = 0;
    for (name, dtype, shape) in tensors {
        let len = shape.iter().product::<u64>() * dtype.bits() / 8;
        entries.push(OutEntry {
            name,
            dtype: *dtype,
            shape,
            begin: off,
            end: off + len,
        });
        off += len;
    }
    let mut bytes = write_header(&entries);
    bytes.extend(std::iter::repeat_n(0xA5u8, off as usize));
    bytes
}

fn tensors() -> impl Strategy<Value = Vec<(String, DType, Vec<u64>)>> {
    let dtype = prop::sample::select(vec![
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::U8,
        DType::I64,
        DType::F8E4M3,
    ]);
    prop::collection::vec(
        (
            "[a-z.0-9_]{1,12}",
            dtype,
            prop::collection::vec(0u64..6, 0..3),
        ),
        0..6,
    )
    .prop_map(|mut v| {
        // names must be unique
        let mut seen = std::collections::HashSet::new();
        v.retain(|(n, _, _)| seen.insert(n.clone()) && n != "__metadata__");
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn header_parser_never_panics_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_header(&data, data.len() as u64);
    }

    #[test]
    fn header_parser_never_panics_with_a_plausible_length(json in "\\PC{0,200}", extra in 0usize..64) {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, extra));
        let _ = parse_header(&v, v.len() as u64);
    }

    #[test]
    fn written_headers_parse_back_exactly(t in tensors()) {
        let bytes = valid_file(&t);
        let h = parse_header(&bytes, bytes.len() as u64).expect("our own output parses");
        prop_assert_eq!(h.tensors.len(), t.len());
        for ((name, dtype, shape), e) in t.iter().zip(&h.tensors) {
            prop_assert_eq!(&e.name, name);
            prop_assert_eq!(e.dtype, *dtype);
            prop_assert_eq!(&e.shape, shape);
        }
        prop_assert_eq!(h.data_start % 8, 0);
    }

    #[test]
    fn mutated_valid_files_never_panic(t in tensors(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let mut bytes = valid_file(&t);
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        let _ = parse_header(&bytes, bytes.len() as u64);
        let n = cut.index(bytes.len() + 1);
        let _ = parse_header(&bytes[..n], n as u64);
        // A wrong file length (the file changed under us) is an error, not a panic.
        let _ = parse_header(&bytes, (bytes.len() as u64).saturating_mul(3));
    }

    #[test]
    fn index_parser_never_panics(text in "\\PC{0,300}") {
        if let Ok(idx) = parse_index(&text) {
            for (_, s) in &idx.weight_map {
                prop_assert!(is_safe_relative(s));
            }
        }
    }

    #[test]
    fn mutated_indexes_never_escape(names in prop::collection::vec(("[a-z.]{1,8}", "[./a-z0-9-]{0,20}"), 1..5)) {
        let map: serde_json::Map<String, serde_json::Value> =
            names.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
        let text = serde_json::json!({"weight_map": map}).to_string();
        if let Ok(idx) = parse_index(&text) {
            for (_, s) in &idx.weight_map {
                prop_assert!(!s.starts_with('/'));
                prop_assert!(!s.split('/').any(|c| c == ".."));
            }
        }
    }

    #[test]
    fn adapter_config_parser_never_panics(text in "\\PC{0,300}") {
        let _ = parse_adapter_config(&text);
        let _ = classify_key(&text);
    }

    #[test]
    fn adapter_config_fields_of_any_type_are_errors_not_panics(
        r in prop::sample::select(vec!["8", "0", "-3", "1.5", "\"8\"", "null", "[]", "1e400"]),
        alpha in prop::sample::select(vec!["16", "\"x\"", "null", "{}", "-1"]),
        pattern in prop::sample::select(vec!["{}", "{\"q\": 2}", "{\"q\": \"2\"}", "[]", "{\"(\": 2}"]),
    ) {
        let text = format!(r#"{{"peft_type":"LORA","r":{r},"lora_alpha":{alpha},"rank_pattern":{pattern}}}"#);
        let _ = parse_adapter_config(&text);
    }
}
