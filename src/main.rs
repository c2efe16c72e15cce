//! The `mergestream` command line: parse arguments, build a plan, run it, report errors.
//! Everything else lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::{Args, Parser, Subcommand};

use mergestream::dtype::DType;
use mergestream::error::{Error, Result};
use mergestream::output;
use mergestream::pipeline::reader::IoMode;
use mergestream::pipeline::{INTERRUPTED, RunOptions, default_memory_limit};
use mergestream::plan::Plan;
use mergestream::plan::blockmerge::{
    BlockMergeOptions, Operation, Schedule, YamlConfig, plan_blockmerge,
};
use mergestream::plan::convert::{ConvertOptions, plan_convert};
use mergestream::plan::gradient::parse_gradient_list;
use mergestream::plan::lora::LoraSpec;
use mergestream::plan::lora_merge::{LoraOptions, plan_lora};
use mergestream::plan::mergekit::{MergeOptions, plan_merge};
use mergestream::units::{human, parse_size};

#[derive(Parser)]
#[command(
    name = "mergestream",
    version,
    about = "Merge LLM checkpoints by streaming them one tensor at a time"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Gradient merge of two models with BlockMerge_Gradient's semantics (bit-exact by default).
    Blockmerge(BlockMergeArgs),
    /// Apply a PEFT LoRA adapter to a model (PEFT merge_and_unload semantics).
    Lora(LoraArgs),
    /// Convert any checkpoint (PyTorch .bin, safetensors) to sharded safetensors.
    Convert(ConvertArgs),
    /// Run a mergekit YAML config unchanged (mergekit-yaml's argument order).
    Merge(MergeArgs),
    /// List a checkpoint's tensors (name, dtype, shape, bytes, file) and validate it.
    Inspect {
        /// A checkpoint folder or file.
        path: PathBuf,
    },
}

/// Options of every command that writes a model.
#[derive(Args)]
struct Common {
    /// Working-memory budget (e.g. 512MiB, 2GB); default: min(1 GiB, half the available RAM).
    #[arg(long)]
    memory_limit: Option<String>,
    /// Compute threads (default: one per core, plus one).
    #[arg(long)]
    threads: Option<usize>,
    /// How to read inputs: mmap, positional reads, or auto (read on network filesystems).
    #[arg(long, value_parser = ["auto", "mmap", "read"], default_value = "auto")]
    io: String,
    /// Dtype of the output's float tensors (float16, bfloat16, float32).
    #[arg(long)]
    out_dtype: Option<String>,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Print the plan, the output size and a peak-memory estimate; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// No progress bar or summary.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct BlockMergeArgs {
    /// First model (the base; its extra vocab rows, config and tokenizer are kept).
    #[arg(long = "model_path1", alias = "model-path1")]
    model_path1: Option<PathBuf>,
    /// Second model, blended in with the gradient's ratio.
    #[arg(long = "model_path2", alias = "model-path2")]
    model_path2: Option<PathBuf>,
    /// Output folder.
    #[arg(long = "output_model_path", alias = "output-model-path", short = 'o')]
    output_model_path: Option<PathBuf>,
    /// Gradient values, e.g. "[0.9,0.0]": model2's share along the selected tensors.
    #[arg(
        long = "gradient_values",
        alias = "gradient-values",
        allow_hyphen_values = true
    )]
    gradient_values: Option<String>,
    /// Only blend tensors whose names contain "layer".
    #[arg(long = "layer_only", alias = "layer-only")]
    layer_only: bool,
    /// Only blend tensors whose names do not contain "layer".
    #[arg(long = "no_layers", alias = "no-layers")]
    no_layers: bool,
    /// Only blend tensors whose names contain this string.
    #[arg(long = "custom_filter", alias = "custom-filter")]
    custom_filter: Option<String>,
    /// Output shard size (2000MiB, 5GB, 5B ...).
    #[arg(long = "max_shard_size", alias = "max-shard-size")]
    max_shard_size: Option<String>,
    /// BlockMerge_Gradient's YAML edition: model paths and a list of operations.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Blend in f32 and round once, instead of reproducing the original's fp16 arithmetic.
    #[arg(long)]
    precise: bool,
    /// LoRA adapter applied to model1 first (as a saved PEFT merge would be).
    #[arg(long)]
    lora1: Option<PathBuf>,
    #[arg(
        long = "lora1-weight",
        alias = "lora1_weight",
        default_value_t = 1.0,
        allow_hyphen_values = true
    )]
    lora1_weight: f64,
    /// LoRA adapter applied to model2 first (as a saved PEFT merge would be).
    #[arg(long)]
    lora2: Option<PathBuf>,
    #[arg(
        long = "lora2-weight",
        alias = "lora2_weight",
        default_value_t = 1.0,
        allow_hyphen_values = true
    )]
    lora2_weight: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct LoraArgs {
    /// The base model.
    #[arg(long)]
    base: PathBuf,
    /// The PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    lora: PathBuf,
    /// Multiplies the adapter's scaling.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    weight: f64,
    /// Output folder.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Output shard size (default 5GB, as transformers).
    #[arg(long = "max-shard-size", alias = "max_shard_size")]
    max_shard_size: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct ConvertArgs {
    /// A checkpoint folder or file.
    input: PathBuf,
    /// Output folder.
    output: PathBuf,
    /// Write float tensors in this dtype (float16, bfloat16, float32); default as stored.
    #[arg(long)]
    dtype: Option<String>,
    /// Output shard size (default 5GB, as transformers).
    #[arg(long = "max-shard-size", alias = "max_shard_size")]
    max_shard_size: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct MergeArgs {
    /// The mergekit YAML config (model paths relative to the working directory).
    config: PathBuf,
    /// Output folder.
    out: PathBuf,
    /// Output shard size in bytes; K, M, B suffixes as mergekit (default 5B).
    #[arg(long = "out-shard-size", aliases = ["out_shard_size", "max-shard-size"])]
    out_shard_size: Option<String>,
    /// Copy the base model's tokenizer files (default).
    #[arg(long, overrides_with = "no_copy_tokenizer")]
    copy_tokenizer: bool,
    #[arg(long)]
    no_copy_tokenizer: bool,
    /// Allow models of different architectures.
    #[arg(long)]
    allow_crimes: bool,
    /// Seed for DARE and DELLA masks.
    #[arg(long, default_value_t = 0)]
    random_seed: u64,
    /// Write README.md and mergekit_config.yml (default).
    #[arg(long, overrides_with = "no_write_model_card")]
    write_model_card: bool,
    #[arg(long)]
    no_write_model_card: bool,
    /// Cut vocabulary tensors to the smallest model's rows.
    #[arg(long)]
    unsafe_truncate_embeddings: bool,
    /// Accepted for compatibility; mergestream never unpickles eagerly.
    #[arg(long)]
    lazy_unpickle: bool,
    /// Accepted for compatibility; LoRAs are applied inside the stream, no cache is written.
    #[arg(long)]
    lora_merge_cache: Option<PathBuf>,
    /// mergekit's thread count; same as --threads.
    #[arg(long = "num-threads", short = 'j')]
    num_threads: Option<usize>,
    /// GPU and other mergekit options with no meaning here: accepted and ignored.
    #[arg(long)]
    cuda: bool,
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    low_cpu_memory: bool,
    #[arg(long)]
    read_to_gpu: bool,
    #[arg(long)]
    multi_gpu: bool,
    #[arg(long)]
    gpu_rich: bool,
    #[arg(long)]
    clone_tensors: bool,
    #[arg(long)]
    trust_remote_code: bool,
    #[arg(long)]
    safe_serialization: bool,
    #[arg(long)]
    async_write: bool,
    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // First signal: stop cleanly (the pipeline notices, the temporary folder is removed).
    // Second signal: the user insists; leave at once.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            output::abandon();
            eprintln!("error: interrupted twice; stopped at once, nothing was written");
            std::process::exit(130);
        }
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.report());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { path } => {
            print!("{}", mergestream::inspect::inspect(&path)?);
            Ok(())
        }
        Command::Blockmerge(args) => {
            let (plan, out) = blockmerge_plan(&args)?;
            execute(&plan, &out, &args.common)
        }
        Command::Convert(args) => {
            let dtype = match args.dtype.as_deref().or(args.common.out_dtype.as_deref()) {
                Some(s) => Some(DType::parse_float(s).ok_or_else(|| {
                    Error::usage(format!(
                        "--dtype `{s}`: expected float16, bfloat16 or float32"
                    ))
                })?),
                None => None,
            };
            let plan = plan_convert(&ConvertOptions {
                input: args.input.clone(),
                dtype,
                max_shard_size: shard_size(args.max_shard_size.as_deref(), "5GB")?,
            })?;
            execute(&plan, &args.output, &args.common)
        }
        Command::Merge(args) => {
            let ignored: Vec<&str> = [
                (args.cuda, "--cuda"),
                (args.device.is_some(), "--device"),
                (args.low_cpu_memory, "--low-cpu-memory"),
                (args.read_to_gpu, "--read-to-gpu"),
                (args.multi_gpu, "--multi-gpu"),
                (args.gpu_rich, "--gpu-rich"),
                (args.clone_tensors, "--clone-tensors"),
                (args.trust_remote_code, "--trust-remote-code"),
                (args.async_write, "--async-write"),
                (args.lora_merge_cache.is_some(), "--lora-merge-cache"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| *f)
            .collect();
            if !ignored.is_empty() && !args.common.quiet {
                eprintln!(
                    "note: {} ignored (mergestream runs on the CPU and applies LoRAs inside the stream)",
                    ignored.join(", ")
                );
            }
            let plan = plan_merge(&MergeOptions {
                config_path: args.config.clone(),
                max_shard_size: shard_size(args.out_shard_size.as_deref(), "5B")?,
                allow_crimes: args.allow_crimes,
                copy_tokenizer: !args.no_copy_tokenizer,
                write_model_card: !args.no_write_model_card,
                random_seed: args.random_seed,
                truncate_embeddings: args.unsafe_truncate_embeddings,
                out_dtype: out_dtype(&args.common)?,
            })?;
            let mut common = args.common;
            if common.threads.is_none() {
                common.threads = args.num_threads;
            }
            execute(&plan, &args.out, &common)
        }
        Command::Lora(args) => {
            let plan = plan_lora(&LoraOptions {
                base: args.base.clone(),
                lora: LoraSpec {
                    path: args.lora.clone(),
                    weight: args.weight,
                },
                max_shard_size: shard_size(args.max_shard_size.as_deref(), "5GB")?,
                out_dtype: out_dtype(&args.common)?,
            })?;
            execute(&plan, &args.output, &args.common)
        }
    }
}

fn shard_size(given: Option<&str>, default: &str) -> Result<u64> {
    parse_size(given.unwrap_or(default)).map_err(|e| Error::usage(format!("--max-shard-size: {e}")))
}

fn out_dtype(c: &Common) -> Result<Option<DType>> {
    c.out_dtype
        .as_deref()
        .map(|s| {
            DType::parse_float(s).ok_or_else(|| {
                Error::usage(format!(
                    "--out-dtype `{s}`: expected float16, bfloat16 or float32"
                ))
            })
        })
        .transpose()
}

fn blockmerge_plan(a: &BlockMergeArgs) -> Result<(Plan, PathBuf)> {
    let yaml = a.config.as_deref().map(YamlConfig::load).transpose()?;
    let lora = |p: &Option<PathBuf>, w: f64| p.clone().map(|path| LoraSpec { path, weight: w });
    let (model1, model2, out, shard, schedule) = match yaml {
        Some(cfg) => {
            if a.gradient_values.is_some() {
                return Err(Error::usage("--gradient_values and --config are exclusive"));
            }
            let shard = a
                .max_shard_size
                .as_deref()
                .map(|s| shard_size(Some(s), ""))
                .transpose()?
                .or(cfg.max_shard_size_bytes(a.config.as_deref().unwrap_or(Path::new("")))?);
            (
                a.model_path1.clone().unwrap_or(cfg.model_path1),
                a.model_path2.clone().unwrap_or(cfg.model_path2),
                a.output_model_path.clone().or(cfg.output_model_path),
                shard,
                Schedule::Operations(cfg.operations),
            )
        }
        None => {
            let need = |v: &Option<PathBuf>, flag: &str| {
                v.clone()
                    .ok_or_else(|| Error::usage(format!("{flag} is required (or --config)")))
            };
            let text = a
                .gradient_values
                .as_deref()
                .ok_or_else(|| Error::usage("--gradient_values is required (or --config)"))?;
            let values = parse_gradient_list(text)
                .map_err(|e| Error::invalid(format!("--gradient_values: {e}")))?;
            (
                need(&a.model_path1, "--model_path1")?,
                need(&a.model_path2, "--model_path2")?,
                a.output_model_path.clone(),
                a.max_shard_size
                    .as_deref()
                    .map(|s| shard_size(Some(s), ""))
                    .transpose()?,
                Schedule::Gradient(Operation {
                    operation: String::new(),
                    filter: a.custom_filter.clone(),
                    gradient_values: values,
                    layer_only: a.layer_only,
                    no_layers: a.no_layers,
                }),
            )
        }
    };
    let out = out.ok_or_else(|| Error::usage("--output_model_path is required"))?;
    let plan = plan_blockmerge(&BlockMergeOptions {
        model1,
        model2,
        schedule,
        max_shard_size: match shard {
            Some(s) => s,
            None => shard_size(None, "2000MiB")?,
        },
        precise: a.precise,
        out_dtype: out_dtype(&a.common)?,
        lora1: lora(&a.lora1, a.lora1_weight),
        lora2: lora(&a.lora2, a.lora2_weight),
    })?;
    Ok((plan, out))
}

fn execute(plan: &Plan, out: &std::path::Path, c: &Common) -> Result<()> {
    let memory_limit = match &c.memory_limit {
        Some(s) => parse_size(s).map_err(|e| Error::usage(format!("--memory-limit: {e}")))?,
        None => default_memory_limit(),
    };
    if c.dry_run {
        print!("{}", plan.describe(memory_limit));
        return Ok(());
    }
    let opts = RunOptions {
        memory_limit,
        threads: c
            .threads
            .unwrap_or_else(mergestream::pipeline::default_threads)
            .max(1),
        io: match c.io.as_str() {
            "mmap" => IoMode::Mmap,
            "read" => IoMode::Read,
            _ => IoMode::Auto,
        },
        progress: !c.quiet,
    };
    let stats = output::run(plan, out, c.force, &opts)?;
    if !c.quiet {
        eprintln!(
            "wrote {} ({} tensors) to {} in {:.2}s; peak working memory {}",
            human(stats.bytes_written),
            plan.steps.len(),
            out.display(),
            stats.elapsed.as_secs_f64(),
            human(stats.peak_budget)
        );
    }
    Ok(())
}
