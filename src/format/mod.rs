//! Parsers and writers of checkpoint file formats. Each parser is a pure function of bytes
//! (or text) with a specific error for each rule it checks, so it can be fuzzed alone.

pub mod index;
pub mod peft;
pub mod pickle;
pub mod safetensors;
pub mod strided;
pub mod torch_bin;
pub mod torch_legacy;
pub mod torch_zip;
