//! The `mergestream` command line: parse arguments, build a plan, run it, report errors.
//! Everything else lives in the library.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use mergestream::dtype::DType;
use mergestream::error::{Error, Result};
use mergestream::output;
use mergestream::pipeline::reader::IoMode;
use mergestream::pipeline::{RunOptions, WriteMode, default_memory_limit};
use mergestream::plan::Plan;
use mergestream::plan::blockmerge::plan_blockmerge;
use mergestream::plan::blockmerge_args::BlockMergeArgs;
use mergestream::plan::card::{self, CardRequest};
use mergestream::plan::convert::{ConvertOptions, plan_convert};
use mergestream::plan::extract_lora::{ExtractOptions, plan_extract_lora};
use mergestream::plan::gradient::GradientList;
use mergestream::plan::lora::LoraSpec;
use mergestream::plan::lora_merge::{LoraOptions, plan_lora};
use mergestream::plan::mergekit::{MergeOptions, plan_merge};
use mergestream::units::{ByteSize, human};

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
    Blockmerge(BlockMergeFlags),
    /// Apply a PEFT LoRA adapter to a model (PEFT merge_and_unload semantics).
    Lora(LoraArgs),
    /// Convert any checkpoint (PyTorch .bin, safetensors) to sharded safetensors.
    Convert(ConvertArgs),
    /// Run a mergekit YAML config unchanged (mergekit-yaml's argument order).
    Merge(MergeArgs),
    /// Extract a LoRA adapter from a fine-tune and its base by truncated SVD of each weight
    /// difference (mergekit-extract-lora's flags).
    ExtractLora(ExtractLoraArgs),
    /// List a checkpoint's tensors (name, dtype, shape, bytes, file) and validate it.
    Inspect {
        /// A checkpoint folder or file.
        path: PathBuf,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Compare two checkpoints tensor by tensor (max |a-b|, ulps, relative L2, cosine).
    ///
    /// Exit status: 0 when they match (bitwise, or within --ulps), 1 when they differ (the
    /// report says how) or on an error (then one `error:` line on stderr and no report).
    Diff(DiffArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on standard output.
    Man,
}

/// `mergestream diff A B`.
#[derive(Args)]
struct DiffArgs {
    /// The model to check: a folder, a checkpoint file, a Hub repo, a URL or an s3:// prefix.
    a: PathBuf,
    /// The model it is compared with (relative L2 is ||a-b|| / ||b||).
    b: PathBuf,
    /// Count float tensors of the same dtype as matching when no element differs by more
    /// than N units in the last place.
    #[arg(long, value_name = "N")]
    ulps: Option<u64>,
    /// Print the report as one JSON document.
    #[arg(long)]
    json: bool,
    /// Draw a heatmap of relative difference by layer and module (.png or .svg).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Print only the summary line (text report), and no progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Bytes of both models' chunks in flight (e.g. 512MiB); default: min(1 GiB, half the
    /// available RAM).
    #[arg(long)]
    memory_limit: Option<ByteSize>,
    /// Compare threads (default: one per core, plus one).
    #[arg(long)]
    threads: Option<usize>,
    /// How to read inputs: mmap, positional reads, or auto (read on network filesystems).
    #[arg(long, value_enum, default_value_t = Io::Auto)]
    io: Io,
}

/// Options of every command that writes a model.
#[derive(Args)]
struct Common {
    /// Working-memory budget (e.g. 512MiB, 2GB); default: min(1 GiB, half the available RAM).
    #[arg(long)]
    memory_limit: Option<ByteSize>,
    /// Compute threads (default: one per core, plus one).
    #[arg(long)]
    threads: Option<usize>,
    /// How to read inputs: mmap, positional reads, or auto (read on network filesystems).
    #[arg(long, value_enum, default_value_t = Io::Auto)]
    io: Io,
    /// How to write the output: around the page cache (direct), through it (buffered), or
    /// auto (direct where the filesystem allows it, buffered on network filesystems).
    #[arg(long, value_enum, default_value_t = WriteArg::Auto)]
    write: WriteArg,
    /// Dtype of the output's float tensors (float16, bfloat16, float32).
    #[arg(long, value_parser = float_dtype)]
    out_dtype: Option<DType>,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Print the plan, the output size and a peak-memory estimate; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: print the plan as one JSON document.
    #[arg(long, requires = "dry_run")]
    json: bool,
    /// No progress bar or summary.
    #[arg(long, short)]
    quiet: bool,
    /// Store Hub files in the Hugging Face cache as they are read (complete files only), so
    /// the next run of the same models is local.
    #[arg(long)]
    cache: bool,
    /// Start over even when a killed run of the same merge left its work beside the output
    /// (by default the run continues it; see "Failure behaviour" in the README).
    #[arg(long)]
    no_resume: bool,
    /// How much finished output may wait before it is flushed and recorded for resuming: at
    /// most this much (or 30 s of work) is redone after a crash.
    #[arg(long, default_value = "1GiB")]
    journal_every: ByteSize,
}

/// `--io`, checked by clap; the library's [`IoMode`] stays free of CLI concerns.
#[derive(Clone, Copy, ValueEnum)]
enum Io {
    /// mmap, except on network filesystems (NFS, SMB, FUSE), where positional reads.
    Auto,
    /// Map the inputs, releasing each chunk after use.
    Mmap,
    /// Positional reads only.
    Read,
}

impl From<Io> for IoMode {
    fn from(io: Io) -> IoMode {
        match io {
            Io::Auto => IoMode::Auto,
            Io::Mmap => IoMode::Mmap,
            Io::Read => IoMode::Read,
        }
    }
}

/// `--write`, checked by clap.
#[derive(Clone, Copy, ValueEnum)]
enum WriteArg {
    /// Direct, except on network filesystems or where the filesystem refuses it.
    Auto,
    /// `O_DIRECT`: the output never fills the page cache; an error where unsupported.
    Direct,
    /// Through the page cache (`pwrite`).
    Buffered,
}

impl From<WriteArg> for WriteMode {
    fn from(w: WriteArg) -> WriteMode {
        match w {
            WriteArg::Auto => WriteMode::Auto,
            WriteArg::Direct => WriteMode::Direct,
            WriteArg::Buffered => WriteMode::Buffered,
        }
    }
}

/// `--write-model-card` / `--no-write-model-card` (mergekit-yaml's spellings), for every
/// command that writes a model.
#[derive(Args)]
#[command(args_override_self = true)]
struct CardFlags {
    /// Write README.md, a model card the Hugging Face Hub reads (default; `merge` also
    /// writes mergekit_config.yml).
    #[arg(long, overrides_with = "no_write_model_card")]
    write_model_card: bool,
    /// Write no model card.
    #[arg(long, overrides_with = "write_model_card")]
    no_write_model_card: bool,
}

impl CardFlags {
    /// What the card needs from the command line: the arguments as typed and the output's
    /// name. `None` when no card is wanted.
    fn request(&self, output: &Path) -> Option<CardRequest> {
        (!self.no_write_model_card).then(|| CardRequest {
            name: output.file_name().map(|n| n.to_string_lossy().into_owned()),
            command_line: Some(card::command_line(std::env::args_os().skip(1))),
        })
    }
}

fn float_dtype(s: &str) -> std::result::Result<DType, String> {
    DType::parse_float(s).ok_or_else(|| "expected float16, bfloat16 or float32".to_string())
}

#[derive(Args)]
struct BlockMergeFlags {
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
    gradient_values: Option<GradientList>,
    /// Only blend tensors whose names contain "layer".
    #[arg(long = "layer_only", alias = "layer-only")]
    layer_only: bool,
    /// Only blend tensors whose names do not contain "layer".
    #[arg(long = "no_layers", alias = "no-layers")]
    no_layers: bool,
    /// Only blend tensors whose names contain this string.
    #[arg(long = "custom_filter", alias = "custom-filter")]
    custom_filter: Option<String>,
    /// Output shard size (2000MiB, 5GB, 5B ...; default 2000MiB, or the config's).
    #[arg(long = "max_shard_size", alias = "max-shard-size")]
    max_shard_size: Option<ByteSize>,
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
    card: CardFlags,
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
    /// Output shard size (2000MiB, 5GB, bytes ...; the default is transformers').
    #[arg(
        long = "max-shard-size",
        alias = "max_shard_size",
        default_value = "5GB"
    )]
    max_shard_size: ByteSize,
    #[command(flatten)]
    card: CardFlags,
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
    #[arg(long, value_parser = float_dtype)]
    dtype: Option<DType>,
    /// Output shard size (2000MiB, 5GB, bytes ...; the default is transformers').
    #[arg(
        long = "max-shard-size",
        alias = "max_shard_size",
        default_value = "5GB"
    )]
    max_shard_size: ByteSize,
    #[command(flatten)]
    card: CardFlags,
    #[command(flatten)]
    common: Common,
}

/// mergekit-yaml's command line: every option it accepts, with `--no-` forms, and a repeated
/// option taking its last value, as click does.
#[derive(Args)]
#[command(args_override_self = true)]
struct MergeArgs {
    /// The mergekit YAML config (model paths relative to the working directory).
    config: PathBuf,
    /// Output folder.
    out: PathBuf,
    /// Output shard size in bytes; K, M, B suffixes as mergekit (the default is mergekit's).
    #[arg(
        long = "out-shard-size",
        aliases = ["out_shard_size", "max-shard-size"],
        default_value = "5B"
    )]
    out_shard_size: ByteSize,
    /// Copy the base model's tokenizer files (default).
    #[arg(long, overrides_with = "no_copy_tokenizer")]
    copy_tokenizer: bool,
    #[arg(long, overrides_with = "copy_tokenizer")]
    no_copy_tokenizer: bool,
    /// Allow models of different architectures.
    #[arg(long, overrides_with = "no_allow_crimes")]
    allow_crimes: bool,
    #[arg(long, overrides_with = "allow_crimes")]
    no_allow_crimes: bool,
    /// Seed for DARE and DELLA masks.
    #[arg(long, default_value_t = 0)]
    random_seed: u64,
    #[command(flatten)]
    card: CardFlags,
    /// Cut vocabulary tensors to the smallest model's rows.
    #[arg(long, overrides_with = "no_unsafe_truncate_embeddings")]
    unsafe_truncate_embeddings: bool,
    #[arg(long, overrides_with = "unsafe_truncate_embeddings")]
    no_unsafe_truncate_embeddings: bool,
    /// The Hugging Face cache for models named as Hub repos (default: $HF_HUB_CACHE, …).
    #[arg(long)]
    transformers_cache: Option<PathBuf>,
    /// Dtype a `model+lora` input is patched in before the merge (default: as stored).
    #[arg(long, value_parser = float_dtype)]
    lora_merge_dtype: Option<DType>,
    /// mergekit's thread count; same as --threads.
    #[arg(long = "num-threads", short = 'j')]
    num_threads: Option<usize>,
    /// mergekit's log verbosity (-v, -vv): -v prints the plan before running.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbosity: u8,
    /// mergekit's --no-quiet: progress and summary (the default).
    #[arg(long, overrides_with = "quiet")]
    no_quiet: bool,
    // mergekit options with no effect here; each one's note says why (see `ignored_note`).
    #[arg(long, overrides_with = "no_lazy_unpickle")]
    lazy_unpickle: bool,
    #[arg(long, overrides_with = "lazy_unpickle")]
    no_lazy_unpickle: bool,
    #[arg(long)]
    lora_merge_cache: Option<PathBuf>,
    #[arg(long, overrides_with = "no_cuda")]
    cuda: bool,
    #[arg(long, overrides_with = "cuda")]
    no_cuda: bool,
    #[arg(long)]
    device: Option<String>,
    #[arg(long, overrides_with = "no_low_cpu_memory")]
    low_cpu_memory: bool,
    #[arg(long, overrides_with = "low_cpu_memory")]
    no_low_cpu_memory: bool,
    #[arg(long, overrides_with = "no_read_to_gpu")]
    read_to_gpu: bool,
    #[arg(long, overrides_with = "read_to_gpu")]
    no_read_to_gpu: bool,
    #[arg(long, overrides_with = "no_multi_gpu")]
    multi_gpu: bool,
    #[arg(long, overrides_with = "multi_gpu")]
    no_multi_gpu: bool,
    #[arg(long)]
    gpu_rich: bool,
    #[arg(long, overrides_with = "no_clone_tensors")]
    clone_tensors: bool,
    #[arg(long, overrides_with = "clone_tensors")]
    no_clone_tensors: bool,
    #[arg(long, overrides_with = "no_trust_remote_code")]
    trust_remote_code: bool,
    #[arg(long, overrides_with = "trust_remote_code")]
    no_trust_remote_code: bool,
    #[arg(long, overrides_with = "no_safe_serialization")]
    safe_serialization: bool,
    #[arg(long, overrides_with = "safe_serialization")]
    no_safe_serialization: bool,
    #[arg(long, overrides_with = "no_async_write")]
    async_write: bool,
    #[arg(long, overrides_with = "async_write")]
    no_async_write: bool,
    #[arg(long)]
    write_threads: Option<usize>,
    #[command(flatten)]
    common: Common,
}

impl MergeArgs {
    /// One note line per mergekit option given that has no effect here, each with its own
    /// reason (options that only select the default say nothing).
    fn ignored_notes(&self) -> Vec<String> {
        let gpu = [
            (self.cuda, "--cuda"),
            (
                self.device.as_deref().is_some_and(|d| d != "cpu"),
                "--device",
            ),
            (self.low_cpu_memory, "--low-cpu-memory"),
            (self.read_to_gpu, "--read-to-gpu"),
            (self.multi_gpu, "--multi-gpu"),
            (self.gpu_rich, "--gpu-rich"),
        ];
        let mut notes = Vec::new();
        let given: Vec<&str> = gpu.iter().filter(|(on, _)| *on).map(|(_, f)| *f).collect();
        if !given.is_empty() {
            notes.push(format!(
                "{} ignored: mergestream computes on the CPU, streaming within --memory-limit",
                given.join(", ")
            ));
        }
        let single: [(bool, &str, &str); 6] = [
            (
                self.lazy_unpickle,
                "--lazy-unpickle",
                "PyTorch .bin files are always read lazily, tensor by tensor",
            ),
            (
                self.lora_merge_cache.is_some(),
                "--lora-merge-cache",
                "LoRAs are applied inside the stream; no merged copy is written",
            ),
            (
                self.clone_tensors,
                "--clone-tensors",
                "every output tensor is written as its own copy already",
            ),
            (
                self.trust_remote_code,
                "--trust-remote-code",
                "no model code is ever run; only configs and weights are read",
            ),
            (
                self.async_write || self.write_threads.is_some(),
                if self.async_write {
                    "--async-write"
                } else {
                    "--write-threads"
                },
                "every compute worker writes its own chunks in place",
            ),
            (
                self.no_safe_serialization,
                "--no-safe-serialization",
                "the output is always safetensors (no pickles)",
            ),
        ];
        for (on, flag, why) in single {
            if on {
                notes.push(format!("{flag} ignored: {why}"));
            }
        }
        notes
    }
}

/// mergekit-extract-lora 0.1.5's flags, spelled as it spells them.
#[derive(Args)]
struct ExtractLoraArgs {
    /// Fine-tuned model.
    #[arg(long)]
    model: String,
    /// Base model.
    #[arg(long = "base-model", alias = "base_model")]
    base_model: String,
    /// Output folder for the adapter.
    #[arg(long = "out-path", alias = "out_path", short = 'o')]
    out_path: String,
    /// Largest rank of each LoRA pair.
    #[arg(long = "max-rank", default_value_t = 128, allow_hyphen_values = true)]
    max_rank: i64,
    /// √S on both factors (the default).
    #[arg(long = "distribute-scale", overrides_with = "no_distribute_scale")]
    distribute_scale: bool,
    /// All of S on lora_A, lora_B = U.
    #[arg(long = "no-distribute-scale")]
    no_distribute_scale: bool,
    /// Decompose embeddings too (lora_embedding_A/B; lm_head as a linear layer).
    #[arg(long = "embed-lora", overrides_with = "no_embed_lora")]
    embed_lora: bool,
    /// Save embeddings and lm_head whole in modules_to_save (the default).
    #[arg(long = "no-embed-lora")]
    no_embed_lora: bool,
    /// Save this module whole (full name or last component, e.g. lm_head); repeatable.
    #[arg(long = "save-module")]
    save_module: Vec<String>,
    /// Leave out modules whose name matches this regex; repeatable.
    #[arg(long = "exclude-regex", short = 'e')]
    exclude_regex: Vec<String>,
    /// Only decompose modules whose name matches one of these regexes; repeatable.
    #[arg(long = "include-regex", short = 'i')]
    include_regex: Vec<String>,
    /// Drop singular values at or below this.
    #[arg(long = "sv-epsilon", default_value_t = 0.0, allow_hyphen_values = true)]
    sv_epsilon: f64,
    /// Skip modules that cannot be decomposed instead of saving them whole.
    #[arg(long = "skip-undecomposable")]
    skip_undecomposable: bool,
    /// Accepted for compatibility: the SVD is deterministic, there is nothing to seed.
    #[arg(long = "random-seed", allow_hyphen_values = true)]
    random_seed: Option<i64>,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// How to read inputs: mmap, positional reads, or auto.
    #[arg(long, value_enum, default_value_t = Io::Auto)]
    io: Io,
    /// No notes or summary (--no-quiet: the default).
    #[arg(long, short, overrides_with = "no_quiet")]
    quiet: bool,
    #[arg(long = "no-quiet", hide = true)]
    no_quiet: bool,
    /// mergekit's logging verbosity: accepted, no effect.
    #[arg(short = 'v', action = clap::ArgAction::Count, hide = true)]
    verbosity: u8,
    /// mergekit options with no meaning here (GPU, threads, caches, write modes): accepted
    /// and ignored with a note.
    #[command(flatten)]
    ignored: MergekitIgnored,
}

/// mergekit's common options that change nothing about an extracted adapter here.
#[derive(Args)]
struct MergekitIgnored {
    #[arg(long, hide = true)]
    cuda: bool,
    #[arg(long = "no-cuda", hide = true)]
    no_cuda: bool,
    #[arg(long, hide = true)]
    device: Option<String>,
    #[arg(long = "low-cpu-memory", alias = "no-low-cpu-memory", hide = true)]
    low_cpu_memory: bool,
    #[arg(long = "read-to-gpu", alias = "no-read-to-gpu", hide = true)]
    read_to_gpu: bool,
    #[arg(long = "multi-gpu", alias = "no-multi-gpu", hide = true)]
    multi_gpu: bool,
    #[arg(long = "gpu-rich", hide = true)]
    gpu_rich: bool,
    #[arg(long = "num-threads", short = 'j', hide = true)]
    num_threads: Option<usize>,
    #[arg(long = "write-threads", hide = true)]
    write_threads: Option<usize>,
    #[arg(long = "async-write", alias = "no-async-write", hide = true)]
    async_write: bool,
    #[arg(long = "lazy-unpickle", alias = "no-lazy-unpickle", hide = true)]
    lazy_unpickle: bool,
    #[arg(long = "clone-tensors", alias = "no-clone-tensors", hide = true)]
    clone_tensors: bool,
    #[arg(
        long = "trust-remote-code",
        alias = "no-trust-remote-code",
        hide = true
    )]
    trust_remote_code: bool,
    #[arg(long = "allow-crimes", alias = "no-allow-crimes", hide = true)]
    allow_crimes: bool,
    #[arg(
        long = "unsafe-truncate-embeddings",
        alias = "no-unsafe-truncate-embeddings",
        hide = true
    )]
    unsafe_truncate_embeddings: bool,
    #[arg(long = "copy-tokenizer", alias = "no-copy-tokenizer", hide = true)]
    copy_tokenizer: bool,
    #[arg(long = "write-model-card", alias = "no-write-model-card", hide = true)]
    write_model_card: bool,
    #[arg(long = "safe-serialization", hide = true)]
    safe_serialization: bool,
    #[arg(long = "no-safe-serialization", hide = true)]
    no_safe_serialization: bool,
    #[arg(long = "transformers-cache", hide = true)]
    transformers_cache: Option<String>,
    #[arg(long = "lora-merge-cache", hide = true)]
    lora_merge_cache: Option<String>,
    #[arg(long = "lora-merge-dtype", hide = true)]
    lora_merge_dtype: Option<String>,
    #[arg(long = "out-shard-size", hide = true)]
    out_shard_size: Option<String>,
}

impl MergekitIgnored {
    /// The flags given, as the note names them. (mergekit's extract-lora itself ignores
    /// --allow-crimes, --copy-tokenizer, --write-model-card, --out-shard-size and
    /// --unsafe-truncate-embeddings; they are accepted silently.)
    fn given(&self) -> Vec<&'static str> {
        [
            (self.cuda || self.no_cuda, "--cuda"),
            (self.device.is_some(), "--device"),
            (self.low_cpu_memory, "--low-cpu-memory"),
            (self.read_to_gpu, "--read-to-gpu"),
            (self.multi_gpu, "--multi-gpu"),
            (self.gpu_rich, "--gpu-rich"),
            (self.num_threads.is_some(), "--num-threads"),
            (self.write_threads.is_some(), "--write-threads"),
            (self.async_write, "--async-write"),
            (self.lazy_unpickle, "--lazy-unpickle"),
            (self.clone_tensors, "--clone-tensors"),
            (self.trust_remote_code, "--trust-remote-code"),
            (self.no_safe_serialization, "--no-safe-serialization"),
            (self.transformers_cache.is_some(), "--transformers-cache"),
            (self.lora_merge_cache.is_some(), "--lora-merge-cache"),
            (self.lora_merge_dtype.is_some(), "--lora-merge-dtype"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| *f)
        .collect()
    }
}

impl Cli {
    /// Whether the command asked to store Hub files in the HF cache.
    fn cache(&self) -> bool {
        match &self.command {
            Command::Blockmerge(a) => a.common.cache,
            Command::Lora(a) => a.common.cache,
            Command::Convert(a) => a.common.cache,
            Command::Merge(a) => a.common.cache,
            Command::ExtractLora(_) | Command::Inspect { .. } => false,
            Command::Diff(_) | Command::Completions { .. } | Command::Man => false,
        }
    }

    /// The HF cache folder the command names (mergekit's `--transformers-cache`).
    fn hub_cache(&self) -> Option<PathBuf> {
        match &self.command {
            Command::Merge(a) => a.transformers_cache.clone(),
            _ => None,
        }
    }

    /// Whether the command asked for no chatter on stderr.
    fn quiet(&self) -> bool {
        match &self.command {
            Command::Blockmerge(a) => a.common.quiet,
            Command::Lora(a) => a.common.quiet,
            Command::Convert(a) => a.common.quiet,
            Command::Merge(a) => a.common.quiet,
            Command::ExtractLora(a) => a.quiet,
            Command::Inspect { .. } => false,
            Command::Diff(a) => a.quiet || a.json,
            Command::Completions { .. } | Command::Man => true,
        }
    }
}

fn main() -> ExitCode {
    // A file-size limit (`ulimit -f`) must surface as EFBIG, reported like a full disk, not
    // kill the process and leave its staging folder behind.
    // SAFETY: setting a signal's disposition to "ignore" has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::try_parse().unwrap_or_else(|e| as_typed(e, std::env::args_os()).exit());
    // First signal: stop cleanly (the pipeline notices, the temporary folder is removed).
    // Second signal: the user insists; leave at once. Writes to stderr may fail (a closed
    // pipe): ignored, never a panic.
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    // Model references read the environment once; remote reads stop on the same interrupt.
    mergestream::source::set_environment(
        mergestream::source::Environment::from_env()
            .with_cancel(Arc::clone(&cancel))
            .with_cache(cli.cache())
            .with_hub_cache(cli.hub_cache()),
    );
    let quiet = cli.quiet();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // Waits for a commit that has begun: never half an output, never an empty one.
            let message = if output::abandon() {
                "error: interrupted twice; stopped at once, nothing was written"
            } else {
                "error: interrupted twice; stopped at once"
            };
            let _ = writeln!(std::io::stderr(), "{message}");
            std::process::exit(130);
        }
        if !quiet {
            let _ = writeln!(
                std::io::stderr(),
                "interrupted: stopping, nothing will be written (interrupt again to stop at once)"
            );
        }
    });
    match run(cli, cancel) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Nowhere to report a failing stderr: the exit status still says it.
            let _ = writeln!(std::io::stderr(), "error: {}", e.report());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Print a command's result on stdout. A reader that went away (`| head`) ends the program
/// quietly, as Unix tools do; any other failure (a full disk) is an error.
fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Error::io("cannot write to standard output", e)),
    }
}

/// A note on stderr; a stderr that cannot be written to must not fail the run.
fn note(text: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// clap names a flag by its main spelling; name it as the user typed it (`--max-shard-size`
/// for blockmerge's `--max_shard_size`, `-j` for `--num-threads`), so the user finds it in
/// the command they wrote.
fn as_typed(mut err: clap::Error, argv: impl Iterator<Item = OsString>) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return err;
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        err.get(ContextKind::InvalidArg),
        err.get(ContextKind::InvalidValue),
    ) else {
        return err;
    };
    let (arg, value) = (arg.clone(), value.clone());
    let (named, rest) = arg.split_once(' ').unwrap_or((&arg, ""));
    let args: Vec<String> = argv
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let cmd = Cli::command();
    let Some(sub) = args.first().and_then(|name| cmd.find_subcommand(name)) else {
        return err;
    };
    let is_named = |a: &&clap::Arg| {
        a.get_long().is_some_and(|l| named == format!("--{l}"))
            || a.get_short().is_some_and(|c| named == format!("-{c}"))
    };
    let Some(flag) = sub.get_arguments().find(is_named) else {
        return err;
    };
    let longs = flag
        .get_long()
        .into_iter()
        .chain(flag.get_all_aliases().unwrap_or_default());
    let shorts = flag
        .get_short()
        .into_iter()
        .chain(flag.get_all_short_aliases().unwrap_or_default());
    let spellings: Vec<(String, bool)> = longs
        .map(|l| (format!("--{l}"), false))
        .chain(shorts.map(|c| (format!("-{c}"), true)))
        .collect();
    // `--flag value`, `--flag=value`, `-jvalue`.
    let typed = args.iter().enumerate().find_map(|(i, t)| {
        spellings.iter().find_map(|(s, short)| {
            let rest = t.strip_prefix(s.as_str())?;
            let ok = (rest.is_empty() && args.get(i + 1) == Some(&value))
                || rest.strip_prefix('=') == Some(value.as_str())
                || (*short && rest == value);
            ok.then(|| s.clone())
        })
    });
    match typed {
        Some(t) if t != named => {
            let shown = if rest.is_empty() {
                t
            } else {
                format!("{t} {rest}")
            };
            err.insert(ContextKind::InvalidArg, ContextValue::String(shown));
            err
        }
        _ => err,
    }
}

fn run(cli: Cli, cancel: Arc<AtomicBool>) -> Result<()> {
    match cli.command {
        Command::ExtractLora(a) => extract_lora(a, &cancel),
        Command::Inspect { path, json } => {
            let text = if json {
                mergestream::inspect::inspect_json(&path)?
            } else {
                mergestream::inspect::inspect(&path)?
            };
            print_out(&text)?;
            Ok(())
        }
        Command::Diff(args) => run_diff(args, cancel),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mergestream", &mut out);
            print_out(&String::from_utf8_lossy(&out))
        }
        Command::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .map_err(|e| Error::io("cannot render the man page", e))?;
            print_out(&String::from_utf8_lossy(&out))
        }
        Command::Blockmerge(a) => {
            let lora = |path: Option<PathBuf>, weight| path.map(|path| LoraSpec { path, weight });
            let mut run = BlockMergeArgs {
                model_path1: a.model_path1,
                model_path2: a.model_path2,
                output_model_path: a.output_model_path,
                gradient_values: a.gradient_values.map(|g| g.0),
                layer_only: a.layer_only,
                no_layers: a.no_layers,
                custom_filter: a.custom_filter,
                max_shard_size: a.max_shard_size.map(ByteSize::bytes),
                config: a.config,
                precise: a.precise,
                out_dtype: a.common.out_dtype,
                lora1: lora(a.lora1, a.lora1_weight),
                lora2: lora(a.lora2, a.lora2_weight),
                model_card: None,
            }
            .resolve()?;
            // The output's name is known once a `--config` file is read.
            run.options.model_card = a.card.request(&run.output);
            let plan = plan_blockmerge(&run.options)?;
            execute(&plan, &run.output, &a.common, &cancel)
        }
        Command::Convert(args) => {
            let plan = plan_convert(&ConvertOptions {
                input: args.input.clone(),
                dtype: args.dtype.or(args.common.out_dtype),
                max_shard_size: args.max_shard_size.bytes(),
                model_card: args.card.request(&args.output),
            })?;
            execute(&plan, &args.output, &args.common, &cancel)
        }
        Command::Merge(args) => {
            if !args.common.quiet {
                for n in args.ignored_notes() {
                    note(format_args!("note: {n}"));
                }
            }
            let plan = plan_merge(&MergeOptions {
                config_path: args.config.clone(),
                max_shard_size: args.out_shard_size.bytes(),
                allow_crimes: args.allow_crimes,
                copy_tokenizer: !args.no_copy_tokenizer,
                model_card: args.card.request(&args.out),
                random_seed: args.random_seed,
                truncate_embeddings: args.unsafe_truncate_embeddings,
                out_dtype: args.common.out_dtype,
                lora_merge_dtype: args.lora_merge_dtype,
            })?;
            let mut common = args.common;
            if common.threads.is_none() {
                common.threads = args.num_threads;
            }
            if args.verbosity > 0 && !common.quiet && !common.dry_run {
                let limit = common
                    .memory_limit
                    .map_or_else(default_memory_limit, ByteSize::bytes);
                let estimate = mergestream::pipeline::chunking::peak_memory_estimate(&plan, limit);
                note(format_args!(
                    "{}",
                    plan.describe(estimate, limit).trim_end()
                ));
            }
            execute(&plan, &args.out, &common, &cancel)
        }
        Command::Lora(args) => {
            let plan = plan_lora(&LoraOptions {
                base: args.base.clone(),
                lora: LoraSpec {
                    path: args.lora.clone(),
                    weight: args.weight,
                },
                max_shard_size: args.max_shard_size.bytes(),
                out_dtype: args.common.out_dtype,
                model_card: args.card.request(&args.output),
            })?;
            execute(&plan, &args.output, &args.common, &cancel)
        }
    }
}

fn extract_lora(a: ExtractLoraArgs, cancel: &AtomicBool) -> Result<()> {
    let ignored = a.ignored.given();
    if !ignored.is_empty() && !a.quiet {
        note(format_args!(
            "note: {} ignored (mergestream extracts on the CPU, one module at a time, and writes safetensors)",
            ignored.join(", ")
        ));
    }
    // The README records the command as typed, as mergekit's does.
    let invocation = std::iter::once("mergestream".to_string())
        .chain(
            std::env::args_os()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    let plan = plan_extract_lora(&ExtractOptions {
        model: a.model,
        base_model: a.base_model,
        out_path: a.out_path.clone(),
        max_rank: a.max_rank,
        distribute_scale: !a.no_distribute_scale,
        embed_lora: a.embed_lora,
        save_modules: a.save_module,
        exclude_regexes: a.exclude_regex,
        include_regexes: a.include_regex,
        sv_epsilon: a.sv_epsilon,
        skip_undecomposable: a.skip_undecomposable,
        invocation,
    })?;
    if !a.quiet {
        for n in &plan.notes {
            note(format_args!("note: {n}"));
        }
    }
    let start = std::time::Instant::now();
    let out = Path::new(&a.out_path);
    let stats = output::run_extraction(&plan, out, a.force, a.io.into(), cancel)?;
    if !a.quiet {
        let max = stats.ranks.iter().map(|(_, r)| *r).max().unwrap_or(0);
        note(format_args!(
            "wrote a LoRA adapter of rank {max} ({} modules decomposed, {} saved whole; {} tensors, {}) to {} in {:.2}s",
            stats.ranks.len(),
            plan.jobs.len() - stats.ranks.len(),
            stats.tensors,
            human(stats.bytes_written),
            out.display(),
            start.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

fn execute(plan: &Plan, out: &Path, c: &Common, cancel: &Arc<AtomicBool>) -> Result<()> {
    let memory_limit = c
        .memory_limit
        .map_or_else(default_memory_limit, ByteSize::bytes);
    if c.dry_run {
        let estimate = mergestream::pipeline::chunking::peak_memory_estimate(plan, memory_limit);
        if c.json {
            let doc = plan.to_json(estimate, memory_limit);
            print_out(&(serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"))?;
        } else {
            print_out(&plan.describe(estimate, memory_limit))?;
        }
        return Ok(());
    }
    let opts = RunOptions {
        memory_limit,
        threads: c
            .threads
            .unwrap_or_else(mergestream::pipeline::default_threads)
            .max(1),
        io: c.io.into(),
        write: c.write.into(),
        progress: !c.quiet,
        cancel: Arc::clone(cancel),
        observer: None,
        resume: !c.no_resume,
        journal_every: c.journal_every.bytes(),
    };
    let stats = output::run(plan, out, c.force, &opts)?;
    if !c.quiet {
        for dir in &stats.swept_staging {
            note(format_args!(
                "note: removed {}, left by an earlier run that was killed",
                dir.display()
            ));
        }
        if let Some((tensors, bytes)) = stats.resumed {
            note(format_args!(
                "note: continued a killed run of this output: {tensors} tensors ({}) it had finished were kept",
                human(bytes)
            ));
        }
        let fetched = if stats.bytes_fetched > 0 {
            format!(
                "; fetched {} from remote inputs",
                human(stats.bytes_fetched)
            )
        } else {
            String::new()
        };
        // The output is committed: a failing stderr cannot make this run fail.
        note(format_args!(
            "wrote {} ({} tensors) to {} in {:.2}s; peak working memory {}{fetched}",
            human(stats.bytes_written),
            plan.steps.len(),
            out.display(),
            stats.elapsed.as_secs_f64(),
            human(stats.peak_budget)
        ));
    }
    Ok(())
}

/// `diff`: the report on stdout (text or JSON), the plot if asked; exit 1 when the models
/// differ. An error returns instead (one `error:` line, also exit 1, and no report).
fn run_diff(args: DiffArgs, cancel: Arc<AtomicBool>) -> Result<()> {
    use mergestream::diff::{DiffOptions, diff, plot};
    if let Some(p) = &args.plot {
        plot::check_path(p)?;
    }
    let a = mergestream::Model::open_reference(&args.a)?;
    let b = mergestream::Model::open_reference(&args.b)?;
    let opts = DiffOptions {
        memory_limit: args
            .memory_limit
            .map_or_else(default_memory_limit, ByteSize::bytes),
        io: args.io.into(),
        threads: args
            .threads
            .unwrap_or_else(mergestream::pipeline::default_threads)
            .max(1),
        ulps: args.ulps,
        cancel,
        progress: !args.quiet,
    };
    let report = diff(&a, &b, &opts)?;
    if let Some(p) = &args.plot {
        plot::write_plot(&report, p)?;
    }
    if args.json {
        print_out(&report.to_json())?;
    } else if args.quiet {
        print_out(&(report.summary_line() + "\n"))?;
    } else {
        print_out(&report.to_text())?;
    }
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}
