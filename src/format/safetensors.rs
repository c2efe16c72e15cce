//! safetensors: a pure parser of the header and a writer of headers.
//!
//! Layout: 8-byte little-endian header length `n`, `n` bytes of UTF-8 JSON, then the data
//! buffer. [`parse_header`] is a pure function of the file's first bytes and its length; it
//! checks every rule of DESIGN §4 with checked arithmetic and returns a specific
//! [`HeaderError`] for each violated one. It never trusts a length field: nothing is
//! allocated beyond the header bytes it is given.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::dtype::DType;

/// Headers larger than this are refused (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor entry, offsets relative to the start of the data buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

/// A validated header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// Entries in the order the JSON lists them.
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__`, when present.
    pub metadata: Option<Vec<(String, String)>>,
    /// Absolute file offset of the data buffer (8 + n).
    pub data_start: u64,
}

/// A violated rule, with the tensor it concerns when there is one.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{kind}")]
pub struct HeaderError {
    pub tensor: Option<String>,
    pub kind: HeaderErrorKind,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum HeaderErrorKind {
    #[error("file is {0} bytes long, too short for the 8-byte header length")]
    TooShort(u64),
    #[error("header length {0} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    HeaderTooLarge(u64),
    #[error("header length {len} runs past the end of the file ({file_len} bytes)")]
    HeaderPastEnd { len: u64, file_len: u64 },
    #[error("header is not valid UTF-8 (at byte {0} of the header)")]
    NotUtf8(usize),
    #[error("header is not valid JSON: {0}")]
    Json(String),
    #[error("header is not a JSON object")]
    NotObject,
    #[error("tensor name appears twice in the header")]
    Duplicate,
    #[error("__metadata__ must be an object whose values are strings ({0})")]
    BadMetadata(String),
    #[error("entry is not an object with dtype, shape and data_offsets ({0})")]
    BadEntry(String),
    #[error("unknown dtype `{0}`")]
    UnknownDtype(String),
    #[error("shape is not a list of non-negative integers ({0})")]
    BadShape(String),
    #[error("shape {shape:?} of {dtype} is too large (element count or byte size overflows)")]
    ShapeOverflow { shape: Vec<u64>, dtype: DType },
    #[error("shape {shape:?} of {dtype} is not a whole number of bytes")]
    FractionalBytes { shape: Vec<u64>, dtype: DType },
    #[error("data_offsets must be two non-negative integers ({0})")]
    BadOffsets(String),
    #[error("data_offsets [{begin}, {end}] are reversed")]
    ReversedOffsets { begin: u64, end: u64 },
    #[error("shape {shape:?} of {dtype} needs {expected} bytes but data_offsets span {actual}")]
    SizeMismatch {
        shape: Vec<u64>,
        dtype: DType,
        expected: u64,
        actual: u64,
    },
    #[error("data does not start at offset 0 (first tensor begins at {0})")]
    NotStartingAtZero(u64),
    #[error("gap in the data buffer: bytes {prev_end}..{begin} belong to no tensor")]
    Gap { prev_end: u64, begin: u64 },
    #[error(
        "data overlaps the previous tensor `{other}` (begins at {begin}, previous ends at {prev_end})"
    )]
    Overlap {
        other: String,
        begin: u64,
        prev_end: u64,
    },
    #[error("data_offsets end at {end}, past the end of the data buffer ({data_len} bytes)")]
    PastEnd { end: u64, data_len: u64 },
    #[error("{0} trailing bytes after the last tensor")]
    TrailingBytes(u64),
}

fn err(kind: HeaderErrorKind) -> HeaderError {
    HeaderError { tensor: None, kind }
}

fn tensor_err(name: &str, kind: HeaderErrorKind) -> HeaderError {
    HeaderError {
        tensor: Some(name.to_string()),
        kind,
    }
}

/// Read the header length from the first 8 bytes and check it against the file length.
/// Returns `n`, the JSON length. Callers read `8 + n` bytes and pass them to
/// [`parse_header`].
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<u64, HeaderError> {
    let first: [u8; 8] = match prefix.get(..8).and_then(|b| b.try_into().ok()) {
        Some(b) if file_len >= 8 => b,
        _ => return Err(err(HeaderErrorKind::TooShort(file_len))),
    };
    let n = u64::from_le_bytes(first);
    if n > MAX_HEADER_LEN {
        return Err(err(HeaderErrorKind::HeaderTooLarge(n)));
    }
    match n.checked_add(8) {
        Some(end) if end <= file_len => Ok(n),
        _ => Err(err(HeaderErrorKind::HeaderPastEnd { len: n, file_len })),
    }
}

/// Parse and validate a header.
///
/// `bytes` must hold at least the first `8 + n` bytes of the file (more is fine: a whole
/// file may be passed); `file_len` is the length of the whole file.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    let n = header_len(bytes, file_len)?;
    let data_start = 8 + n; // no overflow: n <= MAX_HEADER_LEN
    let json = bytes
        .get(8..data_start as usize)
        .ok_or_else(|| err(HeaderErrorKind::HeaderPastEnd { len: n, file_len }))?;
    let text =
        std::str::from_utf8(json).map_err(|e| err(HeaderErrorKind::NotUtf8(e.valid_up_to())))?;
    let raw = parse_raw_object(text)?;

    let data_len = file_len - data_start;
    let mut seen = HashSet::with_capacity(raw.len());
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if !seen.insert(name.clone()) {
            return Err(tensor_err(&name, HeaderErrorKind::Duplicate));
        }
        if name == "__metadata__" {
            metadata = Some(parse_metadata(value)?);
            continue;
        }
        let entry = parse_entry(&name, value)?;
        if entry.end > data_len {
            return Err(tensor_err(
                &name,
                HeaderErrorKind::PastEnd {
                    end: entry.end,
                    data_len,
                },
            ));
        }
        tensors.push(entry);
    }
    check_tiling(&tensors, data_len)?;
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

/// The header's top-level object as (key, value) pairs in order, duplicates kept so that
/// they can be reported (a JSON map would silently keep the last one).
fn parse_raw_object(text: &str) -> Result<Vec<(String, Value)>, HeaderError> {
    struct Entries(Vec<(String, Value)>);
    impl<'de> serde::Deserialize<'de> for Entries {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(EntriesVisitor)
        }
    }
    struct EntriesVisitor;
    impl<'de> Visitor<'de> for EntriesVisitor {
        type Value = Entries;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
            let mut out = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                let value = map.next_value::<Value>()?;
                out.push((key, value));
            }
            Ok(Entries(out))
        }
    }
    if !text.trim_start().starts_with('{') {
        return Err(err(HeaderErrorKind::NotObject));
    }
    match serde_json::from_str::<Entries>(text) {
        Ok(e) => Ok(e.0),
        Err(e) => Err(err(HeaderErrorKind::Json(e.to_string()))),
    }
}

fn parse_metadata(value: Value) -> Result<Vec<(String, String)>, HeaderError> {
    let Value::Object(map) = value else {
        return Err(err(HeaderErrorKind::BadMetadata(format!(
            "found {}",
            kind_of(&value)
        ))));
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        match v {
            Value::String(s) => out.push((k, s)),
            other => {
                return Err(err(HeaderErrorKind::BadMetadata(format!(
                    "`{k}` is {}",
                    kind_of(&other)
                ))));
            }
        }
    }
    Ok(out)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON number as a non-negative integer, with a message naming what it is otherwise.
fn as_index(v: &Value) -> Result<u64, String> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Ok(u)
            } else if let Some(i) = n.as_i64() {
                Err(format!("{i} is negative"))
            } else if let Some(f) = n.as_f64() {
                if f.fract() != 0.0 {
                    Err(format!("{n} is not an integer"))
                } else if f < 0.0 {
                    Err(format!("{n} is negative"))
                } else {
                    Err(format!("{n} is too large"))
                }
            } else {
                Err(format!("{n} is not an integer"))
            }
        }
        other => Err(format!("found {}", kind_of(other))),
    }
}

fn parse_entry(name: &str, value: Value) -> Result<TensorEntry, HeaderError> {
    let e = |kind| tensor_err(name, kind);
    let Value::Object(map) = value else {
        return Err(e(HeaderErrorKind::BadEntry(format!(
            "found {}",
            kind_of(&value)
        ))));
    };
    let dtype = match map.get("dtype") {
        Some(Value::String(s)) => {
            DType::from_safetensors(s).ok_or_else(|| e(HeaderErrorKind::UnknownDtype(s.clone())))?
        }
        Some(other) => {
            return Err(e(HeaderErrorKind::BadEntry(format!(
                "dtype is {}",
                kind_of(other)
            ))));
        }
        None => return Err(e(HeaderErrorKind::BadEntry("no dtype".into()))),
    };
    let shape = match map.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(as_index)
            .collect::<Result<Vec<u64>, String>>()
            .map_err(|m| e(HeaderErrorKind::BadShape(m)))?,
        Some(other) => {
            return Err(e(HeaderErrorKind::BadShape(format!(
                "found {}",
                kind_of(other)
            ))));
        }
        None => return Err(e(HeaderErrorKind::BadEntry("no shape".into()))),
    };
    let (begin, end) = match map.get("data_offsets") {
        Some(Value::Array(o)) if o.len() == 2 => {
            let b = as_index(&o[0]).map_err(|m| e(HeaderErrorKind::BadOffsets(m)))?;
            let en = as_index(&o[1]).map_err(|m| e(HeaderErrorKind::BadOffsets(m)))?;
            (b, en)
        }
        Some(Value::Array(o)) => {
            return Err(e(HeaderErrorKind::BadOffsets(format!(
                "found {} values",
                o.len()
            ))));
        }
        Some(other) => {
            return Err(e(HeaderErrorKind::BadOffsets(format!(
                "found {}",
                kind_of(other)
            ))));
        }
        None => return Err(e(HeaderErrorKind::BadEntry("no data_offsets".into()))),
    };
    if begin > end {
        return Err(e(HeaderErrorKind::ReversedOffsets { begin, end }));
    }
    let expected = byte_size(dtype, &shape).map_err(e)?;
    if expected != end - begin {
        return Err(e(HeaderErrorKind::SizeMismatch {
            shape,
            dtype,
            expected,
            actual: end - begin,
        }));
    }
    Ok(TensorEntry {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// Bytes needed by `shape` elements of `dtype`, refusing overflow and fractional bytes.
pub fn byte_size(dtype: DType, shape: &[u64]) -> Result<u64, HeaderErrorKind> {
    let overflow = || HeaderErrorKind::ShapeOverflow {
        shape: shape.to_vec(),
        dtype,
    };
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    let bits = numel.checked_mul(dtype.bits()).ok_or_else(overflow)?;
    if !bits.is_multiple_of(8) {
        return Err(HeaderErrorKind::FractionalBytes {
            shape: shape.to_vec(),
            dtype,
        });
    }
    Ok(bits / 8)
}

/// Sorted by offset, the tensors must start at 0 and tile the buffer exactly.
fn check_tiling(tensors: &[TensorEntry], data_len: u64) -> Result<(), HeaderError> {
    let mut order: Vec<&TensorEntry> = tensors.iter().collect();
    order.sort_by_key(|t| (t.begin, t.end));
    let mut prev_end = 0u64;
    let mut prev_name: Option<&str> = None;
    for t in order {
        if t.begin > prev_end {
            return Err(tensor_err(
                &t.name,
                if prev_name.is_none() {
                    HeaderErrorKind::NotStartingAtZero(t.begin)
                } else {
                    HeaderErrorKind::Gap {
                        prev_end,
                        begin: t.begin,
                    }
                },
            ));
        }
        if t.begin < prev_end {
            return Err(tensor_err(
                &t.name,
                HeaderErrorKind::Overlap {
                    other: prev_name.unwrap_or_default().to_string(),
                    begin: t.begin,
                    prev_end,
                },
            ));
        }
        prev_end = t.end;
        prev_name = Some(&t.name);
    }
    if prev_end < data_len {
        return Err(err(HeaderErrorKind::TrailingBytes(data_len - prev_end)));
    }
    Ok(())
}

/// A tensor as the writer lays it out: offsets relative to the data buffer.
#[derive(Clone, Debug)]
pub struct OutEntry<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [u64],
    pub begin: u64,
    pub end: u64,
}

/// Serialize a header: length prefix plus JSON padded with spaces so the data buffer starts
/// on an 8-byte boundary. `__metadata__` is `{"format":"pt"}` (transformers refuses
/// anything else).
pub fn write_header(entries: &[OutEntry<'_>]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), Value::String("pt".into()));
    map.insert("__metadata__".into(), Value::Object(meta));
    for e in entries {
        let mut t = serde_json::Map::new();
        t.insert(
            "dtype".into(),
            Value::String(e.dtype.safetensors_name().into()),
        );
        t.insert(
            "shape".into(),
            Value::Array(e.shape.iter().map(|&d| Value::from(d)).collect()),
        );
        t.insert(
            "data_offsets".into(),
            Value::Array(vec![Value::from(e.begin), Value::from(e.end)]),
        );
        map.insert(e.name.to_string(), Value::Object(t));
    }
    let mut json = Value::Object(map).to_string().into_bytes();
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header, HeaderErrorKind> {
        parse_header(bytes, bytes.len() as u64).map_err(|e| e.kind)
    }

    #[test]
    fn accepts_a_valid_file() {
        let f = file(
            r#"  {"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#,
            8,
        );
        let h = parse(&f).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].name, "b");
        assert_eq!(h.metadata, Some(vec![("format".into(), "pt".into())]));
    }

    #[test]
    fn each_rule_has_its_error() {
        use HeaderErrorKind as K;
        for len in 0..8 {
            assert_eq!(parse(&vec![0; len]), Err(K::TooShort(len as u64)));
        }
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(parse(&huge), Err(K::HeaderTooLarge(_))));
        let mut past = 100u64.to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        assert!(matches!(parse(&past), Err(K::HeaderPastEnd { .. })));
        let mut bad_utf8 = 2u64.to_le_bytes().to_vec();
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(parse(&bad_utf8), Err(K::NotUtf8(0)));
        assert_eq!(parse(&file("[1,2]", 0)), Err(K::NotObject));
        assert!(matches!(parse(&file("{\"a\":", 0)), Err(K::Json(_))));
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert_eq!(parse(&file(dup, 1)), Err(K::Duplicate));
        assert!(matches!(
            parse(&file(r#"{"__metadata__":{"x":1}}"#, 0)),
            Err(K::BadMetadata(_))
        ));
        let t = |s: &str, n| parse(&file(s, n));
        assert_eq!(
            t(
                r#"{"a":{"dtype":"Q8","shape":[1],"data_offsets":[0,1]}}"#,
                1
            ),
            Err(K::UnknownDtype("Q8".into()))
        );
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                1
            ),
            Err(K::BadShape(_))
        ));
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}"#,
                1
            ),
            Err(K::BadShape(_))
        ));
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,1]}}"#,
                1
            ),
            Err(K::ShapeOverflow { .. })
        ));
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#,
                1
            ),
            Err(K::FractionalBytes { .. })
        ));
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#,
                1
            ),
            Err(K::ReversedOffsets { .. })
        ));
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,1]}}"#,
                1
            ),
            Err(K::SizeMismatch { .. })
        ));
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2
            ),
            Err(K::NotStartingAtZero(1))
        ));
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#,
                3
            ),
            Err(K::Gap { .. })
        ));
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
                3
            ),
            Err(K::Overlap { .. })
        ));
        assert!(matches!(
            t(
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
                1
            ),
            Err(K::PastEnd { .. })
        ));
        assert_eq!(
            t(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
                3
            ),
            Err(K::TrailingBytes(2))
        );
    }

    #[test]
    fn written_headers_parse_back() {
        let shape = [2u64, 3];
        let entries = [OutEntry {
            name: "w",
            dtype: DType::F16,
            shape: &shape,
            begin: 0,
            end: 12,
        }];
        let mut bytes = write_header(&entries);
        assert_eq!(bytes.len() % 8, 0);
        bytes.extend_from_slice(&[0u8; 12]);
        let h = parse_header(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(h.tensors[0].shape, vec![2, 3]);
        assert_eq!(
            h.metadata,
            Some(vec![("format".to_string(), "pt".to_string())])
        );
    }
}
