//! The files beside the tensors: config.json (dtype, layer count), tokenizer files, the
//! chat template, mergekit_config.yml and the model card.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::plan::outputs::{OutputFiles, TOKENIZER_FILES, with_dtype};
use crate::source::Source;

use super::config::{MergeConfig, ModelRef};
use super::inputs::Input;
use super::{MergeOptions, cfg_err};

/// config.json (dtype, layer count), tokenizer files, mergekit_config.yml and the model card.
#[allow(clippy::too_many_arguments)]
pub(super) fn output_files(
    opts: &MergeOptions,
    cfg: &MergeConfig,
    text: &str,
    inputs: &[Input],
    sources: &[Model],
    donor: usize,
    out_layers: u64,
    dtype: Option<DType>,
) -> Result<OutputFiles> {
    let donor_files = sources[inputs[donor].source].source.clone();
    let mut config = inputs[donor].config.clone();
    if let (Some(c), Some(d)) = (config.take(), dtype) {
        config = Some(with_dtype(c, d));
    } else {
        config = inputs[donor].config.clone();
    }
    if cfg.slices.is_some()
        && let Some(serde_json::Value::Object(map)) = config.as_mut()
        && map.contains_key("num_hidden_layers")
    {
        map.insert("num_hidden_layers".into(), out_layers.into());
    }
    let mut out = OutputFiles {
        config,
        ..OutputFiles::default()
    };
    // Tokenizer: tokenizer_source names base or a model; otherwise the donor's files.
    let tok_dir: Option<Arc<dyn Source>> = match cfg.tokenizer_source.as_deref() {
        Some("base") => Some(donor_files.clone()),
        Some(other) => {
            let r = ModelRef::parse(other).map_err(|e| cfg_err(&opts.config_path, e))?;
            match inputs.iter().find(|i| i.reference.path == r.path) {
                Some(i) => Some(sources[i.source].source.clone()),
                None => {
                    return Err(cfg_err(
                        &opts.config_path,
                        format!("tokenizer_source `{other}` is not one of the merged models"),
                    ));
                }
            }
        }
        None if opts.copy_tokenizer => Some(donor_files.clone()),
        None => None,
    };
    if let Some(dir) = tok_dir {
        out.copy_present(&dir, TOKENIZER_FILES);
        out.copy_present(&dir, &["generation_config.json"]);
    }
    if let Some(template) = &cfg.chat_template {
        let tpl = chat_template(template, inputs, sources).ok_or_else(|| {
            cfg_err(
                &opts.config_path,
                if template == "auto" {
                    "chat_template auto: no model's tokenizer_config.json has a chat_template".to_string()
                } else {
                    format!("unknown chat_template `{template}` (chatml, llama3, alpaca, auto, or Jinja text)")
                },
            )
        })?;
        let mut v: serde_json::Value = match out.read_copy("tokenizer_config.json")? {
            Some((p, t)) => serde_json::from_slice(&t)
                .map_err(|e| Error::invalid(format!("not valid JSON: {e}")).in_file(&p))?,
            None => serde_json::json!({}),
        };
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("chat_template".into(), tpl.into());
        }
        out.copies.retain(|(_, n)| n != "tokenizer_config.json");
        out.generated.push((
            "tokenizer_config.json".into(),
            crate::plan::outputs::config_bytes(&v),
        ));
    }
    if opts.write_model_card {
        out.generated
            .push(("mergekit_config.yml".into(), text.as_bytes().to_vec()));
        out.generated.push((
            "README.md".into(),
            model_card(cfg, text, inputs).into_bytes(),
        ));
    }
    Ok(out)
}

/// A chat template by mergekit's names, `auto` (the inputs' most common), or Jinja text.
fn chat_template(name: &str, inputs: &[Input], sources: &[Model]) -> Option<String> {
    match name {
        "chatml" => Some(CHATML.to_string()),
        "llama3" => Some(LLAMA3.to_string()),
        "alpaca" => Some(ALPACA.to_string()),
        "auto" => {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for i in inputs {
                let Ok(Some(t)) = sources[i.source].read_file("tokenizer_config.json") else {
                    continue;
                };
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&t)
                    && let Some(s) = v.get("chat_template").and_then(|s| s.as_str())
                {
                    *counts.entry(s.to_string()).or_default() += 1;
                }
            }
            counts.into_iter().max_by_key(|(_, c)| *c).map(|(t, _)| t)
        }
        t if t.contains("{%") || t.contains("{{") => Some(t.to_string()),
        _ => None,
    }
}

// The standard chat formats, written out for mergekit's template names.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
const ALPACA: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] | trim + '\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim + eos_token + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}";

fn model_card(cfg: &MergeConfig, text: &str, inputs: &[Input]) -> String {
    let mut s = String::new();
    s.push_str("---\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n- mergestream\n---\n");
    s.push_str("# Merged model\n\nThis model was merged with [mergestream](https://github.com/) from a mergekit configuration.\n\n");
    s.push_str(&format!("## Merge method\n\n`{}`", cfg.merge_method));
    if let Some(b) = &cfg.base_model {
        s.push_str(&format!(", with {b} as the base"));
    }
    s.push_str(".\n\n## Models merged\n\n");
    for i in inputs {
        s.push_str(&format!("- {}\n", i.reference));
    }
    s.push_str("\n## Configuration\n\n```yaml\n");
    s.push_str(text);
    if !text.ends_with('\n') {
        s.push('\n');
    }
    s.push_str("```\n");
    s
}
