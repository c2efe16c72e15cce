//! Tokenizer files as data: `tokenizer.json` (the fast-tokenizer document), `tokenizer_config.json`
//! and `special_tokens_map.json`.
//!
//! The parsers are pure functions of bytes. They keep the whole JSON document (key order
//! preserved) and extract only what a vocabulary merge needs: the model's type and vocabulary
//! and the added tokens with their flags. Writing starts from the kept document, so every field
//! that affects encoding (normalizer, pre-tokenizer, merges, post-processor, decoder) is
//! written back unchanged unless the merge itself changes it.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::source::Source;

pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
/// Files of tokenizers we cannot read (slow-only formats); their presence without
/// `tokenizer.json` is an error rather than a silent fallback.
pub const UNREADABLE_ONLY: &[(&str, &str)] = &[
    ("tokenizer.model", "SentencePiece"),
    ("vocab.json", "slow (vocab.json/merges.txt)"),
];

/// One added token, as `tokenizer.json`'s `added_tokens` holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedToken {
    pub id: u32,
    pub content: String,
    pub single_word: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub normalized: bool,
    pub special: bool,
}

impl AddedToken {
    /// What `tokenizer.add_tokens("text")` adds for a plain string: normalized, not special.
    pub fn plain(content: &str) -> AddedToken {
        AddedToken {
            id: 0,
            content: content.to_string(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: true,
            special: false,
        }
    }

    /// Same content and flags (the id aside): the tokenizers library's notion of "already added".
    pub fn same_token(&self, other: &AddedToken) -> bool {
        AddedToken {
            id: 0,
            ..self.clone()
        } == AddedToken {
            id: 0,
            ..other.clone()
        }
    }

    fn to_json(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "content": self.content,
            "single_word": self.single_word,
            "lstrip": self.lstrip,
            "rstrip": self.rstrip,
            "normalized": self.normalized,
            "special": self.special,
        })
    }

    fn from_json(v: &Value, id: Option<u32>) -> std::result::Result<AddedToken, String> {
        let obj = v.as_object().ok_or("an added token is not a JSON object")?;
        let id = match id {
            Some(id) => id,
            None => obj
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|i| u32::try_from(i).ok())
                .ok_or("an added token has no valid \"id\"")?,
        };
        let content = obj
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("added token {id} has no string \"content\""))?
            .to_string();
        let flag = |key: &str, default: bool| -> std::result::Result<bool, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(format!(
                    "added token {content:?}: \"{key}\" is not a boolean"
                )),
            }
        };
        Ok(AddedToken {
            id,
            single_word: flag("single_word", false)?,
            lstrip: flag("lstrip", false)?,
            rstrip: flag("rstrip", false)?,
            // The tokenizers library's defaults: normalized unless special.
            special: flag("special", false)?,
            normalized: flag("normalized", !flag("special", false)?)?,
            content,
        })
    }
}

/// A parsed `tokenizer.json`.
#[derive(Clone, Debug)]
pub struct TokenizerJson {
    /// The whole document, written back with the added tokens (and, when stripped, the
    /// vocabulary and merges) replaced.
    doc: Map<String, Value>,
    /// `model.type`: BPE, Unigram, WordPiece, WordLevel.
    pub model_type: String,
    /// The model's own vocabulary (no added tokens), token → id.
    pub model_vocab: HashMap<String, u32>,
    /// The added tokens, sorted by id.
    pub added: Vec<AddedToken>,
}

/// Parse `tokenizer.json`. Errors say what is wrong; the caller names the file.
pub fn parse_tokenizer_json(bytes: &[u8]) -> std::result::Result<TokenizerJson, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(doc) = doc else {
        return Err("not a JSON object".into());
    };
    let model = doc
        .get("model")
        .and_then(Value::as_object)
        .ok_or("no \"model\" object")?;
    // Old BPE files omit the type; tokenizers infers BPE from vocab + merges.
    let model_type = match model.get("type") {
        Some(Value::String(t)) => t.clone(),
        None if model.contains_key("merges") => "BPE".to_string(),
        _ => return Err("\"model\" has no string \"type\"".into()),
    };
    let mut model_vocab = HashMap::new();
    match (model_type.as_str(), model.get("vocab")) {
        // Unigram: a list of [piece, score]; the id is the position.
        ("Unigram", Some(Value::Array(pieces))) => {
            for (i, piece) in pieces.iter().enumerate() {
                let tok = piece
                    .as_array()
                    .and_then(|p| p.first())
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("Unigram vocab entry {i} is not [piece, score]"))?;
                let id = u32::try_from(i).map_err(|_| "Unigram vocab too large".to_string())?;
                model_vocab.entry(tok.to_string()).or_insert(id);
            }
        }
        (_, Some(Value::Object(vocab))) => {
            for (tok, id) in vocab {
                let id = id
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| format!("vocab token {tok:?} has no valid id"))?;
                model_vocab.insert(tok.clone(), id);
            }
        }
        (t, _) => return Err(format!("\"model\" ({t}) has no readable \"vocab\"")),
    }
    let mut added = Vec::new();
    match doc.get("added_tokens") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for v in list {
                added.push(AddedToken::from_json(v, None)?);
            }
        }
        Some(_) => return Err("\"added_tokens\" is not a list".into()),
    }
    added.sort_by_key(|t| t.id);
    Ok(TokenizerJson {
        doc,
        model_type,
        model_vocab,
        added,
    })
}

impl TokenizerJson {
    /// token → id over the model vocabulary and the added tokens, as transformers'
    /// `get_vocab()` (an added token's id wins over a model token of the same text).
    pub fn vocab(&self) -> HashMap<String, u32> {
        let mut v = self.model_vocab.clone();
        for t in &self.added {
            v.insert(t.content.clone(), t.id);
        }
        v
    }

    /// The id of `content` as the tokenizers library looks it up: added tokens first.
    pub fn token_to_id(&self, content: &str) -> Option<u32> {
        self.added
            .iter()
            .find(|t| t.content == content)
            .map(|t| t.id)
            .or_else(|| self.model_vocab.get(content).copied())
    }

    /// `tokenizer.add_tokens([token])` of the tokenizers library: nothing when an identical
    /// token (content and flags) is already added; the existing id (and the new flags) when
    /// the text is already known; else the next id after the model vocabulary and the
    /// added tokens. Returns the id.
    pub fn add_token(&mut self, token: &AddedToken) -> u32 {
        if let Some(t) = self.added.iter().find(|t| t.same_token(token)) {
            return t.id;
        }
        let model_len = u32::try_from(self.model_vocab.len()).unwrap_or(u32::MAX);
        let id = self.token_to_id(&token.content).unwrap_or_else(|| {
            match self.added.iter().map(|t| t.id).max() {
                Some(max) if max >= model_len || model_len == 0 => max.saturating_add(1),
                _ => model_len,
            }
        });
        let new = AddedToken {
            id,
            ..token.clone()
        };
        match self.added.iter_mut().find(|t| t.id == id) {
            Some(t) => *t = new,
            None => {
                self.added.push(new);
                self.added.sort_by_key(|t| t.id);
            }
        }
        id
    }

    /// mergekit's `get_stripped_tokenizer`: drop every token with id >= `vocab_size` (from
    /// the vocabulary, the added tokens and the merges). Only BPE can be stripped, as there.
    pub fn strip(&mut self, vocab_size: usize) -> std::result::Result<(), String> {
        let unused: std::collections::HashSet<String> = self
            .vocab()
            .into_iter()
            .filter(|(_, id)| *id as usize >= vocab_size)
            .map(|(t, _)| t)
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        if self.model_type != "BPE" {
            return Err(format!(
                "has {} token(s) with ids >= the model's vocab_size {vocab_size}, and only a BPE \
                 tokenizer can be stripped of them (this one is {}), as in mergekit",
                unused.len(),
                self.model_type
            ));
        }
        self.added.retain(|t| (t.id as usize) < vocab_size);
        self.model_vocab.retain(|t, _| !unused.contains(t));
        let model = self
            .doc
            .get_mut("model")
            .and_then(Value::as_object_mut)
            .ok_or("no \"model\" object")?;
        if let Some(Value::Object(vocab)) = model.get_mut("vocab") {
            vocab.retain(|t, _| !unused.contains(t));
        }
        if let Some(Value::Array(merges)) = model.get_mut("merges") {
            let mut kept = Vec::with_capacity(merges.len());
            for m in merges.drain(..) {
                let parts: Vec<&str> = match &m {
                    Value::String(s) if s.matches(' ').count() == 1 => s.split(' ').collect(),
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    other => return Err(format!("unexpected merge format: {other}")),
                };
                if !parts.iter().any(|p| unused.contains(*p)) {
                    kept.push(m);
                }
            }
            *merges = kept;
        }
        Ok(())
    }

    /// The document with the current added tokens, pretty-printed as transformers saves it.
    pub fn to_json(&self) -> Value {
        let mut doc = self.doc.clone();
        let added = self.added.iter().map(AddedToken::to_json).collect();
        doc.insert("added_tokens".into(), Value::Array(added));
        Value::Object(doc)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.to_json()).unwrap_or_default()
    }
}

/// A parsed `tokenizer_config.json` (or `special_tokens_map.json`, which holds the same
/// special-token keys).
#[derive(Clone, Debug, Default)]
pub struct TokenizerConfigJson {
    pub doc: Map<String, Value>,
    /// `added_tokens_decoder` (id → token), sorted by id; empty when absent.
    pub added_tokens_decoder: Vec<AddedToken>,
    /// Special-token keys (`bos_token`, `pad_token`, ...) → their text; a value may be a
    /// string or an AddedToken-like object.
    pub special_tokens: Vec<(String, String)>,
}

/// Parse `tokenizer_config.json` or `special_tokens_map.json`.
pub fn parse_tokenizer_config(bytes: &[u8]) -> std::result::Result<TokenizerConfigJson, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(doc) = doc else {
        return Err("not a JSON object".into());
    };
    let mut added_tokens_decoder = Vec::new();
    match doc.get("added_tokens_decoder") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (id, v) in map {
                let id = id
                    .parse::<u32>()
                    .map_err(|_| format!("added_tokens_decoder key {id:?} is not a token id"))?;
                added_tokens_decoder.push(AddedToken::from_json(v, Some(id))?);
            }
        }
        Some(_) => return Err("\"added_tokens_decoder\" is not an object".into()),
    }
    added_tokens_decoder.sort_by_key(|t| t.id);
    let mut special_tokens = Vec::new();
    for (key, v) in &doc {
        if !key.ends_with("_token") {
            continue;
        }
        let text = match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        if let Some(text) = text {
            special_tokens.push((key.clone(), text));
        }
    }
    Ok(TokenizerConfigJson {
        doc,
        added_tokens_decoder,
        special_tokens,
    })
}

impl TokenizerConfigJson {
    /// The config for an output whose added tokens are `added`: `added_tokens_decoder` is
    /// rewritten only when the input had one (transformers 5 writes none), in its style.
    pub fn to_bytes(&self, added: &[AddedToken]) -> Vec<u8> {
        let mut doc = self.doc.clone();
        if doc.contains_key("added_tokens_decoder") {
            let mut dec = Map::new();
            for t in added {
                let mut v = t.to_json();
                if let Value::Object(o) = &mut v {
                    o.remove("id");
                }
                dec.insert(t.id.to_string(), v);
            }
            doc.insert("added_tokens_decoder".into(), Value::Object(dec));
        }
        let mut out = serde_json::to_vec_pretty(&Value::Object(doc)).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

fn non_empty(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null() && v.as_str() != Some(""))
}

/// A special token's value in a config: a string (special, not normalized, as transformers
/// makes it) or an AddedToken-like object (its flags, made special).
fn special_value(v: &Value) -> Option<AddedToken> {
    match v {
        Value::String(s) if !s.is_empty() => Some(AddedToken {
            special: true,
            normalized: false,
            ..AddedToken::plain(s)
        }),
        Value::Object(_) => AddedToken::from_json(v, Some(0))
            .ok()
            .map(|t| AddedToken { special: true, ..t }),
        _ => None,
    }
}

/// A model's tokenizer: its `tokenizer.json` and, when present, its config files, as
/// transformers 5 loads them ([`Tokenizer::apply_transformers_load`]).
#[derive(Clone, Debug)]
pub struct Tokenizer {
    pub json: TokenizerJson,
    pub config: Option<TokenizerConfigJson>,
    pub special_tokens_map: Option<TokenizerConfigJson>,
}

impl Tokenizer {
    /// Parse the files of one tokenizer from their bytes; `dir` names them in errors.
    pub fn from_bytes(
        dir: &Path,
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        special_tokens_map: Option<&[u8]>,
    ) -> Result<Tokenizer> {
        let named = |name: &'static str| move |e: String| Error::invalid(e).in_file(dir.join(name));
        let json = parse_tokenizer_json(tokenizer_json).map_err(named(TOKENIZER_JSON))?;
        let config = tokenizer_config
            .map(parse_tokenizer_config)
            .transpose()
            .map_err(named(TOKENIZER_CONFIG))?;
        let special_tokens_map = special_tokens_map
            .map(parse_tokenizer_config)
            .transpose()
            .map_err(named(SPECIAL_TOKENS_MAP))?;
        let mut tok = Tokenizer {
            json,
            config,
            special_tokens_map,
        };
        tok.apply_transformers_load();
        Ok(tok)
    }

    /// The tokenizer beside a model: `Ok(None)` when it has no tokenizer files at all (mergekit
    /// then assumes the base model's), an error when it has only files we cannot read.
    pub fn load(source: &dyn Source) -> Result<Option<Tokenizer>> {
        let read = |name: &str| {
            source
                .read_small(name)
                .map_err(|e| Error::io("cannot read", e).in_file(source.path_of(name)))
        };
        let Some(json) = read(TOKENIZER_JSON)? else {
            for (name, kind) in UNREADABLE_ONLY {
                if matches!(source.file_len(name), Ok(Some(_))) {
                    return Err(Error::invalid(format!(
                        "cannot read {kind}-only tokenizers; this model has no tokenizer.json \
                         (save it once with transformers' fast tokenizer to create one)"
                    ))
                    .in_file(source.path_of(name)));
                }
            }
            return Ok(None);
        };
        let config = read(TOKENIZER_CONFIG)?;
        let map = read(SPECIAL_TOKENS_MAP)?;
        Tokenizer::from_bytes(source.location(), &json, config.as_deref(), map.as_deref()).map(Some)
    }

    /// The special tokens transformers 5 registers at load: the named ones
    /// (`SPECIAL_TOKENS_ATTRIBUTES` order), then `extra_special_tokens` (or the older
    /// `additional_special_tokens`), from tokenizer_config.json; special_tokens_map.json fills
    /// in only when the config has no `added_tokens_decoder` (transformers' legacy path).
    fn special_tokens(&self) -> Vec<AddedToken> {
        const NAMED: &[&str] = &[
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ];
        let empty = Map::new();
        let cfg = self.config.as_ref().map_or(&empty, |c| &c.doc);
        let legacy = !cfg.contains_key("added_tokens_decoder");
        let map = match (&self.special_tokens_map, legacy) {
            (Some(m), true) => &m.doc,
            _ => &empty,
        };
        let mut out: Vec<AddedToken> = Vec::new();
        for key in NAMED {
            if let Some(t) = non_empty(cfg.get(*key))
                .or_else(|| non_empty(map.get(*key)))
                .and_then(special_value)
            {
                out.push(t);
            }
        }
        for doc in [cfg, map] {
            let extra = doc
                .get("extra_special_tokens")
                .or_else(|| doc.get("additional_special_tokens"));
            // A mapping here is transformers' model-specific tokens, not extra specials.
            if let Some(Value::Array(list)) = extra {
                for t in list.iter().filter_map(special_value) {
                    if !out.contains(&t) {
                        out.push(t);
                    }
                }
            }
        }
        out
    }

    /// What transformers 5 does to a fast tokenizer when loading it (and so what mergekit's
    /// tokenizers are): `added_tokens_decoder` entries of tokenizer_config.json missing from
    /// tokenizer.json are added; special tokens not yet added tokens are added; then every
    /// special token is added again as special (new flags replace old ones at the same id).
    pub fn apply_transformers_load(&mut self) {
        let specials = self.special_tokens();
        let mut to_add: Vec<AddedToken> = Vec::new();
        if let Some(c) = &self.config {
            for t in &c.added_tokens_decoder {
                if !self.json.added.iter().any(|a| a.same_token(t)) {
                    to_add.push(t.clone());
                }
            }
        }
        for t in &specials {
            let known = self
                .json
                .added
                .iter()
                .chain(&to_add)
                .any(|a| a.content == t.content);
            if !known {
                to_add.push(t.clone());
            }
        }
        for t in to_add.iter().chain(&specials) {
            self.json.add_token(t);
        }
    }

    /// token → id, model vocabulary and added tokens (transformers' `get_vocab()`).
    pub fn vocab(&self) -> HashMap<String, u32> {
        self.json.vocab()
    }

    /// The output files: (name, bytes) for `tokenizer.json` and, when the tokenizer had them,
    /// `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn output_files(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![(TOKENIZER_JSON.to_string(), self.json.to_bytes())];
        if let Some(c) = &self.config {
            out.push((TOKENIZER_CONFIG.to_string(), c.to_bytes(&self.json.added)));
        }
        if let Some(m) = &self.special_tokens_map {
            out.push((SPECIAL_TOKENS_MAP.to_string(), m.to_bytes(&self.json.added)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"added_tokens":[{"id":3,"content":"<s>","special":true,"normalized":false}],
        "model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2,"<s>":3,"zz":4},"merges":["a b","ab zz"]}}"#;

    #[test]
    fn reads_vocab_and_added_tokens() {
        let t = parse_tokenizer_json(TINY.as_bytes()).unwrap();
        assert_eq!(t.model_type, "BPE");
        assert_eq!(t.vocab().len(), 5);
        assert_eq!(t.added[0].content, "<s>");
        assert!(t.added[0].special && !t.added[0].normalized);
    }

    #[test]
    fn add_token_follows_the_tokenizers_library() {
        let mut t = parse_tokenizer_json(TINY.as_bytes()).unwrap();
        assert_eq!(t.add_token(&AddedToken::plain("new")), 5);
        assert_eq!(t.add_token(&AddedToken::plain("new2")), 6);
        // Known text keeps its id; an identical token is a no-op.
        assert_eq!(t.add_token(&AddedToken::plain("ab")), 2);
        assert_eq!(t.add_token(&AddedToken::plain("new")), 5);
        assert_eq!(
            t.added.iter().map(|a| a.id).collect::<Vec<_>>(),
            [2, 3, 5, 6]
        );
    }

    #[test]
    fn strips_tokens_beyond_the_vocab_size() {
        let mut t = parse_tokenizer_json(TINY.as_bytes()).unwrap();
        t.strip(4).unwrap();
        assert_eq!(t.vocab().len(), 4);
        let j = t.to_json();
        assert_eq!(j["model"]["merges"], serde_json::json!(["a b"]));
        t.strip(3).unwrap();
        assert!(t.added.is_empty());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"model":{"type":"BPE","vocab":{"a":-1}}}"#,
        ] {
            assert!(parse_tokenizer_json(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(parse_tokenizer_config(br#"{"added_tokens_decoder":{"x":{}}}"#).is_err());
    }
}
