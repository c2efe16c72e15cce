//! mergestream: merge large language model checkpoints by streaming them one tensor at a
//! time.
//!
//! The flow is plan → pipeline → output folder:
//! - [`model`] opens checkpoints (headers only) through the parsers in [`format`], reading
//!   every byte through a [`source`] (a local folder; remote locations implement the same
//!   trait);
//! - [`plan`] decides every output tensor, its shard, offset and recipe, before reading data
//!   (`blockmerge`, `lora`);
//! - [`pipeline`] streams the data: reader → compute workers ([`methods`], [`kernels`]) →
//!   writer, within a byte budget;
//! - [`output`] stages the folder and renames it into place when complete.
//!
//! Everything here is usable without the CLI; `src/main.rs` only parses arguments.

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
pub mod source;
pub mod units;

pub use error::{Error, ErrorKind, Result};
pub use model::{Model, TensorInfo};
pub use plan::Plan;
