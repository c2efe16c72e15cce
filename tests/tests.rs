//! The integration tests, one binary (linking the crate once): golden comparisons, bad
//! inputs, CLI behaviour, the PyTorch readers and property tests.

mod common;
mod torch_common;

mod bad_inputs;
mod chat_templates;
mod cli;
mod diff;
mod golden_blockmerge;
mod golden_extract_lora;
mod golden_lora;
mod golden_mergekit;
mod golden_mergekit_geometry;
mod golden_mergekit_methods;
mod golden_torch;
mod hf_cache;
mod hub;
mod hub_server;
mod interrupt;
mod mergekit_cli;
mod mergekit_configs;
mod mergekit_structure;
mod model_cards;
mod output_streams;
mod properties;
mod resume;
mod s3;
mod source;
mod tokenizer_merges;
mod tokenizers;
mod torch_bad_inputs;
mod torch_compat;
mod torch_golden;
mod torch_pickle_features;
mod torch_properties;
