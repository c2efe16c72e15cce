//! Helpers shared by the integration tests: running the CLI, loading outputs through the
//! `safetensors` crate, and comparing them with the golden outputs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

pub fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

/// The second golden set: the methods, `modules:`, depth changes, extract-lora and tokenizer
/// cases (its manifest.json has the exact mergekit commands).
pub fn golden2() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden2")
}

/// The names of the `*.yml` configs in `dir` (without the extension), sorted: a fixture
/// folder of mergekit cases, each beside its expected output folder.
pub fn config_cases(dir: &Path) -> Vec<String> {
    let mut cases: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_suffix(".yml").map(str::to_string)
        })
        .collect();
    cases.sort();
    cases
}

/// `mergestream merge CONFIG OUT --quiet EXTRA…` run in `cwd` (where the config's relative
/// model paths resolve), into a fresh temporary folder: (that folder, OUT).
pub fn merge_config(cwd: &Path, config: &Path, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    ok(cwd, &merge_args(config, &out, extra));
    (tmp, out)
}

/// `merge CONFIG OUT --quiet EXTRA...`.
fn merge_args<'a>(config: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "merge",
        config.to_str().unwrap(),
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

/// Merge fixture case `case` of `dir` (`dir/CASE.yml`, run in `cwd`) and compare its tensors
/// with the expected output beside it (`dir/CASE/`); dtypes must match too.
pub fn fixture_case_diff(cwd: &Path, dir: &Path, case: &str, extra: &[&str]) -> Diff {
    let (_tmp, out) = merge_config(cwd, &dir.join(format!("{case}.yml")), extra);
    diff(&load_dir(&out), &load_dir(&dir.join(case)))
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The binary, hermetic: no Hub access and an empty HF cache, so a test never touches the
/// network or a developer's cache (a missing path shaped like `org/name` is a repo id).
pub fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mergestream"));
    c.env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", fixtures().join("no-hf-cache"))
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN");
    c
}

/// Write `yaml` as `tmp/config.yml`, `{G}` standing for `models`, and run `merge` on it into
/// `tmp/out`: (the run, OUT).
pub fn run_yaml(tmp: &Path, yaml: &str, models: &Path, extra: &[&str]) -> (Output, PathBuf) {
    let cfg = tmp.join("config.yml");
    std::fs::write(&cfg, yaml.replace("{G}", models.to_str().unwrap())).unwrap();
    let out = tmp.join("out");
    (mergestream(tmp, &merge_args(&cfg, &out, extra)), out)
}

/// Run the binary in `cwd`.
pub fn mergestream(cwd: &Path, args: &[&str]) -> Output {
    command()
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("the mergestream binary runs")
}

/// Every file of `dir` (not its subfolders) by name, with its bytes.
pub fn folder(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// [`folder`] without the model card, which must be there: the card quotes the command
/// line, so two runs of one merge into different folders (or from different sources) differ
/// in it and nowhere else.
pub fn model_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = folder(dir);
    assert!(
        files.remove("README.md").is_some(),
        "{}: no model card",
        dir.display()
    );
    files
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Run and insist on success.
pub fn ok(cwd: &Path, args: &[&str]) -> Output {
    let o = mergestream(cwd, args);
    assert!(
        o.status.success(),
        "mergestream {args:?} failed: {}",
        stderr(&o)
    );
    o
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Every tensor of every `.safetensors` file in `dir`, read with the `safetensors` crate.
pub fn load_dir(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no safetensors in {}", dir.display());
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("safetensors crate rejects {}: {e:?}", f.display()));
        for (name, view) in st.tensors() {
            let prev = out.insert(
                name.clone(),
                Tensor {
                    dtype: format!("{:?}", view.dtype()),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            );
            assert!(prev.is_none(), "{name} stored twice");
        }
    }
    out
}

/// How far apart two outputs are, in units in the last place of their 16-bit floats.
#[derive(Debug, Default)]
pub struct Diff {
    pub tensors: usize,
    pub elements: u64,
    pub differing: u64,
    pub max_ulp: u64,
    pub differing_tensors: Vec<String>,
}

impl Diff {
    pub fn fraction(&self) -> f64 {
        self.differing as f64 / self.elements.max(1) as f64
    }
}

/// Map 16-bit float bits to integers whose difference counts ulps across zero.
fn ordered16(b: u16) -> i64 {
    if b & 0x8000 != 0 {
        -((b & 0x7FFF) as i64)
    } else {
        b as i64
    }
}

fn ordered32(b: u32) -> i64 {
    if b & 0x8000_0000 != 0 {
        -((b & 0x7FFF_FFFF) as i64)
    } else {
        b as i64
    }
}

/// Compare `got` with `want`: same tensor set, dtypes, shapes; count differing elements.
pub fn diff(got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) -> Diff {
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    assert_eq!(gk, wk, "tensor sets differ");
    let mut d = Diff::default();
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.dtype, w.dtype, "{name}: dtype");
        assert_eq!(g.shape, w.shape, "{name}: shape");
        assert_eq!(g.bytes.len(), w.bytes.len(), "{name}: byte length");
        d.tensors += 1;
        let (n, bad, max) = match w.dtype.as_str() {
            "F16" | "BF16" => {
                let mut bad = 0;
                let mut max = 0;
                for (a, b) in g.bytes.chunks_exact(2).zip(w.bytes.chunks_exact(2)) {
                    let (a, b) = (
                        u16::from_le_bytes([a[0], a[1]]),
                        u16::from_le_bytes([b[0], b[1]]),
                    );
                    if a != b {
                        bad += 1;
                        max = max.max(ordered16(a).abs_diff(ordered16(b)));
                    }
                }
                (g.bytes.len() as u64 / 2, bad, max)
            }
            "F32" => {
                let mut bad = 0;
                let mut max = 0;
                for (a, b) in g.bytes.chunks_exact(4).zip(w.bytes.chunks_exact(4)) {
                    let a = u32::from_le_bytes([a[0], a[1], a[2], a[3]]);
                    let b = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    if a != b {
                        bad += 1;
                        max = max.max(ordered32(a).abs_diff(ordered32(b)));
                    }
                }
                (g.bytes.len() as u64 / 4, bad, max)
            }
            _ => {
                let bad = if g.bytes == w.bytes { 0 } else { 1 };
                (1, bad, if bad > 0 { u64::MAX } else { 0 })
            }
        };
        d.elements += n;
        d.differing += bad;
        d.max_ulp = d.max_ulp.max(max);
        if bad > 0 {
            d.differing_tensors.push(name.clone());
        }
    }
    d
}

pub fn assert_bit_exact(out: &Path, expected: &Path) {
    let d = diff(&load_dir(out), &load_dir(expected));
    assert_eq!(
        d.differing,
        0,
        "{} differs from {}: {d:?}",
        out.display(),
        expected.display()
    );
}

/// The tolerance for LoRA'd outputs: at most `max_ulp` ulps on at most `max_fraction` of
/// the elements. Returns the diff so callers can report exactness.
pub fn assert_within(out: &Path, expected: &Path, max_ulp: u64, max_fraction: f64) -> Diff {
    let d = diff(&load_dir(out), &load_dir(expected));
    assert!(
        d.max_ulp <= max_ulp && d.fraction() <= max_fraction,
        "{} vs {}: {d:?}",
        out.display(),
        expected.display()
    );
    d
}

/// An output folder is well-formed: every shard parses with the safetensors crate and our
/// reader, `__metadata__` is {"format":"pt"}, the index (if any) matches the shards.
pub fn check_output_folder(dir: &Path) {
    let model = mergestream::Model::open(dir).expect("our reader opens the output");
    let mut shard_tensors: BTreeMap<String, String> = BTreeMap::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("safetensors metadata");
        let md = meta.metadata().as_ref().expect("__metadata__ present");
        assert_eq!(md.len(), 1);
        assert_eq!(md.get("format").map(String::as_str), Some("pt"));
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!((8 + n) % 8, 0, "header padded to 8 bytes");
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        for t in meta.tensors().keys() {
            shard_tensors.insert(t.clone(), name.clone());
        }
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
        let wm = v["weight_map"].as_object().expect("weight_map");
        let from_index: BTreeMap<String, String> = wm
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        assert_eq!(from_index, shard_tensors, "index matches shards");
        let total: u64 = model.tensors().iter().map(|t| t.len).sum();
        assert_eq!(v["metadata"]["total_size"].as_u64(), Some(total));
    } else {
        assert_eq!(
            shard_tensors
                .values()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            1
        );
    }
    assert_eq!(model.tensors().len(), shard_tensors.len());
}

/// Read the manifest's description of a golden case.
pub fn manifest_case(name: &str) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("manifest.json")).unwrap())
            .unwrap();
    m["expected"][name].clone()
}

/// A safetensors file from a header JSON and `data_len` zero bytes of data.
pub fn raw_safetensors(json: &str, data_len: usize) -> Vec<u8> {
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data_len));
    v
}

/// A valid safetensors file with the given F16 tensors (zero data).
pub fn f16_safetensors(tensors: &[(&str, &[u64])]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut off = 0u64;
    for (name, shape) in tensors {
        let len = shape.iter().product::<u64>() * 2;
        entries.push(format!(
            "\"{name}\":{{\"dtype\":\"F16\",\"shape\":{shape:?},\"data_offsets\":[{off},{}]}}",
            off + len
        ));
        off += len;
    }
    raw_safetensors(&format!("{{{}}}", entries.join(",")), off as usize)
}

/// A model folder holding one `model.safetensors` with these bytes.
pub fn model_dir(parent: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir
}

/// The failure contract: exit 1, exactly one `error:` line containing every `needles`
/// string, and nothing at `out` (nor a leftover temporary folder beside it).
pub fn assert_clean_failure(o: &Output, out: &Path, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit status; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {err}");
    }
    assert!(!out.exists(), "{} must not exist", out.display());
    if let Some(parent) = out.parent() {
        for e in std::fs::read_dir(parent).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains(".mergestream-"),
                "temporary folder left: {name}"
            );
        }
    }
}

/// Write tensors as one `model.safetensors` in `dir` (with the golden base's config).
pub fn write_model(dir: &Path, tensors: &BTreeMap<String, Tensor>) {
    use mergestream::dtype::DType;
    use mergestream::format::safetensors::{OutEntry, write_header};
    std::fs::create_dir_all(dir).unwrap();
    let shapes: Vec<Vec<u64>> = tensors
        .values()
        .map(|t| t.shape.iter().map(|&d| d as u64).collect())
        .collect();
    let mut entries = Vec::new();
    let mut off = 0u64;
    for ((name, t), shape) in tensors.iter().zip(&shapes) {
        entries.push(OutEntry {
            name,
            dtype: DType::from_safetensors(&t.dtype).expect("known dtype"),
            shape,
            begin: off,
            end: off + t.bytes.len() as u64,
        });
        off += t.bytes.len() as u64;
    }
    let mut file = write_header(&entries);
    for t in tensors.values() {
        file.extend_from_slice(&t.bytes);
    }
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    std::fs::copy(
        golden().join("models/base/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
}

/// `mergestream blockmerge` with Gryphe's flag spellings (model1, model2, output, gradient),
/// then `extra`, run in `cwd`.
pub fn blockmerge(
    cwd: &Path,
    m1: &str,
    m2: &str,
    out: &Path,
    gradient: &str,
    extra: &[&str],
) -> Output {
    let mut args = vec![
        "blockmerge",
        "--model_path1",
        m1,
        "--model_path2",
        m2,
        "--output_model_path",
        out.to_str().unwrap(),
        "--gradient_values",
        gradient,
    ];
    args.extend_from_slice(extra);
    mergestream(cwd, &args)
}

/// [`blockmerge`], insisting on success.
pub fn blockmerge_ok(
    cwd: &Path,
    m1: &str,
    m2: &str,
    out: &Path,
    gradient: &str,
    extra: &[&str],
) -> Output {
    let o = blockmerge(cwd, m1, m2, out, gradient, extra);
    assert!(o.status.success(), "blockmerge failed: {}", stderr(&o));
    o
}
