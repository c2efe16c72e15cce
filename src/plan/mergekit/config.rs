//! mergekit's YAML schema, parsed into typed structs.
//!
//! Unknown keys and wrong types are errors that name the key and line (serde_yaml_ng reports
//! the location). Model references accept mergekit's `path`, `path+lora` and the dict form
//! `{model: path, lora: dir, lora_weight: w}`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// A model as a config names it: a checkpoint, optionally patched by a LoRA.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRef {
    pub path: PathBuf,
    pub lora: Option<PathBuf>,
    pub lora_weight: f64,
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(l) = &self.lora {
            write!(f, "+{}", l.display())?;
            if self.lora_weight != 1.0 {
                write!(f, "×{}", self.lora_weight)?;
            }
        }
        Ok(())
    }
}

impl ModelRef {
    /// mergekit's string form: `path`, `path+lora` (more than one `+` is an error).
    pub fn parse(s: &str) -> Result<ModelRef, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty model path".into());
        }
        // `path@revision` names a hub revision; local folders have no revisions.
        let mut parts = s.split('+');
        let path = parts.next().unwrap_or_default();
        let lora = parts.next();
        if parts.next().is_some() {
            return Err(format!(
                "`{s}`: a model reference takes at most one `+LORA`"
            ));
        }
        if path.is_empty() || lora.is_some_and(str::is_empty) {
            return Err(format!("`{s}` is not a model reference"));
        }
        Ok(ModelRef {
            path: PathBuf::from(path),
            lora: lora.map(PathBuf::from),
            lora_weight: 1.0,
        })
    }
}

impl<'de> Deserialize<'de> for ModelRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ModelRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a model path, `path+lora`, or {model, lora, lora_weight}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ModelRef, E> {
                ModelRef::parse(s).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<ModelRef, A::Error> {
                let mut path: Option<PathBuf> = None;
                let mut lora: Option<PathBuf> = None;
                let mut weight: Option<f64> = None;
                while let Some(k) = m.next_key::<String>()? {
                    match k.as_str() {
                        "model" => path = Some(m.next_value::<PathOrDict>()?.0),
                        "lora" => lora = Some(m.next_value::<PathOrDict>()?.0),
                        "lora_weight" => weight = Some(m.next_value()?),
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["model", "lora", "lora_weight"],
                            ));
                        }
                    }
                }
                let path = path.ok_or_else(|| de::Error::missing_field("model"))?;
                if weight.is_some() && lora.is_none() {
                    return Err(de::Error::custom("lora_weight without lora"));
                }
                Ok(ModelRef {
                    path,
                    lora,
                    lora_weight: weight.unwrap_or(1.0),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A path written as a string or as mergekit's `{path: ...}`.
struct PathOrDict(PathBuf);

impl<'de> Deserialize<'de> for PathOrDict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Dict {
            path: PathBuf,
            #[serde(default)]
            revision: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            S(PathBuf),
            D(Dict),
        }
        match Either::deserialize(d)? {
            Either::S(p) => Ok(PathOrDict(p)),
            Either::D(Dict {
                path,
                revision: None,
            }) => Ok(PathOrDict(path)),
            Either::D(Dict {
                revision: Some(r), ..
            }) => Err(de::Error::custom(format!(
                "revision `{r}`: only local folders are supported"
            ))),
        }
    }
}

/// A parameter value: a scalar, a gradient list, or a list of `{filter, value}`.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    Number(f64),
    Bool(bool),
    Text(String),
    /// Numbers interpolated over the layer's position in its slice.
    Gradient(Vec<f64>),
    /// Bool/string lists: indexed by position.
    Steps(Vec<ParamValue>),
    /// The first entry whose filter is absent, `*`, or a substring of the tensor name.
    Filtered(Vec<(Option<String>, ParamValue)>),
}

impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ParamVisitor)
    }
}

struct ParamVisitor;

impl<'de> Visitor<'de> for ParamVisitor {
    type Value = ParamValue;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, a boolean, a list of numbers, or {filter, value} entries")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<ParamValue, E> {
        Ok(ParamValue::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ParamValue, E> {
        Ok(ParamValue::Number(v as f64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ParamValue, E> {
        Ok(ParamValue::Number(v as f64))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ParamValue, E> {
        if v.is_finite() {
            Ok(ParamValue::Number(v))
        } else {
            Err(E::custom(format!("{v} is not a finite number")))
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<ParamValue, E> {
        Ok(ParamValue::Text(v.to_string()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<ParamValue, A::Error> {
        let mut items: Vec<ParamValue> = Vec::new();
        while let Some(v) = s.next_element::<ParamValue>()? {
            items.push(v);
        }
        if items.is_empty() {
            return Err(de::Error::custom("an empty list is not a parameter value"));
        }
        if items.iter().all(|v| matches!(v, ParamValue::Number(_))) {
            return Ok(ParamValue::Gradient(
                items
                    .into_iter()
                    .map(|v| match v {
                        ParamValue::Number(n) => n,
                        _ => 0.0,
                    })
                    .collect(),
            ));
        }
        if items.iter().all(|v| {
            matches!(
                v,
                ParamValue::Number(_) | ParamValue::Bool(_) | ParamValue::Text(_)
            )
        }) {
            return Ok(ParamValue::Steps(items));
        }
        let mut out = Vec::with_capacity(items.len());
        for v in items {
            match v {
                ParamValue::Filtered(mut entries) if entries.len() == 1 => {
                    out.push(entries.remove(0))
                }
                _ => {
                    return Err(de::Error::custom(
                        "a list must hold only numbers, or only {filter, value} entries",
                    ));
                }
            }
        }
        Ok(ParamValue::Filtered(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<ParamValue, A::Error> {
        let mut filter: Option<String> = None;
        let mut value: Option<ParamValue> = None;
        while let Some(k) = m.next_key::<String>()? {
            match k.as_str() {
                "filter" => filter = Some(m.next_value()?),
                "value" => value = Some(m.next_value()?),
                other => return Err(de::Error::unknown_field(other, &["filter", "value"])),
            }
        }
        let value = value.ok_or_else(|| de::Error::missing_field("value"))?;
        Ok(ParamValue::Filtered(vec![(filter, value)]))
    }
}

pub type Parameters = BTreeMap<String, ParamValue>;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub model: ModelRef,
    #[serde(default)]
    pub parameters: Option<Parameters>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceEntry {
    pub model: ModelRef,
    pub layer_range: [i64; 2],
    #[serde(default)]
    pub parameters: Option<Parameters>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceEntry {
    pub sources: Vec<SourceEntry>,
    #[serde(default)]
    pub parameters: Option<Parameters>,
    #[serde(default)]
    pub base_model: Option<ModelRef>,
}

/// One entry of `modules:`: models or slices, and parameters shared by the module.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleEntry {
    #[serde(default)]
    pub models: Option<Vec<ModelEntry>>,
    #[serde(default)]
    pub slices: Option<Vec<SliceEntry>>,
    #[serde(default)]
    pub parameters: Option<Parameters>,
}

/// `modules:` as a list in the order the config gives them (mergekit plans them so).
fn ordered_modules<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<(String, ModuleEntry)>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Vec<(String, ModuleEntry)>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of module names to their models or slices")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, ModuleEntry)> = Vec::new();
            while let Some((k, v)) = m.next_entry::<String, ModuleEntry>()? {
                if out.iter().any(|(n, _)| *n == k) {
                    return Err(de::Error::custom(format!("module `{k}` is given twice")));
                }
                out.push((k, v));
            }
            Ok(Some(out))
        }
    }
    d.deserialize_any(V)
}

/// A mergekit config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    pub merge_method: String,
    #[serde(default)]
    pub models: Option<Vec<ModelEntry>>,
    #[serde(default)]
    pub slices: Option<Vec<SliceEntry>>,
    /// Per-module definitions (`text_decoder`, `vision_tower`, … or `default`), in config
    /// order.
    #[serde(default, deserialize_with = "ordered_modules")]
    pub modules: Option<Vec<(String, ModuleEntry)>>,
    #[serde(default)]
    pub base_model: Option<ModelRef>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub out_dtype: Option<String>,
    #[serde(default)]
    pub parameters: Option<Parameters>,
    #[serde(default)]
    pub tokenizer_source: Option<String>,
    #[serde(default)]
    pub tokenizer: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub chat_template: Option<String>,
}

impl MergeConfig {
    pub fn parse(text: &str) -> Result<MergeConfig, String> {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_golden_shape() {
        let c = MergeConfig::parse(
            "merge_method: slerp\nbase_model: a\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 8]\n      - model: b+l\n        layer_range: [0, 8]\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 1]\n    - value: 0.5\ndtype: float32\n",
        )
        .unwrap();
        let s = &c.slices.as_ref().unwrap()[0];
        assert_eq!(s.sources[1].model.lora, Some(PathBuf::from("l")));
        let t = &c.parameters.as_ref().unwrap()["t"];
        assert_eq!(
            t,
            &ParamValue::Filtered(vec![
                (
                    Some("self_attn".into()),
                    ParamValue::Gradient(vec![0.0, 0.5, 1.0])
                ),
                (None, ParamValue::Number(0.5)),
            ])
        );
    }

    #[test]
    fn dict_model_refs() {
        let c = MergeConfig::parse(
            "merge_method: linear\nmodels:\n  - model: {model: a, lora: l, lora_weight: 0.25}\n    parameters: {weight: 1}\n",
        )
        .unwrap();
        let m = &c.models.unwrap()[0].model;
        assert_eq!(
            (m.lora.clone(), m.lora_weight),
            (Some(PathBuf::from("l")), 0.25)
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_key_and_line() {
        let e = MergeConfig::parse("merge_method: linear\nmodles: []\n").unwrap_err();
        assert!(e.contains("modles") && e.contains("line 2"), "{e}");
        let e = MergeConfig::parse("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: {filter: mlp}}\n")
            .unwrap_err();
        assert!(e.contains("line 4"), "{e}");
        let e =
            MergeConfig::parse("merge_method: linear\nmodels:\n  - model: a+b+c\n").unwrap_err();
        assert!(e.contains("at most one"), "{e}");
    }
}
