//! Synthetic Llama-shaped checkpoints for benchmarks, streamed to disk (never whole in RAM).
//!
//! ```sh
//! cargo run --release --example synth -- model --preset llama2-13b --layers 8 --seed 1 --out /tmp/a
//! cargo run --release --example synth -- lora --preset llama2-13b --layers 8 --rank 64 --out /tmp/l
//! ```
//!
//! Models are sharded like transformers writes them (`model-0000N-of-0000M.safetensors` +
//! index, 5 GB shards by default) with a config.json; LoRAs are PEFT-layout adapters on
//! every linear layer (f32 factors). Values are random with weight-like magnitudes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use mergestream::dtype::DType;
use mergestream::plan::layout::{LayoutItem, lay_out};
use mergestream::units::parse_size;

struct Preset {
    hidden: u64,
    intermediate: u64,
    vocab: u64,
    heads: u64,
    kv_heads: u64,
    layers: u64,
}

fn preset(name: &str) -> Preset {
    match name {
        "llama2-7b" => Preset {
            hidden: 4096,
            intermediate: 11008,
            vocab: 32000,
            heads: 32,
            kv_heads: 32,
            layers: 32,
        },
        "llama2-13b" => Preset {
            hidden: 5120,
            intermediate: 13824,
            vocab: 32000,
            heads: 40,
            kv_heads: 40,
            layers: 40,
        },
        "llama3-8b" => Preset {
            hidden: 4096,
            intermediate: 14336,
            vocab: 128256,
            heads: 32,
            kv_heads: 8,
            layers: 32,
        },
        "tiny" => Preset {
            hidden: 64,
            intermediate: 176,
            vocab: 512,
            heads: 4,
            kv_heads: 4,
            layers: 4,
        },
        other => die(&format!(
            "unknown preset {other} (llama2-7b, llama2-13b, llama3-8b, tiny)"
        )),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("synth: {msg}");
    std::process::exit(2)
}

/// (name, shape) of every tensor of a Llama model, in module order.
fn llama_tensors(p: &Preset) -> Vec<(String, Vec<u64>)> {
    let head_dim = p.hidden / p.heads;
    let kv = p.kv_heads * head_dim;
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![p.vocab, p.hidden],
    )];
    for l in 0..p.layers {
        let pre = format!("model.layers.{l}");
        v.push((
            format!("{pre}.self_attn.q_proj.weight"),
            vec![p.hidden, p.hidden],
        ));
        v.push((format!("{pre}.self_attn.k_proj.weight"), vec![kv, p.hidden]));
        v.push((format!("{pre}.self_attn.v_proj.weight"), vec![kv, p.hidden]));
        v.push((
            format!("{pre}.self_attn.o_proj.weight"),
            vec![p.hidden, p.hidden],
        ));
        v.push((
            format!("{pre}.mlp.gate_proj.weight"),
            vec![p.intermediate, p.hidden],
        ));
        v.push((
            format!("{pre}.mlp.up_proj.weight"),
            vec![p.intermediate, p.hidden],
        ));
        v.push((
            format!("{pre}.mlp.down_proj.weight"),
            vec![p.hidden, p.intermediate],
        ));
        v.push((format!("{pre}.input_layernorm.weight"), vec![p.hidden]));
        v.push((
            format!("{pre}.post_attention_layernorm.weight"),
            vec![p.hidden],
        ));
    }
    v.push(("model.norm.weight".to_string(), vec![p.hidden]));
    v.push(("lm_head.weight".to_string(), vec![p.vocab, p.hidden]));
    v
}

/// xorshift64*: fast, deterministic per seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Fill `buf` with random elements of `dtype`: magnitudes 2⁻⁷..2⁻³ (weight-like), or near 1
/// for norms.
fn fill(rng: &mut Rng, dtype: DType, norm: bool, buf: &mut [u8]) {
    match dtype {
        DType::F16 | DType::BF16 => {
            for c in buf.chunks_exact_mut(8) {
                let r = rng.next();
                for (k, h) in c.chunks_exact_mut(2).enumerate() {
                    let x = (r >> (16 * k)) as u16;
                    let bits = if dtype == DType::F16 {
                        let e: u16 = if norm {
                            14 + ((x >> 10) & 1)
                        } else {
                            8 + ((x >> 10) & 3)
                        };
                        (x & 0x8000) | (e << 10) | (x & 0x03FF)
                    } else {
                        let e: u16 = if norm {
                            126 + ((x >> 7) & 1)
                        } else {
                            120 + ((x >> 7) & 3)
                        };
                        (x & 0x8000) | (e << 7) | (x & 0x007F)
                    };
                    h.copy_from_slice(&bits.to_le_bytes());
                }
            }
        }
        DType::F32 => {
            for c in buf.chunks_exact_mut(4) {
                let x = rng.next() as u32;
                let e: u32 = if norm {
                    126 + ((x >> 23) & 1)
                } else {
                    120 + ((x >> 23) & 3)
                };
                let bits = (x & 0x8000_0000) | (e << 23) | (x & 0x007F_FFFF);
                c.copy_from_slice(&bits.to_le_bytes());
            }
        }
        _ => die("dtype must be f16, bf16 or f32"),
    }
}

/// Write `tensors` as safetensors shards + index into `dir`, streaming 8 MiB at a time.
fn write_checkpoint(
    dir: &Path,
    stem: &str,
    tensors: &[(String, Vec<u64>)],
    dtype: DType,
    shard: u64,
    seed: u64,
) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
    let items: Vec<LayoutItem<'_>> = tensors
        .iter()
        .map(|(n, s)| LayoutItem {
            name: n,
            dtype,
            shape: s,
            len: s.iter().product::<u64>() * dtype.bits() / 8,
        })
        .collect();
    let (shards, places) = lay_out(&items, shard, stem);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut buf = vec![0u8; 8 << 20];
    for (si, s) in shards.iter().enumerate() {
        let path = dir.join(&s.file_name);
        let mut f = BufWriter::new(
            File::create(&path).unwrap_or_else(|e| die(&format!("{}: {e}", path.display()))),
        );
        f.write_all(&s.header).unwrap();
        let mut members: Vec<usize> = (0..items.len())
            .filter(|&i| places[i].shard == si)
            .collect();
        members.sort_by_key(|&i| places[i].offset);
        for i in members {
            let norm = items[i].shape.len() == 1;
            let mut left = items[i].len as usize;
            while left > 0 {
                let n = left.min(buf.len());
                fill(&mut rng, dtype, norm, &mut buf[..n]);
                f.write_all(&buf[..n])
                    .unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
                left -= n;
            }
        }
        f.flush().unwrap();
    }
    if shards.len() > 1 {
        let total: u64 = items.iter().map(|i| i.len).sum();
        let map: serde_json::Map<String, serde_json::Value> = items
            .iter()
            .zip(&places)
            .map(|(it, p)| {
                (
                    it.name.to_string(),
                    shards[p.shard].file_name.clone().into(),
                )
            })
            .collect();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
        std::fs::write(
            dir.join(format!("{stem}.safetensors.index.json")),
            index.to_string(),
        )
        .unwrap();
    }
}

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind = args.first().cloned().unwrap_or_default();
    let p = {
        let mut p = preset(&arg(&args, "--preset").unwrap_or_else(|| "llama2-13b".into()));
        if let Some(l) = arg(&args, "--layers") {
            p.layers = l.parse().unwrap_or_else(|_| die("--layers N"));
        }
        p
    };
    let seed: u64 =
        arg(&args, "--seed").map_or(1, |s| s.parse().unwrap_or_else(|_| die("--seed N")));
    let out = PathBuf::from(arg(&args, "--out").unwrap_or_else(|| die("--out DIR is required")));
    match kind.as_str() {
        "model" => {
            let dtype = match arg(&args, "--dtype").as_deref().unwrap_or("f16") {
                "f16" => DType::F16,
                "bf16" => DType::BF16,
                "f32" => DType::F32,
                d => die(&format!("unknown dtype {d}")),
            };
            let shard = parse_size(&arg(&args, "--shard-size").unwrap_or_else(|| "5GB".into()))
                .unwrap_or_else(|e| die(&e));
            write_checkpoint(&out, "model", &llama_tensors(&p), dtype, shard, seed);
            let config = serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": p.hidden,
                "intermediate_size": p.intermediate,
                "num_attention_heads": p.heads,
                "num_key_value_heads": p.kv_heads,
                "num_hidden_layers": p.layers,
                "vocab_size": p.vocab,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": false,
                "torch_dtype": dtype.torch_name(),
            });
            std::fs::write(
                out.join("config.json"),
                serde_json::to_string_pretty(&config).unwrap(),
            )
            .unwrap();
        }
        "lora" => {
            let rank: u64 =
                arg(&args, "--rank").map_or(64, |s| s.parse().unwrap_or_else(|_| die("--rank N")));
            let mut tensors = Vec::new();
            for (name, shape) in llama_tensors(&p) {
                let linear = shape.len() == 2 && name.contains(".layers.");
                if !linear {
                    continue;
                }
                let module = name.trim_end_matches(".weight");
                tensors.push((
                    format!("base_model.model.{module}.lora_A.weight"),
                    vec![rank, shape[1]],
                ));
                tensors.push((
                    format!("base_model.model.{module}.lora_B.weight"),
                    vec![shape[0], rank],
                ));
            }
            write_checkpoint(&out, "adapter_model", &tensors, DType::F32, u64::MAX, seed);
            let config = serde_json::json!({
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "fan_in_fan_out": false,
                "use_rslora": false,
                "use_dora": false,
            });
            std::fs::write(
                out.join("adapter_config.json"),
                serde_json::to_string_pretty(&config).unwrap(),
            )
            .unwrap();
        }
        _ => die(
            "usage: synth model|lora --preset P [--layers N] [--seed S] [--dtype f16] [--rank R] --out DIR",
        ),
    }
}
