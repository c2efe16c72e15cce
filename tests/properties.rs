//! Property tests of the parsers (the CI's stand-in for the cargo-fuzz targets in fuzz/).
//!
//! Random text dies in serde_json's first bytes, so the generators here write structurally
//! valid JSON carrying hostile values (wrong types; huge, negative and fractional numbers;
//! unknown dtypes; overlapping or reversed offsets; shard paths that leave the folder) to
//! reach our own validation. Every result is Ok or an Err with a message, never a panic;
//! inputs built valid must parse, and what parses must satisfy the parser's promises.

use proptest::prelude::*;

use mergestream::dtype::DType;
use mergestream::format::index::{is_safe_relative, parse_index};
use mergestream::format::peft::{AdapterConfig, AdapterKey, classify_key, parse_adapter_config};
use mergestream::format::safetensors::{Header, OutEntry, byte_size, parse_header, write_header};

// ------------------------------------------------------------------------------ JSON pieces

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// One of `menu`, as text.
fn one_of(menu: &[&'static str]) -> impl Strategy<Value = String> + use<> {
    prop::sample::select(menu.to_vec()).prop_map(str::to_string)
}

/// Numbers and scalars that break naive readers: negative, fractional, beyond u64 and f64,
/// negative zero, exponents, and values of the wrong JSON type.
const HOSTILE_SCALARS: &[&str] = &[
    "0",
    "1",
    "-1",
    "1.5",
    "-0",
    "2.0",
    "1e2",
    "1e400",
    "-1e400",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "100000000000000000000000000000",
    "null",
    "true",
    "false",
    "\"\"",
    "\"4\"",
    "\"F16\"",
];

/// Any JSON value (text), nested up to three levels, with hostile leaves.
fn any_json() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        one_of(HOSTILE_SCALARS),
        "[a-z._/]{0,8}".prop_map(|s| json_str(&s)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z_]{1,6}", inner), 0..4).prop_map(|kv| {
                let fields: Vec<String> = kv
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", json_str(k)))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// An error must say what is wrong.
fn assert_message<E: std::fmt::Display>(e: &E) -> Result<(), TestCaseError> {
    prop_assert!(!e.to_string().trim().is_empty(), "empty error message");
    Ok(())
}

// ------------------------------------------------------------------------ safetensors headers

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

/// One hostile change to a header entry (`at` picks the entry).
#[derive(Clone, Debug)]
enum Edit {
    Dtype(String),
    Shape(String),
    /// data_offsets replaced by this text.
    Offsets(String),
    /// The span moved by this many bytes (overlaps, gaps, data past the end).
    Move(i64),
    /// begin and end moved by these amounts (size mismatches).
    Stretch(i64, i64),
    /// begin and end swapped.
    Reverse,
    /// The whole entry replaced by this value.
    Entry(String),
    /// The entry written a second time under the same name.
    Duplicate,
    /// The entry named `__metadata__`.
    NamedMetadata,
}

fn edit() -> impl Strategy<Value = Edit> {
    let dtypes = &[
        "\"F17\"",
        "\"\"",
        "\"f16\"",
        "\"F16 \"",
        "\"F4\"",
        "\"F6_E2M3\"",
        "3",
        "null",
        "[\"F16\"]",
        "{}",
    ];
    let shapes = &[
        "[-1]",
        "[1.5]",
        "[2.0]",
        "[18446744073709551615, 2]",
        "[4294967296, 4294967296]",
        "[18446744073709551616]",
        "[1e400]",
        "[3]",
        "[0]",
        "[]",
        "[[2]]",
        "\"2\"",
        "null",
        "{}",
    ];
    let offsets = &[
        "[0]",
        "[0, 1, 2]",
        "[]",
        "[-1, 2]",
        "[0.5, 1]",
        "[0, 1e400]",
        "[18446744073709551615, 18446744073709551615]",
        "[0, 18446744073709551615]",
        "\"0,1\"",
        "null",
        "{}",
    ];
    let entries = &[
        "null",
        "[]",
        "3",
        "\"x\"",
        "{}",
        "{\"dtype\":\"F16\"}",
        "{\"dtype\":\"F16\",\"shape\":[1]}",
        "{\"shape\":[1],\"data_offsets\":[0,2]}",
    ];
    prop_oneof![
        one_of(dtypes).prop_map(Edit::Dtype),
        one_of(shapes).prop_map(Edit::Shape),
        one_of(offsets).prop_map(Edit::Offsets),
        (-9i64..=9).prop_map(Edit::Move),
        (-9i64..=9, -9i64..=9).prop_map(|(b, e)| Edit::Stretch(b, e)),
        Just(Edit::Reverse),
        one_of(entries).prop_map(Edit::Entry),
        Just(Edit::Duplicate),
        Just(Edit::NamedMetadata),
    ]
}

/// `__metadata__`: absent, valid, or of the wrong shape.
fn metadata() -> impl Strategy<Value = (Option<String>, bool)> {
    prop_oneof![
        3 => Just((None, true)),
        2 => Just((Some("{\"format\":\"pt\"}".to_string()), true)),
        1 => Just((Some("{}".to_string()), true)),
        1 => one_of(&[
            "{\"a\":1}",
            "{\"a\":{\"b\":\"c\"}}",
            "[]",
            "\"pt\"",
            "null",
            "3"
        ])
        .prop_map(|m| (Some(m), false)),
    ]
}

/// A safetensors file: the valid layout of `t` with `edits` applied, `__metadata__`, and
/// `delta` bytes more (or fewer) data than the header describes. Also whether it is valid.
fn hostile_file(
    t: &[(String, DType, Vec<u64>)],
    edits: &[(prop::sample::Index, Edit)],
    meta: &(Option<String>, bool),
    delta: i64,
) -> (Vec<u8>, bool) {
    let mut fields = Vec::new();
    if let Some(m) = &meta.0 {
        fields.push(format!("\"__metadata__\":{m}"));
    }
    let mut off = 0u64;
    for (i, (name, dtype, shape)) in t.iter().enumerate() {
        let len = byte_size(*dtype, shape).expect("generated shapes are small");
        let (begin, end) = (off, off + len);
        off = end;
        let mut dtype = json_str(dtype.safetensors_name());
        let mut shape = serde_json::to_string(shape).expect("a list of integers");
        let mut offsets = format!("[{begin},{end}]");
        let mut entry = None;
        let mut name = json_str(name);
        let mut duplicate = false;
        for (at, e) in edits {
            if at.index(t.len()) != i {
                continue;
            }
            match e {
                Edit::Dtype(d) => dtype = d.clone(),
                Edit::Shape(s) => shape = s.clone(),
                Edit::Offsets(o) => offsets = o.clone(),
                Edit::Move(d) => {
                    offsets = format!("[{},{}]", begin as i64 + d, end as i64 + d);
                }
                Edit::Stretch(db, de) => {
                    offsets = format!("[{},{}]", begin as i64 + db, end as i64 + de);
                }
                Edit::Reverse => offsets = format!("[{end},{begin}]"),
                Edit::Entry(v) => entry = Some(v.clone()),
                Edit::Duplicate => duplicate = true,
                Edit::NamedMetadata => name = json_str("__metadata__"),
            }
        }
        let entry = entry.unwrap_or_else(|| {
            format!("{{\"dtype\":{dtype},\"shape\":{shape},\"data_offsets\":{offsets}}}")
        });
        fields.push(format!("{name}:{entry}"));
        if duplicate {
            fields.push(format!("{name}:{entry}"));
        }
    }
    let json = format!("{{{}}}", fields.join(","));
    let data_len = (off as i64 + delta).max(0) as usize;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend(std::iter::repeat_n(0x5Au8, data_len));
    let valid = (edits.is_empty() || t.is_empty()) && meta.1 && data_len as u64 == off;
    (bytes, valid)
}

/// What `parse_header` promises of a header it accepts.
fn check_accepted(h: &Header, file_len: u64) -> Result<(), TestCaseError> {
    let data_len = file_len - h.data_start;
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for e in &h.tensors {
        prop_assert!(
            e.begin <= e.end && e.end <= data_len,
            "{e:?} outside the data"
        );
        prop_assert_eq!(byte_size(e.dtype, &e.shape).ok(), Some(e.end - e.begin));
        spans.push((e.begin, e.end));
    }
    // Sorted by offset, the tensors tile the data buffer exactly.
    spans.sort();
    let mut at = 0;
    for (b, e) in spans {
        prop_assert_eq!(b, at, "gap or overlap");
        at = e;
    }
    prop_assert_eq!(at, data_len, "trailing bytes");
    Ok(())
}

// ------------------------------------------------------------------------------ shard indexes

/// Shard names that stay inside the model folder.
const SAFE_SHARDS: &[&str] = &[
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "pytorch_model.bin",
    "sub/dir/shard.bin",
    "a..b.safetensors",
];

/// weight_map values that must be refused: paths leaving the folder and non-strings.
const HOSTILE_SHARDS: &[&str] = &[
    "\"../model.safetensors\"",
    "\"/etc/passwd\"",
    "\"//server/share\"",
    "\"a/../../b\"",
    "\"a/..\"",
    "\"..\"",
    "\".\"",
    "\"./a\"",
    "\"\"",
    "\"a\\\\b\"",
    "\"..\\\\x\"",
    "\"a\\u0000b\"",
    "1",
    "null",
    "[]",
    "{}",
    "true",
];

/// One weight_map entry: a tensor name and its shard (JSON text), and whether it is valid.
fn index_entry() -> impl Strategy<Value = (String, String, bool)> {
    let name = "[a-z.0-9]{1,10}";
    prop_oneof![
        3 => (name, prop::sample::select(SAFE_SHARDS)).prop_map(|(n, s)| (n, json_str(s), true)),
        1 => (name, prop::sample::select(HOSTILE_SHARDS)).prop_map(|(n, s)| (n, s.to_string(), false)),
    ]
}

// ----------------------------------------------------------------------- adapter configs

/// One field of an adapter config: its text (`None`: left out), and the value it must be
/// read as, or `None` if the parser must refuse it.
#[derive(Clone, Debug)]
struct Pick<T> {
    text: Option<&'static str>,
    want: Option<T>,
}

fn pick<T: Clone + std::fmt::Debug + 'static>(
    valid: Vec<(Option<&'static str>, T)>,
    invalid: Vec<Option<&'static str>>,
) -> impl Strategy<Value = Pick<T>> {
    let all: Vec<Pick<T>> = valid
        .into_iter()
        .map(|(text, v)| Pick {
            text,
            want: Some(v),
        })
        .chain(invalid.into_iter().map(|text| Pick { text, want: None }))
        .collect();
    prop::sample::select(all)
}

fn flag() -> impl Strategy<Value = Pick<bool>> {
    pick(
        vec![
            (Some("true"), true),
            (Some("false"), false),
            (Some("null"), false),
            (None, false),
        ],
        vec![Some("1"), Some("\"yes\""), Some("[]")],
    )
}

/// The key PEFT would write and the value, and whether mergestream must refuse it.
const UNSUPPORTED_SETTINGS: &[(&str, &str, bool)] = &[
    ("use_qalora", "false", true),
    ("lora_bias", "null", true),
    ("layer_replication", "[]", true),
    ("use_qalora", "true", false),
    ("lora_bias", "\"all\"", false),
    ("layer_replication", "[[0,4]]", false),
    ("target_parameters", "[\"experts\"]", false),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn header_parser_checks_hostile_headers(
        t in tensors(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), edit()), 0..3),
        meta in metadata(),
        delta in prop::sample::select(vec![0i64, 0, 0, 0, 1, -1, 7, -8]),
    ) {
        let (bytes, valid) = hostile_file(&t, &edits, &meta, delta);
        match parse_header(&bytes, bytes.len() as u64) {
            Ok(h) => check_accepted(&h, bytes.len() as u64)?,
            Err(e) => {
                prop_assert!(!valid, "valid header refused: {e}");
                assert_message(&e)?;
            }
        }
    }

    #[test]
    fn header_parser_never_panics_on_any_json_values(
        entries in prop::collection::vec(("[a-z_]{1,6}", any_json()), 0..4),
        extra in 0usize..64,
    ) {
        let fields: Vec<String> =
            entries.iter().map(|(k, v)| format!("{}:{v}", json_str(k))).collect();
        let json = format!("{{{}}}", fields.join(","));
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, extra));
        match parse_header(&bytes, bytes.len() as u64) {
            Ok(h) => check_accepted(&h, bytes.len() as u64)?,
            Err(e) => assert_message(&e)?,
        }
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
        let n = cut.index(bytes.len() + 1);
        // A wrong file length (the file changed under us) is an error, not a panic.
        let tripled = (bytes.len() as u64).saturating_mul(3);
        for (data, len) in [(&bytes[..], bytes.len() as u64), (&bytes[..n], n as u64), (&bytes[..], tripled)] {
            match parse_header(data, len) {
                Ok(h) => check_accepted(&h, len)?,
                Err(e) => assert_message(&e)?,
            }
        }
    }

    #[test]
    fn index_parser_accepts_exactly_the_safe_indexes(
        entries in prop::collection::vec(index_entry(), 0..6),
        duplicate in prop::option::weighted(0.1, any::<prop::sample::Index>()),
        metadata in any_json(),
        weight_map in prop_oneof![
            4 => Just(None),
            1 => one_of(&["[]", "null", "\"model.safetensors\"", "3", "[{\"a\":\"b\"}]"]).prop_map(Some),
        ],
        missing in prop::bool::weighted(0.05),
    ) {
        let mut entries = entries;
        // names must be unique unless a duplicate is wanted
        let mut seen = std::collections::HashSet::new();
        entries.retain(|(n, _, _)| seen.insert(n.clone()));
        if let Some(d) = duplicate.filter(|_| !entries.is_empty()) {
            let again = entries[d.index(entries.len())].clone();
            entries.push(again);
        }
        let map_text = weight_map.clone().unwrap_or_else(|| {
            let fields: Vec<String> =
                entries.iter().map(|(n, s, _)| format!("{}:{s}", json_str(n))).collect();
            format!("{{{}}}", fields.join(","))
        });
        let text = if missing {
            format!("{{\"metadata\":{metadata}}}")
        } else {
            format!("{{\"metadata\":{metadata},\"weight_map\":{map_text}}}")
        };
        let valid = !missing
            && weight_map.is_none()
            && !entries.is_empty()
            && entries.iter().all(|(_, _, ok)| *ok)
            && duplicate.is_none();
        match parse_index(&text) {
            Ok(idx) => {
                prop_assert!(valid, "hostile index accepted: {text}");
                let want: Vec<(String, String)> = entries
                    .iter()
                    .map(|(n, s, _)| (n.clone(), serde_json::from_str(s).expect("a JSON string")))
                    .collect();
                prop_assert_eq!(&idx.weight_map, &want);
                for (_, s) in &idx.weight_map {
                    prop_assert!(is_safe_relative(s));
                }
            }
            Err(e) => {
                prop_assert!(!valid, "valid index refused: {e}\n{text}");
                assert_message(&e)?;
            }
        }
    }

    #[test]
    fn mutated_indexes_never_escape(names in prop::collection::vec(("[a-z.]{1,8}", "[./a-z0-9-]{0,20}"), 1..5)) {
        let map: serde_json::Map<String, serde_json::Value> =
            names.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
        let text = serde_json::json!({"weight_map": map}).to_string();
        match parse_index(&text) {
            Ok(idx) => {
                for (_, s) in &idx.weight_map {
                    prop_assert!(!s.starts_with('/'));
                    prop_assert!(!s.split('/').any(|c| c == ".."));
                }
            }
            Err(e) => assert_message(&e)?,
        }
    }

    #[test]
    fn adapter_config_parser_never_panics_on_any_json_values(
        fields in prop::collection::vec(
            (
                prop_oneof![
                    prop::sample::select(vec![
                        "peft_type", "r", "lora_alpha", "use_rslora", "use_dora",
                        "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                        "layer_replication", "lora_bias", "target_parameters",
                    ]).prop_map(str::to_string),
                    "[a-z_]{1,8}",
                ],
                any_json(),
            ),
            0..8,
        ),
        lora in any::<bool>(),
    ) {
        let mut parts: Vec<String> =
            fields.iter().map(|(k, v)| format!("{}:{v}", json_str(k))).collect();
        if lora {
            parts.insert(0, "\"peft_type\":\"LORA\",\"r\":8".to_string());
        }
        match parse_adapter_config(&format!("{{{}}}", parts.join(","))) {
            Ok(c) => prop_assert!(c.r > 0 && c.lora_alpha.is_finite()),
            Err(e) => assert_message(&e)?,
        }
    }

    /// Each field is either of the right type, and then read back, or of a wrong one, and
    /// then the error names it (or another wrong field: the parser stops at the first).
    #[test]
    fn adapter_config_fields_are_read_back_or_named_in_the_error(
        peft_type in pick(
            vec![(Some("\"LORA\""), ()), (Some("\"lora\""), ())],
            vec![Some("\"IA3\""), Some("1"), Some("null"), Some("[]"), None],
        ),
        r in pick(
            vec![(Some("8"), 8u64), (Some("1"), 1), (Some("18446744073709551615"), u64::MAX)],
            vec![Some("0"), Some("-3"), Some("1.5"), Some("\"8\""), Some("null"), Some("[]"),
                 Some("1e400"), Some("true"), None],
        ),
        alpha in pick(
            vec![(Some("16"), 16.0f64), (Some("-1"), -1.0), (Some("0.5"), 0.5),
                 (Some("null"), 8.0), (None, 8.0)],
            vec![Some("\"x\""), Some("{}"), Some("1e400"), Some("true"), Some("[]")],
        ),
        (rslora, dora, fifo) in (flag(), flag(), flag()),
        rank_pattern in pick(
            vec![(Some("{}"), vec![]), (None, vec![]),
                 (Some("{\"q_proj\": 4, \"v\": 2}"), vec![("q_proj".into(), 4u64), ("v".into(), 2)])],
            vec![Some("[]"), Some("{\"q\": 0}"), Some("{\"q\": \"2\"}"), Some("3"), Some("{\"q\": 1.5}")],
        ),
        alpha_pattern in pick(
            vec![(Some("{}"), vec![]), (Some("{\"v_proj\": 32}"), vec![("v_proj".into(), 32.0f64)])],
            vec![Some("{\"v\": \"x\"}"), Some("[]"), Some("{\"v\": null}")],
        ),
        modules in pick(
            vec![(Some("[\"lm_head\"]"), vec!["lm_head".to_string()]), (Some("null"), vec![]),
                 (Some("[]"), vec![])],
            vec![Some("[1]"), Some("\"lm_head\""), Some("{}")],
        ),
        unsupported in prop::sample::select(UNSUPPORTED_SETTINGS),
    ) {
        let mut parts = Vec::new();
        let mut wrong: Vec<String> = Vec::new();
        let mut field = |key: &str, text: Option<&str>, ok: bool, label: String| {
            if let Some(t) = text {
                parts.push(format!("\"{key}\":{t}"));
            }
            if !ok {
                wrong.push(label);
            }
        };
        field("peft_type", peft_type.text, peft_type.want.is_some(), "peft_type".into());
        field("r", r.text, r.want.is_some(), "`r`".into());
        field("lora_alpha", alpha.text, alpha.want.is_some(), "`lora_alpha`".into());
        for (key, f) in [("use_rslora", &rslora), ("use_dora", &dora), ("fan_in_fan_out", &fifo)] {
            field(key, f.text, f.want.is_some(), format!("`{key}`"));
        }
        field("rank_pattern", rank_pattern.text, rank_pattern.want.is_some(), "`rank_pattern".into());
        field("alpha_pattern", alpha_pattern.text, alpha_pattern.want.is_some(), "`alpha_pattern".into());
        field("modules_to_save", modules.text, modules.want.is_some(), "`modules_to_save`".into());
        let (key, value, allowed) = unsupported;
        field(key, Some(value), allowed, format!("`{key}`"));
        let text = format!("{{{}}}", parts.join(","));

        match parse_adapter_config(&text) {
            Ok(c) => {
                prop_assert!(wrong.is_empty(), "accepted with wrong {wrong:?}: {text}");
                let want = AdapterConfig {
                    r: r.want.unwrap_or_default(),
                    lora_alpha: alpha.want.unwrap_or_default(),
                    use_rslora: rslora.want.unwrap_or_default(),
                    use_dora: dora.want.unwrap_or_default(),
                    fan_in_fan_out: fifo.want.unwrap_or_default(),
                    rank_pattern: rank_pattern.want.unwrap_or_default(),
                    alpha_pattern: alpha_pattern.want.unwrap_or_default(),
                    modules_to_save: modules.want.unwrap_or_default(),
                };
                prop_assert_eq!(c, want);
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    wrong.iter().any(|w| msg.contains(w.as_str())),
                    "error `{msg}` names none of the wrong fields {wrong:?}: {text}"
                );
            }
        }
    }

    #[test]
    fn adapter_keys_name_their_module(
        module in "[a-z]{1,5}(\\.[a-z0-9_]{1,5}){0,3}",
        prefixed in any::<bool>(),
        suffix in 0usize..7,
    ) {
        let key = |s: &str| {
            let prefix = if prefixed { "base_model.model." } else { "" };
            format!("{prefix}{module}{s}")
        };
        let m = module.clone();
        let (k, want) = match suffix {
            0 => (key(".lora_A.weight"), AdapterKey::LinearA(m)),
            1 => (key(".lora_B.weight"), AdapterKey::LinearB(m)),
            2 => (key(".lora_embedding_A"), AdapterKey::EmbeddingA(m)),
            3 => (key(".lora_embedding_B"), AdapterKey::EmbeddingB(m)),
            4 => (key(".lora_magnitude_vector"), AdapterKey::Magnitude(m)),
            5 => (key(".base_layer.weight"), AdapterKey::Replacement(format!("{m}.weight"))),
            _ => (key(".modules_to_save.default.weight"), AdapterKey::Replacement(format!("{m}.weight"))),
        };
        prop_assert_eq!(classify_key(&k), want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The resume journal (fuzzed as `fuzz/journal`): a journal of recorded steps followed by
    /// any tail reads back exactly the recorded steps (first occurrence each), plus whatever
    /// of the tail is itself well formed; arbitrary bytes never panic.
    #[test]
    fn journal_reads_back_what_was_recorded(
        steps in 1usize..50,
        recorded in prop::collection::vec(0usize..50, 0..40),
        tail in prop::collection::vec(any::<u8>(), 0..40),
        noise in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        use mergestream::pipeline::journal::parse;
        let recorded: Vec<usize> = recorded.into_iter().map(|s| s % steps).collect();
        let mut bytes = format!("mergestream resume journal 1\nplan abc\nsteps {steps}\n").into_bytes();
        for s in &recorded {
            bytes.extend_from_slice(format!("done {s}\n").as_bytes());
        }
        let prefix = bytes.len();
        bytes.extend_from_slice(&tail);
        let (done, valid) = parse(&bytes, "abc", steps).expect("header is this plan's");
        prop_assert!(valid >= prefix && valid <= bytes.len());
        let mut want = Vec::new();
        for s in recorded {
            if !want.contains(&s) {
                want.push(s);
            }
        }
        prop_assert_eq!(&done[..want.len()], &want[..]);
        prop_assert!(parse(&bytes, "abd", steps).is_none());
        let _ = parse(&noise, "abc", steps);
    }
}

// --------------------------------------------------------------------------------- tokenizers

/// A `tokenizer.json` skeleton with hostile values where the parser looks: the model type,
/// the vocabulary (an object, a Unigram list, anything), ids, added tokens and their flags.
fn hostile_tokenizer_json() -> impl Strategy<Value = String> {
    let id = prop_oneof![
        one_of(HOSTILE_SCALARS),
        (0u32..12).prop_map(|i| i.to_string())
    ];
    let vocab = prop_oneof![
        prop::collection::vec(("[a-c<>/]{1,3}", id.clone()), 0..8).prop_map(|kv| {
            let f: Vec<String> = kv
                .iter()
                .map(|(k, v)| format!("{}:{v}", json_str(k)))
                .collect();
            format!("{{{}}}", f.join(","))
        }),
        prop::collection::vec(("[a-c]{1,3}", any_json()), 0..6).prop_map(|v| {
            let f: Vec<String> = v
                .iter()
                .map(|(p, s)| format!("[{},{s}]", json_str(p)))
                .collect();
            format!("[{}]", f.join(","))
        }),
        any_json(),
    ];
    let flag = prop_oneof![one_of(&["true", "false"]), one_of(HOSTILE_SCALARS)];
    let added = prop::collection::vec(
        (id, "[a-c<>]{0,3}", flag.clone(), flag).prop_map(|(id, c, s, n)| {
            format!(
                "{{\"id\":{id},\"content\":{},\"special\":{s},\"normalized\":{n}}}",
                json_str(&c)
            )
        }),
        0..5,
    )
    .prop_map(|v| format!("[{}]", v.join(",")));
    let merges = prop_oneof![
        Just("[\"a b\",\"ab c\"]".to_string()),
        Just("[[\"a\",\"b\"]]".to_string()),
        any_json()
    ];
    (
        one_of(&["\"BPE\"", "\"Unigram\"", "\"WordPiece\"", "null", "3"]),
        vocab,
        prop_oneof![added, any_json()],
        merges,
    )
        .prop_map(|(t, v, a, m)| {
            format!(
                "{{\"added_tokens\":{a},\"model\":{{\"type\":{t},\"vocab\":{v},\"merges\":{m}}}}}"
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The tokenizer file parsers on hostile JSON and on arbitrary bytes: Ok or an error
    /// with a message, never a panic; what parses survives add/strip/write and reads back.
    #[test]
    fn tokenizer_parsers_never_panic(
        text in hostile_tokenizer_json(),
        cfg in any_json(),
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        add in "[a-d<>]{1,3}",
        keep in 0usize..12,
    ) {
        use mergestream::tokenizer::files::{AddedToken, parse_tokenizer_config, parse_tokenizer_json};
        let _ = parse_tokenizer_json(&bytes);
        let _ = parse_tokenizer_config(&bytes);
        match parse_tokenizer_config(format!("{{\"added_tokens_decoder\":{cfg},\"bos_token\":{cfg}}}").as_bytes()) {
            Ok(c) => { let _ = c.to_bytes(&[]); }
            Err(e) => assert_message(&e)?,
        }
        match parse_tokenizer_json(text.as_bytes()) {
            Err(e) => assert_message(&e)?,
            Ok(mut t) => {
                t.add_token(&AddedToken::plain(&add));
                prop_assert!(t.token_to_id(&add).is_some());
                if let Err(e) = t.strip(keep) {
                    assert_message(&e)?;
                } else {
                    prop_assert!(t.vocab().values().all(|&i| (i as usize) < keep));
                }
                let back = parse_tokenizer_json(&t.to_bytes());
                prop_assert!(back.is_ok(), "written tokenizer.json does not parse: {:?}", back.err());
                prop_assert_eq!(back.map(|b| b.added).unwrap_or_default(), t.added);
            }
        }
    }
}
