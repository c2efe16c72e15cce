//! mergestream: merge large language model checkpoints by streaming them one tensor at a
//! time.
//!
//! The flow is plan → pipeline → output folder:
//! - [`model`] opens checkpoints (headers only) through the parsers in
//!   [`format`](mod@format), reading every byte through a [`source`] (a local folder, the HF cache,
//!   a Hub repo, an HTTP folder or an S3 prefix, all behind one trait);
//! - [`plan`] decides every output tensor, its shard, offset and recipe, before reading data
//!   (`blockmerge`, `lora_merge`, `convert`, `mergekit`; `card` writes their model cards;
//!   `extract_lora` decides an adapter extraction, which `pipeline::extract_lora` runs one
//!   module at a time);
//! - [`pipeline`] streams the data: reader → compute workers → writer, within a byte budget,
//!   applying the arithmetic of [`methods`] with the SIMD [`kernels`];
//! - [`output`] stages the folder and renames it into place when complete.
//!
//! # Layers
//!
//! Each module uses only modules above it in this list, so the graph has no cycle:
//! 1. [`dtype`], [`shape`], [`units`], [`progress`]: vocabulary shared by everything;
//! 2. [`format`](mod@format) (parsers, pure functions of bytes) and [`kernels`] (SIMD, dtype only);
//! 3. [`source`] (where bytes come from: local folders, the HF cache, the Hub, HTTP, S3) and
//!    [`error`] (wraps the parsers' error types);
//! 4. [`model`] (a checkpoint of any format), [`tokenizer`] (vocabularies merged as mergekit
//!    does: files, output vocabulary, per-row embedding sources) and [`methods`] (merge arithmetic: no plans, no
//!    I/O; each mergekit method one file, registered in `methods::mergekit::METHODS`);
//! 5. [`plan`] (the output decided from headers; recipes name methods);
//! 6. [`pipeline`] (chunking policy, reading, computing, writing) and [`inspect`];
//! 7. [`output`] (staging and the atomic rename) and [`diff`] (two models compared through
//!    the pipeline's reader and budget; its `plot` draws the heatmap).
//!
//! Everything here is usable without the CLI; `src/main.rs` only parses arguments and
//! reports errors.

pub mod aligned;
pub mod diff;
pub mod dtype;
pub mod error;
pub mod format;
pub mod inspect;
pub mod kernels;
pub mod methods;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod shape;
pub mod source;
pub mod tokenizer;
pub mod units;

pub use error::{Error, ErrorKind, Result};
pub use model::{Model, TensorInfo};
pub use plan::Plan;
