//! The arithmetic of merging, free of plans and I/O: mergekit's methods ([`mergekit`], one
//! file per method, registered in one table), LoRA deltas ([`lora`]) and PyTorch's reduction
//! and sort order ([`torch_compat`]). The pipeline applies them to chunks of rows.

pub mod extract_lora;
pub mod lora;
pub mod mergekit;
pub mod torch_compat;
