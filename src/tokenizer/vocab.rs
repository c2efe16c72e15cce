//! The output vocabulary and the per-model permutations, as mergekit 0.1.5's
//! `tokenizer/build.py` builds them.
//!
//! - The base (the config's `base_model`, else the first referenced model) is read with its
//!   tokens >= its config `vocab_size` stripped; other models are read as they are.
//! - `base`: the stripped base tokenizer. A model path: that model's tokenizer, unstripped.
//!   `union`: the base's tokenizer; then every regular token of any model that the base lacks
//!   (added as a plain token), then every added token of any model (first model's flags win),
//!   models in the order base, then the others in referenced order.
//! - Then the `tokens:` of a `tokenizer:` block not already in the vocabulary, as plain tokens
//!   in config order.
//! - Permutations: for each referenced model and output id, the model's row, or none when
//!   the model lacks the token (or its id is beyond the model's vocab_size: padding).
//!
//! Where mergekit would crash, we carry on with the evident intent: a token whose id in a
//! non-base model is >= that model's vocab_size leaves no permutation entry there and
//! mergekit's embedding step then fails with a KeyError; here that model simply lacks the
//! token (its padding row is not used).
//!
//! One deliberate difference: mergekit walks each model's vocabulary in a hash map's order
//! when collecting new regular tokens for `union`, so their ids vary between runs; here they
//! come model by model in id order.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::tokenizer::config::{OutputSource, TokenizerSpec};
use crate::tokenizer::files::{AddedToken, Tokenizer};

/// One referenced model, as the vocabulary builder needs it.
#[derive(Clone, Debug)]
pub struct ModelTokenizer {
    /// The model's reference as written in the config (matched against token sources).
    pub name: String,
    /// None when the model has no tokenizer files (mergekit then assumes the base's).
    pub tokenizer: Option<Tokenizer>,
    /// config.json's vocab size (the architecture's key, usually `vocab_size`); None when
    /// unknown.
    pub config_vocab_size: Option<usize>,
}

/// The merged tokenizer and how each model's rows map onto it.
#[derive(Clone, Debug)]
pub struct TokenizerInfo {
    /// The output tokenizer (write it with [`Tokenizer::output_files`]).
    pub tokenizer: Tokenizer,
    /// Output id → token text; `len()` is the number of tokens (transformers' `len(tok)`).
    pub tokens: Vec<String>,
    /// Rows of the output embedding: the token count padded to `pad_to_multiple_of`. This
    /// is config.json's new `vocab_size`.
    pub vocab_size: usize,
    /// The referenced models' names, in referenced order (base first when there is one).
    pub models: Vec<String>,
    /// Index into `models` of the base the vocabulary was built from.
    pub base: usize,
    /// `permutations[m][id]`: model m's row for output id, or None.
    pub permutations: Vec<Vec<Option<u32>>>,
    /// Each model's vocabulary (token → its row) as read: the base's stripped; a model
    /// without a tokenizer has the base's (as mergekit assumes).
    pub original_vocabs: Vec<HashMap<String, u32>>,
}

impl TokenizerInfo {
    /// The index of model `name` in [`TokenizerInfo::models`].
    pub fn model_index(&self, name: &str) -> Option<usize> {
        self.models.iter().position(|m| m == name)
    }

    /// The output id of `token`.
    pub fn token_id(&self, token: &str) -> Option<usize> {
        self.tokens.iter().position(|t| t == token)
    }
}

/// Build the output vocabulary. `models` are the referenced models in mergekit's order
/// (base_model first, then the config's order); `base` indexes the base among them (0 when
/// the config has no base_model).
pub fn build_tokenizer(
    models: &[ModelTokenizer],
    base: usize,
    spec: &TokenizerSpec,
) -> Result<TokenizerInfo> {
    let base_model = models
        .get(base)
        .ok_or_else(|| Error::invalid("a tokenizer merge needs at least one model"))?;
    let mut base_tok = base_model.tokenizer.clone().ok_or_else(|| {
        Error::invalid(format!(
            "the base model {} has no tokenizer.json; a tokenizer merge needs one",
            base_model.name
        ))
    })?;
    // get_stripped_tokenizer: vocab_size from config.json, else the full vocabulary's size.
    let base_vocab_size = base_model
        .config_vocab_size
        .unwrap_or_else(|| base_tok.vocab().len());
    base_tok.json.strip(base_vocab_size).map_err(|e| {
        Error::invalid(format!("tokenizer of {}: {e}", base_model.name))
            .in_file(format!("{}/tokenizer.json", base_model.name))
    })?;

    // The models with a tokenizer, base first: the order union walks them in.
    let mut order = vec![base];
    order.extend((0..models.len()).filter(|&m| m != base && models[m].tokenizer.is_some()));
    let tok_of = |m: usize| -> &Tokenizer {
        if m == base {
            &base_tok
        } else {
            models[m].tokenizer.as_ref().unwrap_or(&base_tok)
        }
    };

    let mut out = match &spec.source {
        OutputSource::Base => base_tok.clone(),
        OutputSource::Model(name) => {
            let m = models.iter().position(|m| &m.name == name).ok_or_else(|| {
                Error::invalid(format!(
                    "tokenizer source {name} is not one of the models in the merge"
                ))
            })?;
            if m == base {
                // mergekit loads the source afresh: unstripped.
                models[m]
                    .tokenizer
                    .clone()
                    .unwrap_or_else(|| base_tok.clone())
            } else {
                models[m].tokenizer.clone().ok_or_else(|| {
                    Error::invalid(format!("tokenizer source {name} has no tokenizer.json"))
                })?
            }
        }
        OutputSource::Union => union(models, &order, &base_tok, tok_of),
    };

    // add_tokens: tokens: entries not already in the vocabulary, in config order.
    let mut existing: HashSet<String> = out.vocab().into_keys().collect();
    for (tok, _) in &spec.tokens {
        if existing.insert(tok.clone()) {
            out.json.add_token(&AddedToken::plain(tok));
        }
    }

    let vocab = out.vocab();
    let mut tokens = vec![None; vocab.len()];
    for (tok, &id) in &vocab {
        match tokens.get_mut(id as usize) {
            Some(slot @ None) => *slot = Some(tok.clone()),
            _ => {
                return Err(Error::invalid(format!(
                    "the output vocabulary's ids are not 0..{} (token {tok:?} has id {id}); \
                     its rows cannot be laid out",
                    vocab.len()
                )));
            }
        }
    }
    let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap_or_default).collect();
    let mut vocab_size = tokens.len();
    if let Some(k) = spec.pad_to_multiple_of
        && !vocab_size.is_multiple_of(k)
    {
        vocab_size = (vocab_size / k + 1) * k;
    }

    let mut permutations = Vec::with_capacity(models.len());
    let mut original_vocabs = Vec::with_capacity(models.len());
    for (m, model) in models.iter().enumerate() {
        let model_vocab = tok_of(m).vocab();
        // build_tokenizer's permutation loop: config vocab_size, else the vocabulary's size.
        let limit = model.config_vocab_size.unwrap_or(model_vocab.len());
        let p = tokens
            .iter()
            .map(|t| {
                model_vocab
                    .get(t)
                    .copied()
                    .filter(|&row| (row as usize) < limit)
            })
            .collect();
        permutations.push(p);
        original_vocabs.push(model_vocab);
    }

    Ok(TokenizerInfo {
        tokenizer: out,
        tokens,
        vocab_size,
        models: models.iter().map(|m| m.name.clone()).collect(),
        base,
        permutations,
        original_vocabs,
    })
}

/// build_union_tokenizer.
fn union<'a>(
    models: &[ModelTokenizer],
    order: &[usize],
    base_tok: &Tokenizer,
    tok_of: impl Fn(usize) -> &'a Tokenizer,
) -> Tokenizer {
    let mut out_vocab: Vec<String> = Vec::new();
    let mut seen_vocab: HashSet<String> = HashSet::new();
    let mut out_added: Vec<AddedToken> = Vec::new();
    let mut seen_added: HashSet<String> = HashSet::new();
    for &m in order {
        let tok = tok_of(m);
        // Here the fallback is the model vocabulary without added tokens (`tok.vocab_size`).
        let limit = models[m]
            .config_vocab_size
            .unwrap_or(tok.json.model_vocab.len());
        // mergekit means to skip added tokens here but tests `str in {int: AddedToken}`,
        // which never matches; they are skipped later, when added to the output.
        let mut vocab: Vec<(String, u32)> = tok.vocab().into_iter().collect();
        vocab.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        for (t, id) in vocab {
            if (id as usize) < limit && seen_vocab.insert(t.clone()) {
                out_vocab.push(t);
            }
        }
        for info in &tok.json.added {
            if (info.id as usize) < limit && seen_added.insert(info.content.clone()) {
                out_added.push(info.clone());
            }
        }
    }
    // mergekit saves the stripped base and loads it again: transformers re-adds the special
    // tokens its config names, including any the strip removed.
    let mut res = base_tok.clone();
    res.apply_transformers_load();
    let base_vocab = base_tok.vocab();
    for t in &out_vocab {
        if !seen_added.contains(t) && !base_vocab.contains_key(t) {
            res.json.add_token(&AddedToken::plain(t));
        }
    }
    for info in &out_added {
        res.json.add_token(info);
    }
    res
}

/// The vocabulary size in a model's config.json, at mergekit's `vocab_size_config_key`
/// (dotted, e.g. `text_config.vocab_size`; default `vocab_size`).
pub fn config_vocab_size(config: &serde_json::Value, key: Option<&str>) -> Option<usize> {
    let mut v = config;
    for part in key.unwrap_or("vocab_size").split('.') {
        v = v.get(part)?;
    }
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

/// `_update_config_vocab`: set the output config's vocabulary size (the padded token count,
/// [`TokenizerInfo::vocab_size`]) at the same key, creating the path if it is missing.
pub fn set_config_vocab_size(config: &mut serde_json::Value, key: Option<&str>, size: usize) {
    let parts: Vec<&str> = key.unwrap_or("vocab_size").split('.').collect();
    let mut v = config;
    for (i, part) in parts.iter().enumerate() {
        let serde_json::Value::Object(map) = v else {
            return;
        };
        if i + 1 == parts.len() {
            map.insert((*part).to_string(), serde_json::Value::from(size));
            return;
        }
        v = map
            .entry((*part).to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tokenizer::config::OutputSource;
    use std::path::Path;

    fn tok(added: &str, config: Option<&str>) -> Tokenizer {
        let json = format!(
            r#"{{"added_tokens":[{added}],"model":{{"type":"BPE","vocab":{{"a":0,"b":1,"ab":2}},"merges":["a b"]}}}}"#
        );
        Tokenizer::from_bytes(
            Path::new("m"),
            json.as_bytes(),
            config.map(str::as_bytes),
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_token_in_a_models_padding_is_absent_there() {
        let x = r#"{"id":3,"content":"<x>","special":true}"#;
        let models = [
            ModelTokenizer {
                name: "base".into(),
                tokenizer: Some(tok(x, None)),
                config_vocab_size: Some(4),
            },
            ModelTokenizer {
                name: "padded".into(),
                tokenizer: Some(tok(x, None)),
                config_vocab_size: Some(3),
            },
        ];
        let spec = TokenizerSpec {
            source: OutputSource::Base,
            tokens: vec![],
            pad_to_multiple_of: None,
        };
        let info = build_tokenizer(&models, 0, &spec).unwrap();
        assert_eq!(info.tokens, ["a", "b", "ab", "<x>"]);
        assert_eq!(info.permutations[1], [Some(0), Some(1), Some(2), None]);
    }

    #[test]
    fn transformers_load_adds_config_special_tokens() {
        let t = tok(
            "",
            Some(r#"{"eos_token":"</s>","extra_special_tokens":["ab"]}"#),
        );
        // </s> is new (id 3); "ab" is a regular token, now also a special added token.
        let added: Vec<(u32, &str, bool)> = t
            .json
            .added
            .iter()
            .map(|a| (a.id, a.content.as_str(), a.special))
            .collect();
        assert_eq!(added, [(2, "ab", true), (3, "</s>", true)]);
    }

    #[test]
    fn config_vocab_size_follows_dotted_keys() {
        let mut c = serde_json::json!({"vocab_size": 10, "text_config": {"vocab_size": 20}});
        assert_eq!(config_vocab_size(&c, None), Some(10));
        assert_eq!(
            config_vocab_size(&c, Some("text_config.vocab_size")),
            Some(20)
        );
        assert_eq!(config_vocab_size(&c, Some("nope.vocab_size")), None);
        set_config_vocab_size(&mut c, Some("text_config.vocab_size"), 64);
        set_config_vocab_size(&mut c, None, 32);
        assert_eq!(
            c,
            serde_json::json!({"vocab_size": 32, "text_config": {"vocab_size": 64}})
        );
    }
}
