//! A config's `tokenizer_source` / `tokenizer:` as the planner uses them: the merged
//! vocabulary (built by [`crate::tokenizer`] as mergekit 0.1.5 builds it), which model of the
//! config each tokenizer model is, and the alignment of each vocabulary tensor's rows.

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::plan::{Operand, TensorRef, VocabRows};
use crate::tokenizer::{
    ModelTokenizer, Slot, Tokenizer, TokenizerInfo, TokenizerSpec, build_tokenizer,
    config_vocab_size, embedding_plan,
};

use super::arch::Architecture;
use super::cfg_err;
use super::config::MergeConfig;
use super::inputs::Models;

/// The merged vocabulary of a config that asks for one.
pub(super) struct Vocab {
    pub spec: TokenizerSpec,
    pub info: TokenizerInfo,
    /// Model index (the planner's) → index into `info.models`.
    pub model_of: Vec<usize>,
    /// The config's `base_model`, as an index into `info.models`.
    pub config_base: Option<usize>,
}

/// Build the merged vocabulary, when the config asks for one: the referenced models with
/// the base first (mergekit's order with its set order pinned, as golden2's notes say).
pub(super) fn build(
    path: &Path,
    cfg: &MergeConfig,
    models: &Models,
    base: Option<usize>,
) -> Result<Option<Vocab>> {
    let spec = TokenizerSpec::from_config(cfg.tokenizer_source.as_deref(), cfg.tokenizer.as_ref())
        .map_err(|e| cfg_err(path, e))?;
    let Some(spec) = spec else {
        return Ok(None);
    };
    let mut order: Vec<usize> = base.into_iter().collect();
    order.extend((0..models.refs.len()).filter(|&m| Some(m) != base));
    let mut tokenizers = Vec::with_capacity(order.len());
    for &m in &order {
        let inp = &models.inputs[m];
        let source = &models.sources[inp.source].source;
        tokenizers.push(ModelTokenizer {
            name: models.refs[m].to_string(),
            tokenizer: Tokenizer::load(&**source)?,
            config_vocab_size: inp.config.as_ref().and_then(|c| config_vocab_size(c, None)),
        });
    }
    let info = build_tokenizer(&tokenizers, 0, &spec).map_err(|e| match e.file {
        Some(_) => e,
        None => e.in_file(path),
    })?;
    let mut model_of = vec![0; models.refs.len()];
    for (i, &m) in order.iter().enumerate() {
        model_of[m] = i;
    }
    Ok(Some(Vocab {
        spec,
        info,
        config_base: base.map(|b| model_of[b]),
        model_of,
    }))
}

/// Whether output tensor `name` has one row per token (an embedding or LM head).
pub(super) fn is_vocab_tensor(arch: &Architecture, name: &str) -> bool {
    arch.modules.iter().any(|m| {
        m.pre.iter().chain(&m.post).any(|w| {
            w.vocab == Some(0) && name.strip_prefix(m.prefix.as_str()) == Some(w.name.as_str())
        })
    })
}

impl Vocab {
    /// Align the operands of one vocabulary tensor (`models[i]` is operand i's model): each
    /// then yields the merged vocabulary's rows. Returns the aligned row count.
    pub fn align(
        &self,
        path: &Path,
        tensor: &str,
        models: &[usize],
        operands: &mut [Operand],
        rows_of: impl Fn(TensorRef) -> u64,
    ) -> Result<u64> {
        let slots: Vec<Slot> = models
            .iter()
            .zip(operands.iter())
            .map(|(&m, op)| Slot {
                model: self.model_of[m],
                rows: rows_of(op.tensor) as usize,
            })
            .collect();
        let plan = embedding_plan(&self.info, &self.spec, &slots, self.config_base)
            .map_err(|e| e.at_tensor(tensor).in_file(path))?;
        if operands.iter().any(|op| !op.patches.is_empty()) {
            return Err(cfg_err(
                path,
                "a LoRA on an embedding or LM head cannot be combined with tokenizer merging yet",
            )
            .at_tensor(tensor));
        }
        let rows = plan.vocab_size as u64;
        let shared = Arc::new(VocabRows {
            plan,
            slots: operands.iter().map(|op| op.tensor).collect(),
        });
        for (i, op) in operands.iter_mut().enumerate() {
            op.vocab = Some((Arc::clone(&shared), i));
            op.rows = rows;
        }
        Ok(rows)
    }
}
