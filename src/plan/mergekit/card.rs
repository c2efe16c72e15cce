//! The files beside the tensors: config.json (dtype, layer count), tokenizer files, the
//! chat template, mergekit_config.yml and the model card.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::plan::card::{Card, CardRequest, Relation};
use crate::plan::outputs::{OutputFiles, TOKENIZER_FILES, with_dtype};
use crate::source::Source;

use super::arch::Architecture;
use super::config::{MergeConfig, ModelRef};
use super::depth;
use super::inputs::Input;
use super::tensors::OutLayers;
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
    arch: &Architecture,
    out_layers: &OutLayers,
    names: &[&str],
    dtype: Option<DType>,
    vocab: Option<&super::vocab::Vocab>,
) -> Result<OutputFiles> {
    let donor_files = sources[inputs[donor].source].source.clone();
    let mut config = inputs[donor].config.clone();
    if let Some(c) = config.as_mut() {
        depth::rewrite(c, arch, out_layers, inputs, donor);
        depth::check(&opts.config_path, c, arch, out_layers, names)?;
    }
    if let Some(d) = dtype {
        config = config.map(|c| with_dtype(c, d));
    }
    if let (Some(v), Some(c)) = (vocab, config.as_mut()) {
        crate::tokenizer::set_config_vocab_size(c, arch.vocab_key.as_deref(), v.info.vocab_size);
    }
    let mut out = OutputFiles {
        config,
        ..OutputFiles::default()
    };
    // Tokenizer: tokenizer_source names base or a model; otherwise the donor's files.
    let tok_dir: Option<Arc<dyn Source>> = match cfg.tokenizer_source.as_deref() {
        // A merged vocabulary: its own files (below).
        _ if vocab.is_some() => None,
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
    if let Some(v) = vocab {
        out.generated.extend(v.info.tokenizer.output_files());
    }
    // The chat template goes where transformers 5 saves it (chat_template.jinja), and only
    // with a tokenizer in the output (mergekit: "Chat template will not be saved" otherwise).
    let has_tokenizer = out.copies.iter().any(|(_, n)| n == "tokenizer_config.json")
        || out
            .generated
            .iter()
            .any(|(n, _)| n == "tokenizer_config.json");
    if let Some(value) = &cfg.chat_template
        && has_tokenizer
        && let Some(template) = chat_template(&opts.config_path, value, inputs, sources)?
    {
        let generated = out
            .generated
            .iter()
            .position(|(n, _)| n == "tokenizer_config.json");
        if let Some(i) = generated {
            let (_, t) = out.generated.remove(i);
            let mut v: serde_json::Value = serde_json::from_slice(&t).map_err(|e| {
                Error::internal(format!("tokenizer_config.json written invalid: {e}"))
            })?;
            if let serde_json::Value::Object(m) = &mut v {
                m.remove("chat_template");
            }
            out.generated.push((
                "tokenizer_config.json".into(),
                crate::plan::outputs::config_bytes(&v),
            ));
        } else if let Some((p, t)) = out.read_copy("tokenizer_config.json")? {
            let mut v: serde_json::Value = serde_json::from_slice(&t)
                .map_err(|e| Error::invalid(format!("not valid JSON: {e}")).in_file(&p))?;
            if let serde_json::Value::Object(m) = &mut v
                && m.remove("chat_template").is_some()
            {
                out.copies.retain(|(_, n)| n != "tokenizer_config.json");
                out.generated.push((
                    "tokenizer_config.json".into(),
                    crate::plan::outputs::config_bytes(&v),
                ));
            }
        }
        out.copies
            .retain(|(_, n)| n != "chat_template.jinja" && n != "chat_template.json");
        out.generated
            .push(("chat_template.jinja".into(), template.into_bytes()));
    }
    if let Some(request) = &opts.model_card {
        out.generated
            .push(("mergekit_config.yml".into(), text.as_bytes().to_vec()));
        out.generated
            .push(model_card(request, cfg, text, inputs).file());
    }
    Ok(out)
}

/// The template `chat_template:` asks for; `None` for `auto` when no input has one (mergekit
/// then leaves the tokenizer's own).
fn chat_template(
    config_path: &std::path::Path,
    value: &str,
    inputs: &[Input],
    sources: &[Model],
) -> Result<Option<String>> {
    use super::chat_templates::{Requested, most_common, requested};
    match requested(value) {
        Some(Requested::Named(t)) => Ok(Some(t.to_string())),
        Some(Requested::Text(t)) => Ok(Some(t.to_string())),
        Some(Requested::Auto) => {
            let mut found = Vec::new();
            for i in inputs {
                if let Some(t) = model_template(&sources[i.source])? {
                    found.push(t);
                }
            }
            Ok(most_common(found.iter().map(String::as_str)))
        }
        None => Err(cfg_err(
            config_path,
            format!(
                "invalid chat_template `{value}`: chatml, llama3, alpaca, mistral, exaone, auto, or Jinja text"
            ),
        )),
    }
}

/// A model's own chat template: chat_template.jinja (transformers 5), else the
/// `chat_template` of tokenizer_config.json (a string, or the `default` of a named set).
fn model_template(model: &Model) -> Result<Option<String>> {
    if let Some(t) = model.read_file("chat_template.jinja")? {
        return Ok(Some(String::from_utf8_lossy(&t).into_owned()));
    }
    let Some(t) = model.read_file("tokenizer_config.json")? else {
        return Ok(None);
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&t) else {
        return Ok(None);
    };
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
        _ => None,
    })
}

/// The card mergekit writes (method, base, models, the configuration), in the shared form:
/// mergekit's tags plus ours, and the command line.
fn model_card(request: &CardRequest, cfg: &MergeConfig, text: &str, inputs: &[Input]) -> Card {
    let mut refs = Vec::new();
    let mut models = String::from("## Models merged\n\n");
    for i in inputs {
        refs.push(i.reference.path.display().to_string());
        if let Some(l) = &i.reference.lora {
            refs.push(l.display().to_string());
        }
        let _ = writeln!(models, "- `{}`", i.reference);
    }
    let mut method = format!("## Merge method\n\n`{}`", cfg.merge_method);
    if let Some(b) = &cfg.base_model {
        let _ = write!(method, ", with `{b}` as the base");
    }
    method.push_str("; the weights and parameters are those of the configuration below.");
    Card {
        request: request.clone(),
        inputs: refs,
        relation: Relation::Merge,
        tags: vec!["mergekit", "merge", "mergestream"],
        summary: "A merge of pre-trained language models made by mergestream from a mergekit configuration, as `mergekit-yaml` would make it.".into(),
        sections: vec![method, models],
        config: Some(("mergekit_config.yml".into(), text.to_string())),
    }
}
