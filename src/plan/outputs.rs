//! The files an output folder holds besides the shards: config.json (edited), tokenizer and
//! generation files copied from a source model, and generated files (model cards).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::dtype::DType;

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
    /// (source path, file name in the output).
    pub copies: Vec<(PathBuf, String)>,
    /// (file name, contents) written from memory.
    pub generated: Vec<(String, Vec<u8>)>,
}

impl OutputFiles {
    /// config.json of `config` with its dtype set, plus the tokenizer and generation files
    /// found in `dir`.
    pub fn from_model_dir(dir: &Path, config: Option<Value>, dtype: DType) -> OutputFiles {
        let mut out = OutputFiles {
            config: config.map(|c| with_dtype(c, dtype)),
            ..OutputFiles::default()
        };
        out.copy_present(dir, MODEL_FILES);
        out.copy_present(dir, TOKENIZER_FILES);
        out
    }

    /// Copy each of `names` found in `dir`, replacing an earlier copy of the same name.
    pub fn copy_present(&mut self, dir: &Path, names: &[&str]) {
        for name in names {
            let p = dir.join(name);
            if p.is_file() {
                self.copies.retain(|(_, n)| n != name);
                self.copies.push((p, name.to_string()));
            }
        }
    }
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
