//! mergekit's `tokenizer_source` and `tokenizer:` block, parsed from the YAML values that
//! `plan::mergekit::config` keeps.
//!
//! Models are named by their reference as written in the config (`./models/a`); the caller
//! matches those names against the merge's models.

use serde_yaml_ng::Value;

/// Where the output vocabulary comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputSource {
    /// The base model's tokenizer, stripped of ids >= its vocab_size.
    Base,
    /// Every model's tokens: base's, then new ones model by model.
    Union,
    /// This model's tokenizer, unstripped.
    Model(String),
}

impl OutputSource {
    pub fn parse(s: &str) -> OutputSource {
        match s {
            "base" => OutputSource::Base,
            "union" => OutputSource::Union,
            other => OutputSource::Model(other.to_string()),
        }
    }
}

/// `source:` of one entry of `tokens:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `{kind: zero}`.
    Zero,
    /// A model reference: that model's row for this very token.
    Model(String),
    /// `{kind: model_token, model, token | token_id}`.
    ModelToken { model: String, token: TokenRef },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenRef {
    Text(String),
    Id(i64),
}

/// One entry of `tokens:`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TokenConfig {
    pub source: Option<TokenSource>,
    /// Use the source even for models that have the token.
    pub force: bool,
}

/// The whole `tokenizer:` block, or the equivalent of `tokenizer_source: X`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizerSpec {
    pub source: OutputSource,
    /// `tokens:` in config order (they are added to the output in this order).
    pub tokens: Vec<(String, TokenConfig)>,
    pub pad_to_multiple_of: Option<usize>,
}

impl TokenizerSpec {
    /// What mergekit does with a config's two keys: the `tokenizer:` block wins (its source
    /// defaults to union); else `tokenizer_source`; else no tokenizer work at all.
    pub fn from_config(
        tokenizer_source: Option<&str>,
        tokenizer: Option<&Value>,
    ) -> Result<Option<TokenizerSpec>, String> {
        match (tokenizer, tokenizer_source) {
            (Some(block), _) => parse_block(block).map(Some),
            (None, Some(s)) => Ok(Some(TokenizerSpec {
                source: OutputSource::parse(s),
                tokens: Vec::new(),
                pad_to_multiple_of: None,
            })),
            (None, None) => Ok(None),
        }
    }

    pub fn token(&self, text: &str) -> Option<&TokenConfig> {
        self.tokens.iter().find(|(t, _)| t == text).map(|(_, c)| c)
    }
}

fn model_ref(v: &Value, what: &str) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(format!("{what}: expected a model path, got {}", show(v))),
    }
}

fn show(v: &Value) -> String {
    serde_yaml_ng::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn parse_block(block: &Value) -> Result<TokenizerSpec, String> {
    let Value::Mapping(map) = block else {
        return Err("`tokenizer:` must be a mapping".into());
    };
    let mut spec = TokenizerSpec {
        source: OutputSource::Union,
        tokens: Vec::new(),
        pad_to_multiple_of: None,
    };
    for (k, v) in map {
        match k.as_str() {
            Some("source") => spec.source = OutputSource::parse(&model_ref(v, "tokenizer.source")?),
            Some("pad_to_multiple_of") => {
                spec.pad_to_multiple_of = match v {
                    Value::Null => None,
                    _ => match v.as_u64() {
                        Some(n) if n > 0 => Some(n as usize),
                        _ => {
                            return Err(format!(
                                "tokenizer.pad_to_multiple_of: expected a positive integer, got {}",
                                show(v)
                            ));
                        }
                    },
                }
            }
            Some("tokens") => match v {
                Value::Null => {}
                Value::Mapping(tokens) => {
                    for (tok, cfg) in tokens {
                        let tok = match tok {
                            Value::String(s) => s.clone(),
                            other => show(other),
                        };
                        let cfg = parse_token(&tok, cfg)?;
                        spec.tokens.push((tok, cfg));
                    }
                }
                _ => return Err("tokenizer.tokens must be a mapping of token → settings".into()),
            },
            _ => return Err(format!("tokenizer: unknown key {}", show(k))),
        }
    }
    Ok(spec)
}

fn parse_token(tok: &str, cfg: &Value) -> Result<TokenConfig, String> {
    let mut out = TokenConfig::default();
    let Value::Mapping(map) = cfg else {
        if cfg.is_null() {
            return Ok(out);
        }
        return Err(format!(
            "token {tok:?}: expected a mapping with source/force"
        ));
    };
    for (k, v) in map {
        match k.as_str() {
            Some("force") => {
                out.force = v
                    .as_bool()
                    .ok_or_else(|| format!("token {tok:?}: force must be true or false"))?
            }
            Some("source") => out.source = parse_source(tok, v)?,
            _ => return Err(format!("token {tok:?}: unknown key {}", show(k))),
        }
    }
    Ok(out)
}

fn parse_source(tok: &str, v: &Value) -> Result<Option<TokenSource>, String> {
    let map = match v {
        Value::Null => return Ok(None),
        Value::String(s) => return Ok(Some(TokenSource::Model(s.clone()))),
        Value::Mapping(m) => m,
        other => return Err(format!("token {tok:?}: bad source {}", show(other))),
    };
    let get = |key: &str| map.get(Value::String(key.into()));
    match get("kind").and_then(Value::as_str) {
        Some("zero") => Ok(Some(TokenSource::Zero)),
        Some("model_token") => {
            let model = model_ref(
                get("model").ok_or_else(|| format!("token {tok:?}: model_token needs `model`"))?,
                &format!("token {tok:?}: model"),
            )?;
            let token = match (get("token"), get("token_id")) {
                (Some(Value::String(t)), None) => TokenRef::Text(t.clone()),
                (None, Some(id)) => TokenRef::Id(id.as_i64().ok_or_else(|| {
                    format!(
                        "token {tok:?}: token_id must be an integer, got {}",
                        show(id)
                    )
                })?),
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "token {tok:?}: only one of token_id or token may be specified"
                    ));
                }
                _ => {
                    return Err(format!(
                        "token {tok:?}: token_id or token must be specified"
                    ));
                }
            };
            Ok(Some(TokenSource::ModelToken { model, token }))
        }
        // mergekit's ModelReference also accepts a mapping ({model: ..., lora: ...}).
        None if get("model").is_some() => Err(format!(
            "token {tok:?}: a model reference written as a mapping is not supported as a source; \
             write the model path"
        )),
        _ => Err(format!(
            "token {tok:?}: source kind must be `zero` or `model_token`, or a model path"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_golden_block() {
        let y: Value = serde_yaml_ng::from_str(
            "source: union\npad_to_multiple_of: 64\ntokens:\n  <a>:\n    source:\n      kind: zero\n  <b>:\n    source:\n      kind: model_token\n      model: m\n      token_id: 7\n    force: true\n  <c>:\n    source: m2\n",
        )
        .unwrap();
        let s = TokenizerSpec::from_config(Some("base"), Some(&y))
            .unwrap()
            .unwrap();
        assert_eq!(s.source, OutputSource::Union);
        assert_eq!(s.pad_to_multiple_of, Some(64));
        assert_eq!(s.tokens[0].0, "<a>");
        assert_eq!(
            s.tokens[1].1.source,
            Some(TokenSource::ModelToken {
                model: "m".into(),
                token: TokenRef::Id(7)
            })
        );
        assert!(s.tokens[1].1.force);
        assert_eq!(s.tokens[2].1.source, Some(TokenSource::Model("m2".into())));
    }

    #[test]
    fn rejects_bad_blocks() {
        for y in [
            "tokens: 3",
            "bogus: 1",
            "tokens:\n  a:\n    source:\n      kind: model_token\n      model: m\n",
            "pad_to_multiple_of: -1",
        ] {
            let v: Value = serde_yaml_ng::from_str(y).unwrap();
            assert!(TokenizerSpec::from_config(None, Some(&v)).is_err(), "{y}");
        }
    }
}
