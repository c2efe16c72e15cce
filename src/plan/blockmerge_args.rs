//! `blockmerge`'s two editions behind one command: what the user gave on the command line,
//! merged with the YAML edition's config file when there is one, becomes the
//! [`BlockMergeOptions`] of a run and its output folder.
//!
//! Flags win over the config file (so a pasted YAML command can be redirected with `-o`);
//! `--gradient_values` and `--config` are two different editions and cannot be combined.

use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::blockmerge::{BlockMergeOptions, Operation, Schedule, YamlConfig};
use crate::plan::card::CardRequest;
use crate::plan::lora::LoraSpec;

/// BlockMerge_Gradient's `max_shard_size` default ("2000MiB").
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 2000 * 1024 * 1024;

/// What the user gave, already parsed (the CLI fills this from its flags).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockMergeArgs {
    pub model_path1: Option<PathBuf>,
    pub model_path2: Option<PathBuf>,
    pub output_model_path: Option<PathBuf>,
    pub gradient_values: Option<Vec<f64>>,
    pub layer_only: bool,
    pub no_layers: bool,
    pub custom_filter: Option<String>,
    pub max_shard_size: Option<u64>,
    /// The YAML edition's config file.
    pub config: Option<PathBuf>,
    pub precise: bool,
    pub out_dtype: Option<DType>,
    pub lora1: Option<LoraSpec>,
    pub lora2: Option<LoraSpec>,
    /// Write a model card (README.md); `None` for `--no-write-model-card`.
    pub model_card: Option<CardRequest>,
}

/// A run, ready for [`plan_blockmerge`](crate::plan::blockmerge::plan_blockmerge).
#[derive(Clone, Debug)]
pub struct ResolvedBlockMerge {
    pub options: BlockMergeOptions,
    pub output: PathBuf,
}

impl BlockMergeArgs {
    /// Check the flags, read `--config` if given, and combine the two.
    pub fn resolve(self) -> Result<ResolvedBlockMerge> {
        // Before reading the config: a contradictory command line is reported as such.
        self.check_exclusive()?;
        let yaml = self.config.as_deref().map(YamlConfig::load).transpose()?;
        self.resolve_with(yaml)
    }

    /// Combine with `yaml`, the already loaded contents of `self.config` (None without one).
    pub fn resolve_with(self, yaml: Option<YamlConfig>) -> Result<ResolvedBlockMerge> {
        self.check_exclusive()?;
        let config_file = match (&yaml, &self.config) {
            (Some(cfg), Some(path)) if !cfg.text.is_empty() => Some((
                path.file_name().map_or_else(
                    || path.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ),
                cfg.text.clone(),
            )),
            _ => None,
        };
        let (model1, model2, output, shard, schedule) = match yaml {
            Some(cfg) => {
                let shard = match self.max_shard_size {
                    Some(s) => Some(s),
                    None => {
                        cfg.max_shard_size_bytes(self.config.as_deref().unwrap_or(Path::new("")))?
                    }
                };
                (
                    self.model_path1.unwrap_or(cfg.model_path1),
                    self.model_path2.unwrap_or(cfg.model_path2),
                    self.output_model_path.or(cfg.output_model_path),
                    shard,
                    Schedule::Operations(cfg.operations),
                )
            }
            None => {
                let values = self
                    .gradient_values
                    .ok_or_else(|| Error::usage("--gradient_values is required (or --config)"))?;
                let need = |v: Option<PathBuf>, flag: &str| {
                    v.ok_or_else(|| Error::usage(format!("{flag} is required (or --config)")))
                };
                (
                    need(self.model_path1, "--model_path1")?,
                    need(self.model_path2, "--model_path2")?,
                    self.output_model_path,
                    self.max_shard_size,
                    Schedule::Gradient(Operation {
                        operation: String::new(),
                        filter: self.custom_filter,
                        gradient_values: values,
                        layer_only: self.layer_only,
                        no_layers: self.no_layers,
                    }),
                )
            }
        };
        let output = output.ok_or_else(|| Error::usage("--output_model_path is required"))?;
        Ok(ResolvedBlockMerge {
            options: BlockMergeOptions {
                model1,
                model2,
                schedule,
                max_shard_size: shard.unwrap_or(DEFAULT_MAX_SHARD_SIZE),
                precise: self.precise,
                out_dtype: self.out_dtype,
                lora1: self.lora1,
                lora2: self.lora2,
                model_card: self.model_card,
                config_file,
            },
            output,
        })
    }

    fn check_exclusive(&self) -> Result<()> {
        if self.config.is_some() && self.gradient_values.is_some() {
            return Err(Error::usage("--gradient_values and --config are exclusive"));
        }
        // The YAML edition selects tensors per operation; these flags would be ignored.
        if self.config.is_some() {
            let ignored = [
                (self.layer_only, "--layer_only"),
                (self.no_layers, "--no_layers"),
                (self.custom_filter.is_some(), "--custom_filter"),
            ];
            if let Some((_, flag)) = ignored.iter().find(|(given, _)| *given) {
                return Err(Error::usage(format!(
                    "{flag} does not apply with --config: each operation of the config selects its own tensors (`layer_only`, `no_layers`, `filter`)"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_flags_are_refused_with_the_yaml_edition() {
        for (args, flag) in [
            (
                BlockMergeArgs {
                    layer_only: true,
                    ..BlockMergeArgs::default()
                },
                "--layer_only",
            ),
            (
                BlockMergeArgs {
                    no_layers: true,
                    ..BlockMergeArgs::default()
                },
                "--no_layers",
            ),
            (
                BlockMergeArgs {
                    custom_filter: Some("mlp".into()),
                    ..BlockMergeArgs::default()
                },
                "--custom_filter",
            ),
        ] {
            let args = BlockMergeArgs {
                config: Some("ops.yaml".into()),
                ..args
            };
            let e = args.resolve().unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().starts_with(flag), "{e}");
        }
    }
    use crate::error::ErrorKind;

    fn yaml(text: &str) -> YamlConfig {
        serde_yaml_ng::from_str(text).unwrap()
    }

    const OPS: &str = "model_path1: a\nmodel_path2: b\noutput_model_path: o\n\
                       max_shard_size: 100KB\noperations:\n  - {filter: mlp, gradient_values: [0.5]}\n";

    fn gradient_args() -> BlockMergeArgs {
        BlockMergeArgs {
            model_path1: Some("m1".into()),
            model_path2: Some("m2".into()),
            output_model_path: Some("out".into()),
            gradient_values: Some(vec![0.9, 0.0]),
            layer_only: true,
            custom_filter: Some("mlp".into()),
            ..Default::default()
        }
    }

    fn usage_message(r: Result<ResolvedBlockMerge>) -> String {
        let e = r.unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Usage(_)), "{e}");
        assert_eq!(e.exit_code(), 2);
        e.to_string()
    }

    #[test]
    fn gradient_edition_from_flags() {
        let lora = LoraSpec {
            path: "l".into(),
            weight: 0.25,
        };
        let r = BlockMergeArgs {
            precise: true,
            out_dtype: Some(DType::BF16),
            lora2: Some(lora.clone()),
            ..gradient_args()
        }
        .resolve()
        .unwrap();
        assert_eq!(r.output, PathBuf::from("out"));
        let o = r.options;
        assert_eq!((o.model1, o.model2), ("m1".into(), "m2".into()));
        assert_eq!(
            o.schedule,
            Schedule::Gradient(Operation {
                operation: String::new(),
                filter: Some("mlp".into()),
                gradient_values: vec![0.9, 0.0],
                layer_only: true,
                no_layers: false,
            })
        );
        assert_eq!(o.max_shard_size, 2000 * 1024 * 1024);
        assert!(o.precise);
        assert_eq!(o.out_dtype, Some(DType::BF16));
        assert_eq!((o.lora1, o.lora2), (None, Some(lora)));
    }

    #[test]
    fn yaml_values_are_used_when_no_flag_is_given() {
        let args = BlockMergeArgs {
            config: Some("ops.yml".into()),
            ..Default::default()
        };
        let r = args.resolve_with(Some(yaml(OPS))).unwrap();
        assert_eq!(r.output, PathBuf::from("o"));
        assert_eq!(r.options.model1, PathBuf::from("a"));
        assert_eq!(r.options.model2, PathBuf::from("b"));
        assert_eq!(r.options.max_shard_size, 100_000);
        let Schedule::Operations(ops) = r.options.schedule else {
            panic!("the YAML edition runs operations");
        };
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].filter.as_deref(), Some("mlp"));
    }

    #[test]
    fn flags_win_over_the_yaml() {
        let args = BlockMergeArgs {
            config: Some("ops.yml".into()),
            model_path1: Some("A".into()),
            model_path2: Some("B".into()),
            output_model_path: Some("O".into()),
            max_shard_size: Some(4096),
            ..Default::default()
        };
        let r = args.resolve_with(Some(yaml(OPS))).unwrap();
        assert_eq!(r.output, PathBuf::from("O"));
        assert_eq!(r.options.model1, PathBuf::from("A"));
        assert_eq!(r.options.model2, PathBuf::from("B"));
        assert_eq!(r.options.max_shard_size, 4096);
    }

    #[test]
    fn yaml_without_output_or_shard_size() {
        let text = "model_path1: a\nmodel_path2: b\noperations:\n  - {gradient_values: [0.5]}\n";
        let args = BlockMergeArgs {
            config: Some("ops.yml".into()),
            ..Default::default()
        };
        let msg = usage_message(args.clone().resolve_with(Some(yaml(text))));
        assert_eq!(msg, "--output_model_path is required");
        let r = BlockMergeArgs {
            output_model_path: Some("o".into()),
            ..args
        }
        .resolve_with(Some(yaml(text)))
        .unwrap();
        assert_eq!(r.options.max_shard_size, DEFAULT_MAX_SHARD_SIZE);
    }

    #[test]
    fn a_bad_yaml_shard_size_names_the_config() {
        let text = OPS.replace("100KB", "2000XB");
        let e = BlockMergeArgs {
            config: Some("ops.yml".into()),
            ..Default::default()
        }
        .resolve_with(Some(yaml(&text)))
        .unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.file, Some(PathBuf::from("ops.yml")));
        assert!(e.to_string().contains("unknown unit `XB`"), "{e}");
        // A flag replaces it, so the YAML's value is never parsed.
        let r = BlockMergeArgs {
            config: Some("ops.yml".into()),
            max_shard_size: Some(10),
            ..Default::default()
        }
        .resolve_with(Some(yaml(&text)))
        .unwrap();
        assert_eq!(r.options.max_shard_size, 10);
    }

    #[test]
    fn gradient_values_and_config_are_exclusive() {
        let args = BlockMergeArgs {
            config: Some("/nonexistent/ops.yml".into()),
            ..gradient_args()
        };
        let msg = "--gradient_values and --config are exclusive";
        assert_eq!(
            usage_message(args.clone().resolve_with(Some(yaml(OPS)))),
            msg
        );
        // Refused before the config is read: no error about the missing file.
        assert_eq!(usage_message(args.resolve()), msg);
    }

    #[test]
    fn missing_flags_without_config() {
        type Edit = fn(&mut BlockMergeArgs);
        let cases: [(Edit, &str); 4] = [
            (
                |a| a.gradient_values = None,
                "--gradient_values is required (or --config)",
            ),
            (
                |a| a.model_path1 = None,
                "--model_path1 is required (or --config)",
            ),
            (
                |a| a.model_path2 = None,
                "--model_path2 is required (or --config)",
            ),
            (
                |a| a.output_model_path = None,
                "--output_model_path is required",
            ),
        ];
        for (edit, msg) in cases {
            let mut a = gradient_args();
            edit(&mut a);
            assert_eq!(usage_message(a.resolve()), msg);
        }
    }

    #[test]
    fn a_missing_config_file_is_an_error_naming_it() {
        let e = BlockMergeArgs {
            config: Some("/nonexistent/ops.yml".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.file, Some(PathBuf::from("/nonexistent/ops.yml")));
    }
}
