//! Shard index files: `model.safetensors.index.json` and `pytorch_model.bin.index.json`.
//!
//! `{"metadata": {...}, "weight_map": {tensor: shard file}}`. The parser is a pure function
//! of the JSON text; it rejects a missing or malformed weight_map, a tensor listed twice,
//! and shard names that could leave the model's folder.

use std::collections::HashSet;
use std::path::{Component, Path};

use serde_json::Value;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum IndexError {
    #[error("index is not valid JSON: {0}")]
    Json(String),
    #[error("index is not a JSON object")]
    NotObject,
    #[error("index has no weight_map")]
    MissingWeightMap,
    #[error("weight_map is not an object")]
    WeightMapNotObject,
    #[error("weight_map entry for `{0}` is not a string")]
    ShardNotString(String),
    #[error("`{0}` is listed twice in weight_map")]
    Duplicate(String),
    #[error("shard name `{shard}` for `{tensor}` leaves the model folder (absolute or `..`)")]
    EscapingPath { tensor: String, shard: String },
    #[error("weight_map is empty")]
    Empty,
}

/// A parsed index: (tensor, shard file name) pairs in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardIndex {
    pub weight_map: Vec<(String, String)>,
}

impl ShardIndex {
    /// Distinct shard names, in order of first appearance.
    pub fn shards(&self) -> Vec<&str> {
        let mut seen = HashSet::new();
        self.weight_map
            .iter()
            .filter(|(_, s)| seen.insert(s.as_str()))
            .map(|(_, s)| s.as_str())
            .collect()
    }
}

/// Parse and validate an index file's text.
pub fn parse_index(text: &str) -> Result<ShardIndex, IndexError> {
    let raw = raw_object(text)?;
    let Some(wm) = raw
        .into_iter()
        .rev()
        .find(|(k, _)| k == "weight_map")
        .map(|(_, v)| v)
    else {
        return Err(IndexError::MissingWeightMap);
    };
    // Re-parse the weight_map with duplicates kept so a tensor listed twice is caught.
    let entries = match wm {
        RawValue::Object(entries) => entries,
        RawValue::Other(_) => return Err(IndexError::WeightMapNotObject),
    };
    let mut seen = HashSet::new();
    let mut weight_map = Vec::with_capacity(entries.len());
    for (tensor, v) in entries {
        let RawValue::Other(Value::String(shard)) = v else {
            return Err(IndexError::ShardNotString(tensor));
        };
        if !seen.insert(tensor.clone()) {
            return Err(IndexError::Duplicate(tensor));
        }
        if !is_safe_relative(&shard) {
            return Err(IndexError::EscapingPath { tensor, shard });
        }
        weight_map.push((tensor, shard));
    }
    if weight_map.is_empty() {
        return Err(IndexError::Empty);
    }
    Ok(ShardIndex { weight_map })
}

/// A shard name must be a relative path made only of normal components.
pub fn is_safe_relative(name: &str) -> bool {
    if name.is_empty() || name.contains('\\') || name.contains('\0') {
        return false;
    }
    Path::new(name)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
}

enum RawValue {
    Object(Vec<(String, RawValue)>),
    Other(Value),
}

/// The top-level object, and nested objects one level down, with duplicate keys kept.
fn raw_object(text: &str) -> Result<Vec<(String, RawValue)>, IndexError> {
    use serde::de::{self, Deserializer, MapAccess, Visitor};
    use std::fmt;

    struct Top(Vec<(String, RawValue)>);
    struct TopVisitor;
    struct Inner(RawValue);

    impl<'de> de::Deserialize<'de> for Top {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(TopVisitor)
        }
    }
    impl<'de> Visitor<'de> for TopVisitor {
        type Value = Top;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Top, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = m.next_key::<String>()? {
                let v = m.next_value::<Inner>()?;
                out.push((k, v.0));
            }
            Ok(Top(out))
        }
    }
    impl<'de> de::Deserialize<'de> for Inner {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            // Objects keep duplicates; everything else is an ordinary JSON value.
            let v = d.deserialize_any(InnerVisitor)?;
            Ok(Inner(v))
        }
    }
    struct InnerVisitor;
    impl<'de> Visitor<'de> for InnerVisitor {
        type Value = RawValue;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<RawValue, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = m.next_key::<String>()? {
                let v = m.next_value::<Value>()?;
                out.push((k, RawValue::Other(v)));
            }
            Ok(RawValue::Object(out))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawValue, E> {
            Ok(RawValue::Other(Value::Bool(v)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawValue, E> {
            Ok(RawValue::Other(Value::from(v)))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawValue, E> {
            Ok(RawValue::Other(Value::from(v)))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawValue, E> {
            Ok(RawValue::Other(Value::from(v)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<RawValue, E> {
            Ok(RawValue::Other(Value::String(v.to_string())))
        }
        fn visit_unit<E: de::Error>(self) -> Result<RawValue, E> {
            Ok(RawValue::Other(Value::Null))
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<RawValue, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = s.next_element::<Value>()? {
                out.push(v);
            }
            Ok(RawValue::Other(Value::Array(out)))
        }
    }

    if !text.trim_start().starts_with('{') {
        return Err(IndexError::NotObject);
    }
    serde_json::from_str::<Top>(text)
        .map(|t| t.0)
        .map_err(|e| IndexError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_real_index() {
        let text = r#"{"metadata":{"total_size":10},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#;
        let idx = parse_index(text).unwrap();
        assert_eq!(idx.weight_map.len(), 3);
        assert_eq!(
            idx.shards(),
            vec![
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
    }

    #[test]
    fn rejects_bad_indexes() {
        assert_eq!(
            parse_index(r#"{"metadata":{}}"#),
            Err(IndexError::MissingWeightMap)
        );
        assert_eq!(parse_index("[]"), Err(IndexError::NotObject));
        assert!(matches!(parse_index("{"), Err(IndexError::Json(_))));
        assert_eq!(
            parse_index(r#"{"weight_map":[]}"#),
            Err(IndexError::WeightMapNotObject)
        );
        assert_eq!(
            parse_index(r#"{"weight_map":{"a":1}}"#),
            Err(IndexError::ShardNotString("a".into()))
        );
        assert_eq!(
            parse_index(r#"{"weight_map":{"a":"x","a":"y"}}"#),
            Err(IndexError::Duplicate("a".into()))
        );
        for bad in ["../x.safetensors", "/etc/passwd", "a/../../b", "", "..\\x"] {
            let text = format!(r#"{{"weight_map":{{"a":{}}}}}"#, Value::String(bad.into()));
            assert!(
                matches!(parse_index(&text), Err(IndexError::EscapingPath { .. })),
                "{bad}"
            );
        }
        assert_eq!(parse_index(r#"{"weight_map":{}}"#), Err(IndexError::Empty));
    }
}
