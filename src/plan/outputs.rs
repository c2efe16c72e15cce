//! The files an output folder holds besides the shards: config.json (edited), tokenizer and
//! generation files copied from a source model, and generated files (model cards).

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::source::Source;

/// Tokenizer files copied from the source model when present. BlockMerge_Gradient's own
/// list, plus the files newer tokenizers need to load at all.
pub const TOKENIZER_FILES: &[&str] = &[
    "added_tokens.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Other files `save_pretrained` writes that we take from the source model.
pub const MODEL_FILES: &[&str] = &["generation_config.json"];

#[derive(Clone, Debug, Default)]
pub struct OutputFiles {
    /// config.json to write, already edited.
    pub config: Option<Value>,
    /// (where the file is, its name there and in the output): read through the source when
    /// the output is written, so a remote model's files are copied the same way.
    pub copies: Vec<(Arc<dyn Source>, String)>,
    /// (file name, contents) written from memory.
    pub generated: Vec<(String, Vec<u8>)>,
}

impl OutputFiles {
    /// config.json of `config` with its dtype set, plus the tokenizer and generation files
    /// found beside `model`.
    pub fn from_model(model: &Model, config: Option<Value>, dtype: DType) -> OutputFiles {
        let mut out = OutputFiles {
            config: config.map(|c| with_dtype(c, dtype)),
            ..OutputFiles::default()
        };
        out.copy_present(&model.source, MODEL_FILES);
        out.copy_present(&model.source, TOKENIZER_FILES);
        out
    }

    /// Copy each of `names` found in `from`, replacing an earlier copy of the same name.
    pub fn copy_present(&mut self, from: &Arc<dyn Source>, names: &[&str]) {
        for name in names {
            // A file the source cannot even stat is treated as absent, as a missing one.
            if matches!(from.file_len(name), Ok(Some(_))) {
                self.copies.retain(|(_, n)| n != name);
                self.copies.push((from.clone(), name.to_string()));
            }
        }
    }

    /// The bytes of copied file `name`, with the path that names it, when one is copied.
    pub fn read_copy(&self, name: &str) -> Result<Option<(PathBuf, Vec<u8>)>> {
        let Some((from, _)) = self.copies.iter().find(|(_, n)| n == name) else {
            return Ok(None);
        };
        Ok(Some((from.path_of(name), read_copied(&**from, name)?)))
    }
}

/// The bytes of file `name` of `from`, which must exist (it did when the plan was made).
pub fn read_copied(from: &dyn Source, name: &str) -> Result<Vec<u8>> {
    let fail = |e| Error::io("cannot read", e).in_file(from.path_of(name));
    from.read_small(name)
        .map_err(fail)?
        .ok_or_else(|| fail(std::io::ErrorKind::NotFound.into()))
}

/// Set the dtype in a transformers config: `torch_dtype` (transformers 4) and/or `dtype`
/// (transformers 5), whichever the config uses; `torch_dtype` when it has neither.
pub fn with_dtype(mut config: Value, dtype: DType) -> Value {
    if let Value::Object(map) = &mut config {
        let name = Value::String(dtype.torch_name().to_string());
        let mut set = false;
        for key in ["torch_dtype", "dtype"] {
            if let Some(v) = map.get_mut(key) {
                *v = name.clone();
                set = true;
            }
        }
        if !set {
            map.insert("torch_dtype".into(), name);
        }
    }
    config
}

/// Serialize a config as transformers does: 2-space indent and a final newline.
pub fn config_bytes(config: &Value) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(config).unwrap_or_default();
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_dtype_key_the_config_uses() {
        let c = with_dtype(serde_json::json!({"dtype": "bfloat16", "a": 1}), DType::F16);
        assert_eq!(c["dtype"], "float16");
        assert!(c.get("torch_dtype").is_none());
        let c = with_dtype(serde_json::json!({"a": 1}), DType::F16);
        assert_eq!(c["torch_dtype"], "float16");
    }
}
