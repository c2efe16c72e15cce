//! Tokenizers of merged models: reading them, the merged vocabulary mergekit 0.1.5 builds for
//! `tokenizer_source` (`base`, `union`, a model) and the `tokenizer:` block, how each model's
//! embedding rows map onto it, and the output tokenizer files.
//!
//! Pure data, no tensors: [`files`] parses and writes the JSON files (pure functions of
//! bytes); [`config`] reads the YAML settings; [`vocab::build_tokenizer`] makes the output
//! vocabulary and per-model permutations ([`TokenizerInfo`]); [`embed::embedding_plan`] turns
//! them into a row-by-row recipe ([`EmbeddingPlan`]) for each vocabulary tensor, which the
//! pipeline executes in chunks.
//!
//! Use: load each referenced model's [`Tokenizer`] (`Tokenizer::load`), build
//! `TokenizerInfo` once per merge, take `info.vocab_size` as config.json's vocab size and
//! `info.tokenizer.output_files()` as the tokenizer files to write, and call
//! `embedding_plan` for every tensor that has a vocabulary axis.
//!
//! ```text
//! let spec = TokenizerSpec::from_config(cfg.tokenizer_source.as_deref(), cfg.tokenizer.as_ref())?;
//! // referenced models: base_model first, then config order; base = 0
//! let models: Vec<ModelTokenizer> = /* Tokenizer::load(source)?, config_vocab_size(config, key) */;
//! let info = build_tokenizer(&models, 0, &spec)?;
//! set_config_vocab_size(&mut out_config, key, info.vocab_size);
//! out_files.generated.extend(info.tokenizer.output_files());
//! // per vocabulary tensor, slots in the order mergekit gathers that tensor's models:
//! let plan = embedding_plan(&info, &spec, &[Slot { model, rows }, ...], config_base_model)?;
//! // aligned row r of slot s: plan.source(s, r) → Row / Default(k) → plan.defaults[k] / Pad
//! ```
//!
//! Each model's aligned tensor (rows `0..info.vocab_size`) then goes into the merge method
//! like any other input, so every method sees mergekit's inputs.

pub mod config;
pub mod embed;
pub mod files;
pub mod vocab;

pub use config::{OutputSource, TokenConfig, TokenRef, TokenSource, TokenizerSpec};
pub use embed::{DefaultRow, EmbeddingPlan, RowSource, Slot, embedding_plan};
pub use files::{AddedToken, Tokenizer, TokenizerConfigJson, TokenizerJson};
pub use vocab::{
    ModelTokenizer, TokenizerInfo, build_tokenizer, config_vocab_size, set_config_vocab_size,
};
