//! PEFT adapter configuration (`adapter_config.json`) and adapter tensor names.
//!
//! Parsing is a pure function of the JSON text. Settings that change how a merge must be
//! computed and that mergestream does not implement are refused by name rather than
//! silently ignored (a wrong merge is worse than none).

use serde_json::Value;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AdapterConfigError {
    #[error("adapter config is not valid JSON: {0}")]
    Json(String),
    #[error("adapter config is not a JSON object")]
    NotObject,
    #[error("peft_type is `{0}`; only LORA adapters can be merged")]
    NotLora(String),
    #[error("adapter config lacks `{0}`")]
    Missing(&'static str),
    #[error("`{key}` must be {expected}")]
    WrongType { key: String, expected: &'static str },
    #[error("`{0}` is set; this LoRA variant cannot be merged by mergestream yet")]
    Unsupported(String),
}

/// The settings that decide a LoRA merge.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub r: u64,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub fan_in_fan_out: bool,
    /// (pattern, rank) in file order; the first matching pattern wins.
    pub rank_pattern: Vec<(String, u64)>,
    /// (pattern, alpha) in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    pub modules_to_save: Vec<String>,
}

/// Keys whose presence (non-null, non-false, non-empty) means a LoRA variant with different
/// merge math, or one that PEFT itself cannot merge.
const UNSUPPORTED: &[&str] = &[
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "target_parameters",
    "trainable_token_indices",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "lora_bias",
];

pub fn parse_adapter_config(text: &str) -> Result<AdapterConfig, AdapterConfigError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| AdapterConfigError::Json(e.to_string()))?;
    let Value::Object(map) = v else {
        return Err(AdapterConfigError::NotObject);
    };
    match map.get("peft_type") {
        Some(Value::String(t)) if t.eq_ignore_ascii_case("lora") => {}
        Some(Value::String(t)) => return Err(AdapterConfigError::NotLora(t.clone())),
        Some(_) => {
            return Err(AdapterConfigError::WrongType {
                key: "peft_type".into(),
                expected: "a string",
            });
        }
        None => return Err(AdapterConfigError::Missing("peft_type")),
    }
    for key in UNSUPPORTED {
        let set = match map.get(*key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(AdapterConfigError::Unsupported(key.to_string()));
        }
    }
    let r = positive_int(map.get("r"), "r")?.ok_or(AdapterConfigError::Missing("r"))?;
    let lora_alpha = match map.get("lora_alpha") {
        None | Some(Value::Null) => 8.0, // LoraConfig's default
        Some(v) => number(v, "lora_alpha")?,
    };
    let flag = |key: &str| -> Result<bool, AdapterConfigError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(AdapterConfigError::WrongType {
                key: key.into(),
                expected: "true or false",
            }),
        }
    };
    let rank_pattern = pattern_map(map.get("rank_pattern"), "rank_pattern", |v, k| {
        positive_int(Some(v), k)?.ok_or(AdapterConfigError::WrongType {
            key: k.into(),
            expected: "a positive integer",
        })
    })?;
    let alpha_pattern = pattern_map(map.get("alpha_pattern"), "alpha_pattern", number)?;
    let modules_to_save = match map.get("modules_to_save") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(AdapterConfigError::WrongType {
                    key: "modules_to_save".into(),
                    expected: "a list of strings",
                }),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(AdapterConfigError::WrongType {
                key: "modules_to_save".into(),
                expected: "a list of strings",
            });
        }
    };
    Ok(AdapterConfig {
        r,
        lora_alpha,
        use_rslora: flag("use_rslora")?,
        use_dora: flag("use_dora")?,
        fan_in_fan_out: flag("fan_in_fan_out")?,
        rank_pattern,
        alpha_pattern,
        modules_to_save,
    })
}

fn positive_int(v: Option<&Value>, key: &str) -> Result<Option<u64>, AdapterConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(u) if u > 0 => Ok(Some(u)),
            _ => Err(AdapterConfigError::WrongType {
                key: key.into(),
                expected: "a positive integer",
            }),
        },
        Some(_) => Err(AdapterConfigError::WrongType {
            key: key.into(),
            expected: "a positive integer",
        }),
    }
}

fn number(v: &Value, key: &str) -> Result<f64, AdapterConfigError> {
    match v.as_f64() {
        Some(f) if f.is_finite() => Ok(f),
        _ => Err(AdapterConfigError::WrongType {
            key: key.into(),
            expected: "a number",
        }),
    }
}

fn pattern_map<T>(
    v: Option<&Value>,
    key: &str,
    item: impl Fn(&Value, &str) -> Result<T, AdapterConfigError>,
) -> Result<Vec<(String, T)>, AdapterConfigError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| Ok((k.clone(), item(v, &format!("{key}.{k}"))?)))
            .collect(),
        Some(_) => Err(AdapterConfigError::WrongType {
            key: key.into(),
            expected: "an object",
        }),
    }
}

/// What an adapter tensor name means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterKey {
    /// `<module>.lora_A.weight` of a linear layer.
    LinearA(String),
    LinearB(String),
    /// `<module>.lora_embedding_A` / `_B` of an embedding.
    EmbeddingA(String),
    EmbeddingB(String),
    /// `<module>.lora_magnitude_vector` (DoRA).
    Magnitude(String),
    /// Any other key: a full replacement of the base tensor of this name (modules_to_save,
    /// saved `base_layer` weights, trained biases).
    Replacement(String),
}

/// Classify an adapter tensor name; the `base_model.model.` prefix PEFT adds is removed, as
/// are `.base_layer` and `.modules_to_save.<adapter>` (they name the base tensor's module).
pub fn classify_key(key: &str) -> AdapterKey {
    let k = key.strip_prefix("base_model.model.").unwrap_or(key);
    let module_of = |suffix: &str| k.strip_suffix(suffix).map(str::to_string);
    for (suffix, make) in [
        (
            ".lora_A.weight",
            AdapterKey::LinearA as fn(String) -> AdapterKey,
        ),
        (".lora_B.weight", AdapterKey::LinearB),
        (".lora_embedding_A", AdapterKey::EmbeddingA),
        (".lora_embedding_B", AdapterKey::EmbeddingB),
        (".lora_magnitude_vector", AdapterKey::Magnitude),
        (".lora_magnitude_vector.weight", AdapterKey::Magnitude),
    ] {
        if let Some(m) = module_of(suffix) {
            return make(m);
        }
    }
    let mut name = k.replace(".base_layer.", ".");
    if let Some(pos) = name.find(".modules_to_save.") {
        // `<module>.modules_to_save.<adapter>.<param>` → `<module>.<param>`
        let rest = &name[pos + ".modules_to_save.".len()..];
        let param = rest.split_once('.').map(|(_, p)| p).unwrap_or(rest);
        name = format!("{}.{}", &name[..pos], param);
    }
    AdapterKey::Replacement(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_golden_config_fields() {
        let c = parse_adapter_config(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"use_rslora":false,"rank_pattern":{"q_proj":4},"alpha_pattern":{},"fan_in_fan_out":false,"use_dora":false,"modules_to_save":["lm_head"],"layer_replication":null,"lora_bias":false}"#,
        )
        .unwrap();
        assert_eq!(c.r, 8);
        assert_eq!(c.lora_alpha, 16.0);
        assert_eq!(c.rank_pattern, vec![("q_proj".to_string(), 4)]);
        assert_eq!(c.modules_to_save, vec!["lm_head".to_string()]);
    }

    #[test]
    fn refuses_what_it_cannot_merge() {
        assert_eq!(
            parse_adapter_config(r#"{"peft_type":"IA3","r":8}"#),
            Err(AdapterConfigError::NotLora("IA3".into()))
        );
        assert_eq!(
            parse_adapter_config(r#"{"peft_type":"LORA","r":8,"layer_replication":[[0,4]]}"#),
            Err(AdapterConfigError::Unsupported("layer_replication".into()))
        );
        assert_eq!(
            parse_adapter_config(r#"{"peft_type":"LORA"}"#),
            Err(AdapterConfigError::Missing("r"))
        );
        assert!(matches!(
            parse_adapter_config(r#"{"peft_type":"LORA","r":0}"#),
            Err(AdapterConfigError::WrongType { .. })
        ));
        assert!(matches!(
            parse_adapter_config("[]"),
            Err(AdapterConfigError::NotObject)
        ));
    }

    #[test]
    fn classifies_keys() {
        assert_eq!(
            classify_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            AdapterKey::LinearA("model.layers.0.self_attn.q_proj".into())
        );
        assert_eq!(
            classify_key("base_model.model.model.embed_tokens.lora_embedding_B"),
            AdapterKey::EmbeddingB("model.embed_tokens".into())
        );
        assert_eq!(
            classify_key("base_model.model.model.embed_tokens.base_layer.weight"),
            AdapterKey::Replacement("model.embed_tokens.weight".into())
        );
        assert_eq!(
            classify_key("base_model.model.lm_head.modules_to_save.default.weight"),
            AdapterKey::Replacement("lm_head.weight".into())
        );
        assert_eq!(
            classify_key("base_model.model.lm_head.weight"),
            AdapterKey::Replacement("lm_head.weight".into())
        );
    }
}
