//! Resuming a killed run: the run is SIGKILLed at random points (chosen as a number of
//! tensors recorded in its journal, so the kill always lands mid-run), the same command then
//! continues it, and the output is byte-identical to an uninterrupted run. A killed run's work
//! is not reused when anything that decides the output changed, or with `--no-resume`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const LAYERS: usize = 6;
/// Tensors in the output: 9 per layer, the embedding, the final norm and the LM head.
const TENSORS: usize = LAYERS * 9 + 3;

/// Two float32 Llama models (hidden 256, `LAYERS` layers, 26 MiB; the embedding and LM head
/// are written in several chunks) with pseudo-random values.
fn models(dir: &Path) -> (PathBuf, PathBuf) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    };
    let (hidden, inter, vocab) = (256usize, 512usize, 4096usize);
    let mut shapes = vec![
        ("model.embed_tokens.weight".to_string(), vec![vocab, hidden]),
        ("model.norm.weight".to_string(), vec![hidden]),
        ("lm_head.weight".to_string(), vec![vocab, hidden]),
    ];
    for i in 0..LAYERS {
        let l = format!("model.layers.{i}");
        for (n, shape) in [
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![hidden, hidden]),
            ("self_attn.v_proj.weight", vec![hidden, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("mlp.gate_proj.weight", vec![inter, hidden]),
            ("mlp.up_proj.weight", vec![inter, hidden]),
            ("mlp.down_proj.weight", vec![hidden, inter]),
            ("input_layernorm.weight", vec![hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
        ] {
            shapes.push((format!("{l}.{n}"), shape));
        }
    }
    let mut paths = Vec::new();
    for name in ["a", "b"] {
        let mut tensors = BTreeMap::new();
        for (n, shape) in &shapes {
            let count: usize = shape.iter().product();
            let bytes: Vec<u8> = (0..count).flat_map(|_| next().to_le_bytes()).collect();
            let dtype = "F32".into();
            let shape = shape.clone();
            tensors.insert(
                n.clone(),
                Tensor {
                    dtype,
                    shape,
                    bytes,
                },
            );
        }
        let p = dir.join(name);
        write_model(&p, &tensors);
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "num_hidden_layers": LAYERS,
            "vocab_size": vocab,
            "tie_word_embeddings": false,
            "torch_dtype": "float32"
        });
        std::fs::write(p.join("config.json"), config.to_string()).unwrap();
        paths.push(p);
    }
    (paths.remove(0), paths.remove(0))
}

/// A TIES merge (slow enough in a debug build to be killed at many points), sharded.
fn config(dir: &Path, a: &Path, b: &Path) -> PathBuf {
    let c = dir.join("ties.yml");
    std::fs::write(
        &c,
        format!(
            "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.7, density: 0.5}}\ndtype: float32\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    c
}

fn merge_args<'a>(config: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "merge",
        config.to_str().unwrap(),
        out.to_str().unwrap(),
        "--out-shard-size",
        "5MiB",
        "--threads",
        "2",
        // Record every finished tensor, so a kill can land between any two.
        "--journal-every",
        "1",
    ];
    v.extend_from_slice(extra);
    v
}

/// The staging folders beside `out`.
fn staging(out: &Path) -> Vec<PathBuf> {
    let stem = format!(
        ".{}.mergestream-",
        out.file_name().unwrap().to_string_lossy()
    );
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&stem))
        .collect()
}

/// Tensors the journal of the run writing `out` lists as done.
fn journaled(out: &Path) -> usize {
    staging(out)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join(".mergestream-journal")).ok())
        .map(|j| j.lines().filter(|l| l.starts_with("done ")).count())
        .max()
        .unwrap_or(0)
}

/// Wait until the journal lists `n` tensors, then SIGKILL the run. False when the run ended
/// first.
fn kill_after(child: &mut Child, out: &Path, n: usize) -> bool {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if journaled(out) >= n {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            child.wait().unwrap();
            return true;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "run stalled");
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn spawn(cwd: &Path, args: &[&str]) -> Child {
    command()
        .current_dir(cwd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// How many tensors the run said it kept from a killed run (0 when it started over).
fn kept(stderr: &str) -> usize {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("note: continued a killed run of this output: "))
        .and_then(|l| l.split(' ').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn runs_killed_at_random_points_resume_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = models(tmp.path());
    let cfg = config(tmp.path(), &a, &b);
    let reference = tmp.path().join("reference");
    ok(tmp.path(), &merge_args(&cfg, &reference, &["--quiet"]));
    let want = model_files(&reference);
    assert!(want.len() > 3, "sharded output expected: {:?}", want.keys());

    let mut seed = 0x9E37_79B9u64;
    let mut random = |lo: usize, hi: usize| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        lo + (seed >> 33) as usize % (hi - lo)
    };
    let mut kills = 0;
    for round in 0..4 {
        let out = tmp.path().join(format!("out{round}"));
        let args = merge_args(&cfg, &out, &[]);
        // Killed once, then killed again while continuing (the journal keeps growing).
        let first = random(1, TENSORS / 2);
        let second = random(first + 1, TENSORS - 1);
        let mut recorded = 0;
        for n in [first, second] {
            let mut child = spawn(tmp.path(), &args);
            if kill_after(&mut child, &out, n) {
                kills += 1;
                recorded = journaled(&out);
                assert!(!out.exists(), "a killed run committed its output");
                assert_eq!(staging(&out).len(), 1, "one staging folder per output");
            }
        }
        let o = ok(tmp.path(), &args);
        let err = stderr(&o);
        assert!(
            kept(&err) >= recorded && (recorded == 0 || kept(&err) > 0),
            "journal had {recorded} tensors; the run said: {err}"
        );
        assert_eq!(
            model_files(&out),
            want,
            "round {round}: resumed output differs"
        );
        assert!(
            staging(&out).is_empty(),
            "staging folder left after success"
        );
    }
    assert!(kills >= 4, "only {kills} kills landed mid-run");
}

/// A killed run's staging folder for `out`, made by killing a real run.
fn killed_run(cwd: &Path, cfg: &Path, out: &Path) {
    let mut child = spawn(cwd, &merge_args(cfg, out, &[]));
    assert!(
        kill_after(&mut child, out, TENSORS / 3),
        "the run ended first"
    );
}

#[test]
fn a_killed_run_is_not_continued_when_the_inputs_or_the_plan_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = models(tmp.path());
    let cfg = config(tmp.path(), &a, &b);
    let out = tmp.path().join("out");

    // Another shard size: another plan.
    killed_run(tmp.path(), &cfg, &out);
    let mut args = merge_args(&cfg, &out, &[]);
    args[4] = "7MiB";
    let o = ok(tmp.path(), &args);
    assert_eq!(kept(&stderr(&o)), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("left by an earlier run that was killed"));
    std::fs::remove_dir_all(&out).unwrap();

    // `--no-resume`.
    killed_run(tmp.path(), &cfg, &out);
    let o = ok(tmp.path(), &merge_args(&cfg, &out, &["--no-resume"]));
    assert_eq!(kept(&stderr(&o)), 0, "{}", stderr(&o));
    assert!(staging(&out).is_empty());
    std::fs::remove_dir_all(&out).unwrap();

    // An input rewritten with other values between the runs.
    killed_run(tmp.path(), &cfg, &out);
    let shard = b.join("model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let o = ok(tmp.path(), &merge_args(&cfg, &out, &[]));
    assert_eq!(kept(&stderr(&o)), 0, "{}", stderr(&o));
    let fresh = tmp.path().join("fresh");
    ok(tmp.path(), &merge_args(&cfg, &fresh, &["--quiet"]));
    assert_eq!(model_files(&out), model_files(&fresh));
}

#[test]
fn a_damaged_journal_or_shard_means_starting_over_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = models(tmp.path());
    let cfg = config(tmp.path(), &a, &b);
    let reference = tmp.path().join("reference");
    ok(tmp.path(), &merge_args(&cfg, &reference, &["--quiet"]));
    let out = tmp.path().join("out");
    type Damage = (&'static str, fn(&Path));
    let damages: [Damage; 4] = [
        ("garbage journal", |d| {
            std::fs::write(d.join(".mergestream-journal"), b"\xff\x00garbage").unwrap()
        }),
        ("no journal", |d| {
            std::fs::remove_file(d.join(".mergestream-journal")).unwrap()
        }),
        ("a truncated shard", |d| {
            let shard = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(shard).unwrap();
            f.set_len(100).unwrap();
        }),
        ("a torn journal line", |d| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(d.join(".mergestream-journal"))
                .unwrap();
            f.write_all(b"done 99999").unwrap();
        }),
    ];
    for (what, damage) in damages {
        killed_run(tmp.path(), &cfg, &out);
        let dirs = staging(&out);
        assert_eq!(dirs.len(), 1);
        damage(&dirs[0]);
        let o = ok(tmp.path(), &merge_args(&cfg, &out, &[]));
        let resumed = kept(&stderr(&o)) > 0;
        // A torn last line only loses that line.
        assert_eq!(
            resumed,
            what == "a torn journal line",
            "{what}: {}",
            stderr(&o)
        );
        assert_eq!(model_files(&out), model_files(&reference), "{what}");
        assert!(staging(&out).is_empty(), "{what}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// The library, killed exactly after each chunk in turn: a run stopped right after chunk `k`
/// leaves its staging folder as a kill at that point would (the journal and the shards), and
/// a run continuing it must produce the same bytes. Deterministic (one worker), so a tensor
/// recorded before all its chunks are written cannot slip through.
#[test]
fn a_run_stopped_after_any_chunk_continues_to_the_same_bytes() {
    use mergestream::dtype::DType;
    use mergestream::pipeline::journal::Journal;
    use mergestream::pipeline::{Resumable, RunOptions, execute_resumable};
    use mergestream::plan::convert::{ConvertOptions, plan_convert};
    use mergestream::progress::Observer;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = models(tmp.path());
    let plan = plan_convert(&ConvertOptions {
        input: a,
        dtype: Some(DType::BF16),
        max_shard_size: 5 << 20,
        model_card: None,
    })
    .unwrap();
    let fingerprint = plan.fingerprint();
    let steps = plan.steps.len();
    let shards = |dir: &Path| -> Vec<Vec<u8>> {
        let names = plan.shards.iter().map(|s| dir.join(&s.file_name));
        names.map(|p| std::fs::read(p).unwrap()).collect()
    };
    // Stop after `stop_at` chunks (never, for 0); returns the chunks written.
    let run = |dir: &Path, journal: &Journal, done: &[usize], existing: bool, stop_at: usize| {
        let cancel = Arc::new(AtomicBool::new(false));
        let chunks = Arc::new(AtomicUsize::new(0));
        let (flag, seen) = (Arc::clone(&cancel), Arc::clone(&chunks));
        let opts = RunOptions {
            threads: 1,
            memory_limit: 8 << 20,
            journal_every: 1,
            cancel,
            observer: Some(Observer(Arc::new(move |_| {
                if seen.fetch_add(1, Ordering::SeqCst) + 1 == stop_at {
                    flag.store(true, Ordering::SeqCst);
                }
            }))),
            ..RunOptions::default()
        };
        let resume = Resumable {
            journal,
            done,
            existing_shards: existing,
        };
        let r = execute_resumable(&plan, dir, &opts, Some(resume));
        assert_eq!(r.is_ok(), stop_at == 0, "{r:?}");
        chunks.load(Ordering::SeqCst)
    };

    let reference = tmp.path().join("reference");
    std::fs::create_dir(&reference).unwrap();
    let j = Journal::create(&reference, &fingerprint, steps).unwrap();
    let total = run(&reference, &j, &[], false, 0);
    assert!(total > steps, "some tensors must take several chunks");
    let want = shards(&reference);

    for k in 1..total {
        let dir = tmp.path().join(format!("stopped{k}"));
        std::fs::create_dir(&dir).unwrap();
        let j = Journal::create(&dir, &fingerprint, steps).unwrap();
        run(&dir, &j, &[], false, k);
        drop(j);
        let (j, done) = Journal::reopen(&dir, &fingerprint, steps).unwrap();
        run(&dir, &j, &done, true, 0);
        assert_eq!(shards(&dir), want, "stopped after chunk {k} of {total}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The CLI with mapped inputs, and with streamed passes reading windows of them, one of
/// which another program truncates mid-run: no death by SIGBUS, one error line naming the
/// input, exit 1, no output and no staging folder (its journal does not keep a failed run's
/// folder).
#[test]
fn an_input_truncated_mid_run_is_one_error_line_not_a_signal() {
    for extra in [
        &["--io", "mmap"][..],
        &["--io", "read", "--memory-limit", "64KiB"][..],
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = models(tmp.path());
        let cfg = config(tmp.path(), &a, &b);
        let out = tmp.path().join("out");
        let mut args = merge_args(&cfg, &out, extra);
        args.push("--quiet");
        let mut child = command()
            .current_dir(tmp.path())
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while journaled(&out) < 2 {
            assert!(child.try_wait().unwrap().is_none(), "the run ended first");
            assert!(start.elapsed() < Duration::from_secs(120), "run stalled");
            std::thread::sleep(Duration::from_micros(500));
        }
        let shard = b.join("model.safetensors");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&shard)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert_clean_failure(
            &o,
            &out,
            &[shard.to_str().unwrap(), "changed while the run read it"],
        );
        assert!(staging(&out).is_empty());
    }
}
