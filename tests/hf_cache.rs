//! The Hugging Face cache, as huggingface_hub lays it out, built in a temp dir from the
//! golden fixture models: blobs named by a hash, snapshots of symlinks into them, refs for a
//! branch and a tag. A cached snapshot is found by branch, tag and commit, only when it is
//! complete, and reads as the same model as the fixture folder.

use crate::common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mergestream::Model;
use mergestream::source::{
    HfEnv, LocalSource, Reference, cached_snapshot, offline_missing, parse_reference,
};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const OLD_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

fn model_dir(name: &str) -> PathBuf {
    common::golden().join("models").join(name)
}

/// A content hash for blob names (huggingface_hub uses sha256 / git sha1; any stable name
/// works for the layout).
fn blob_name(bytes: &[u8]) -> String {
    format!("{:08x}{:016x}", crc32fast::hash(bytes), bytes.len())
}

/// Add every file of `from` to `repo_dir`'s snapshot `commit` under `sub` (`""` for the
/// root), as links `snapshots/<commit>/<sub>/<file>` → `../../blobs/<hash>`.
fn add_snapshot(repo_dir: &Path, commit: &str, sub: &str, from: &Path) {
    let blobs = repo_dir.join("blobs");
    let snap = repo_dir.join("snapshots").join(commit).join(sub);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    let depth = 2 + sub.split('/').filter(|s| !s.is_empty()).count();
    let up = "../".repeat(depth);
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let blob = blob_name(&bytes);
        std::fs::write(blobs.join(&blob), &bytes).unwrap();
        // Relative links, as huggingface_hub makes them.
        symlink(
            format!("{up}blobs/{blob}"),
            snap.join(p.file_name().unwrap()),
        )
        .unwrap();
    }
}

fn set_ref(repo_dir: &Path, name: &str, commit: &str) {
    let f = repo_dir.join("refs").join(name);
    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    std::fs::write(f, commit).unwrap();
}

/// A cache holding `org/base` (main and tag v1 at COMMIT; the `other` model in subfolder
/// `variants/other`) and `org/lora` (an adapter at main).
fn build_cache() -> (tempfile::TempDir, HfEnv) {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let base = cache.join("models--org--base");
    add_snapshot(&base, COMMIT, "", &model_dir("base"));
    add_snapshot(&base, COMMIT, "variants/other", &model_dir("other"));
    set_ref(&base, "main", COMMIT);
    set_ref(&base, "v1", COMMIT);
    let lora = cache.join("models--org--lora");
    add_snapshot(&lora, COMMIT, "", &model_dir("lora"));
    set_ref(&lora, "main", COMMIT);
    (tmp, HfEnv::at(cache))
}

fn snapshot(env: &HfEnv, commit: &str) -> PathBuf {
    env.cache_dir
        .join("models--org--base/snapshots")
        .join(commit)
}

#[test]
fn found_by_branch_tag_and_commit() {
    let (_tmp, env) = build_cache();
    let want = Some(snapshot(&env, COMMIT));
    assert_eq!(cached_snapshot(&env, "org/base", None, None).unwrap(), want);
    assert_eq!(
        cached_snapshot(&env, "org/base", Some("main"), None).unwrap(),
        want
    );
    assert_eq!(
        cached_snapshot(&env, "org/base", Some("v1"), None).unwrap(),
        want
    );
    assert_eq!(
        cached_snapshot(&env, "org/base", Some(COMMIT), None).unwrap(),
        want
    );
    // A commit in capitals names the same (lowercase) snapshot folder.
    let upper = COMMIT.to_ascii_uppercase();
    assert_eq!(
        cached_snapshot(&env, "org/base", Some(&upper), None).unwrap(),
        want
    );
    assert_eq!(
        cached_snapshot(&env, "org/lora", None, None).unwrap(),
        Some(
            env.cache_dir
                .join("models--org--lora/snapshots")
                .join(COMMIT)
        )
    );
}

#[test]
fn not_cached_is_none() {
    let (_tmp, env) = build_cache();
    assert_eq!(
        cached_snapshot(&env, "org/absent", None, None).unwrap(),
        None
    );
    assert_eq!(
        cached_snapshot(&env, "org/base", Some("dev"), None).unwrap(),
        None
    );
    assert_eq!(
        cached_snapshot(&env, "org/base", Some(OLD_COMMIT), None).unwrap(),
        None
    );
    // A ref to a commit whose snapshot is gone.
    set_ref(&env.cache_dir.join("models--org--base"), "old", OLD_COMMIT);
    assert_eq!(
        cached_snapshot(&env, "org/base", Some("old"), None).unwrap(),
        None
    );
    assert_eq!(
        cached_snapshot(&env, "org/base", None, Some("variants/absent")).unwrap(),
        None
    );
    // A folder that is not a checkpoint.
    assert_eq!(
        cached_snapshot(&env, "org/base", None, Some("variants")).unwrap(),
        None
    );
    // An empty cache folder, or none at all.
    let empty = tempfile::tempdir().unwrap();
    for env in [
        HfEnv::at(empty.path()),
        HfEnv::at(empty.path().join("none")),
    ] {
        assert_eq!(cached_snapshot(&env, "org/base", None, None).unwrap(), None);
    }
}

#[test]
fn a_missing_shard_is_not_cached() {
    let (_tmp, env) = build_cache();
    let snap = snapshot(&env, COMMIT);
    std::fs::remove_file(snap.join("model-00002-of-00003.safetensors")).unwrap();
    assert_eq!(cached_snapshot(&env, "org/base", None, None).unwrap(), None);
    // The subfolder's checkpoint is still whole.
    assert!(
        cached_snapshot(&env, "org/base", None, Some("variants/other"))
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_dangling_link_is_a_missing_file() {
    let (_tmp, env) = build_cache();
    let link = snapshot(&env, COMMIT).join("model-00003-of-00003.safetensors");
    let blob = std::fs::canonicalize(&link).unwrap();
    std::fs::remove_file(blob).unwrap();
    assert_eq!(cached_snapshot(&env, "org/base", None, None).unwrap(), None);
}

#[test]
fn shards_without_an_index_must_all_be_there() {
    let (_tmp, env) = build_cache();
    let snap = snapshot(&env, COMMIT);
    std::fs::remove_file(snap.join("model.safetensors.index.json")).unwrap();
    assert_eq!(
        cached_snapshot(&env, "org/base", None, None).unwrap(),
        Some(snap.clone())
    );
    std::fs::remove_file(snap.join("model-00001-of-00003.safetensors")).unwrap();
    assert_eq!(cached_snapshot(&env, "org/base", None, None).unwrap(), None);
}

#[test]
fn pytorch_and_single_file_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let env = HfEnv::at(tmp.path());
    for (repo, model) in [("org/bin", "base_bin"), ("org/f32", "base_f32")] {
        let dir = env
            .cache_dir
            .join(format!("models--{}", repo.replace('/', "--")));
        add_snapshot(&dir, COMMIT, "", &model_dir(model));
        set_ref(&dir, "main", COMMIT);
        let snap = cached_snapshot(&env, repo, None, None).unwrap();
        assert_eq!(snap, Some(dir.join("snapshots").join(COMMIT)), "{repo}");
    }
    let bin = env
        .cache_dir
        .join("models--org--bin/snapshots")
        .join(COMMIT);
    std::fs::remove_file(bin.join("pytorch_model-00003-of-00003.bin")).unwrap();
    assert_eq!(cached_snapshot(&env, "org/bin", None, None).unwrap(), None);
}

#[test]
fn an_adapter_needs_its_config() {
    let (_tmp, env) = build_cache();
    let snap = env
        .cache_dir
        .join("models--org--lora/snapshots")
        .join(COMMIT);
    std::fs::remove_file(snap.join("adapter_config.json")).unwrap();
    assert_eq!(cached_snapshot(&env, "org/lora", None, None).unwrap(), None);
}

#[test]
fn a_bad_ref_file_is_an_error_naming_it() {
    let (_tmp, env) = build_cache();
    set_ref(
        &env.cache_dir.join("models--org--base"),
        "main",
        "not a sha",
    );
    let e = cached_snapshot(&env, "org/base", None, None).unwrap_err();
    let ref_file = env.cache_dir.join("models--org--base/refs/main");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: not a commit sha; delete the file (or the repo's folder) and download the model again",
            ref_file.display()
        )
    );
    // A trailing newline (a hand-written ref) is fine.
    set_ref(
        &env.cache_dir.join("models--org--base"),
        "main",
        &format!("{COMMIT}\n"),
    );
    assert!(
        cached_snapshot(&env, "org/base", None, None)
            .unwrap()
            .is_some()
    );
}

/// The tensors of `m`, with the bytes of each read through its source.
fn tensors_and_bytes(m: &Model) -> Vec<(mergestream::TensorInfo, Vec<u8>)> {
    let files: Vec<_> = (0..m.files.len())
        .map(|i| m.open_file(i).unwrap())
        .collect();
    m.tensors()
        .iter()
        .map(|t| {
            let mut buf = vec![0u8; t.len as usize];
            files[t.file].read_at(t.offset, &mut buf).unwrap();
            (t.clone(), buf)
        })
        .collect()
}

#[test]
fn a_cached_snapshot_reads_as_the_fixture() {
    let (_tmp, env) = build_cache();
    for (sub, model) in [(None, "base"), (Some("variants/other"), "other")] {
        let snap = cached_snapshot(&env, "org/base", Some("v1"), sub)
            .unwrap()
            .unwrap();
        let cached = Model::from_source(Arc::new(LocalSource::new(&snap))).unwrap();
        let local = Model::open(&model_dir(model)).unwrap();
        assert_eq!(cached.files, local.files);
        assert!(!cached.tensors().is_empty());
        assert_eq!(
            tensors_and_bytes(&cached),
            tensors_and_bytes(&local),
            "{model}"
        );
        assert_eq!(
            cached.read_file("config.json").unwrap(),
            local.read_file("config.json").unwrap()
        );
    }
}

#[test]
fn the_offline_message() {
    let env = HfEnv {
        offline: true,
        ..HfEnv::at("/data/hf/hub")
    };
    assert_eq!(
        offline_missing(&env, "Gryphe/MythoMax-L2-13b", None),
        "Gryphe/MythoMax-L2-13b@main: not in the Hugging Face cache (/data/hf/hub/models--Gryphe--MythoMax-L2-13b) with all its checkpoint files, and HF_HUB_OFFLINE forbids downloading it; download it first (hf download Gryphe/MythoMax-L2-13b --revision main) or unset HF_HUB_OFFLINE"
    );
    let env = HfEnv {
        offline_var: "TRANSFORMERS_OFFLINE",
        ..env
    };
    assert_eq!(
        offline_missing(&env, "org/name", Some("v2")),
        "org/name@v2: not in the Hugging Face cache (/data/hf/hub/models--org--name) with all its checkpoint files, and TRANSFORMERS_OFFLINE forbids downloading it; download it first (hf download org/name --revision v2) or unset TRANSFORMERS_OFFLINE"
    );
}

#[test]
fn a_reference_finds_its_snapshot() {
    let (_tmp, env) = build_cache();
    let no_local = |_: &Path| false;
    for (text, sub) in [
        ("org/base", ""),
        ("org/base@v1", ""),
        ("hf://org/base@v1/variants/other", "variants/other"),
    ] {
        let Ok(Reference::Hub {
            repo,
            revision,
            subfolder,
        }) = parse_reference(text, no_local)
        else {
            panic!("{text} is a Hub reference");
        };
        let found = cached_snapshot(&env, &repo, revision.as_deref(), subfolder.as_deref());
        assert_eq!(
            found.unwrap(),
            Some(snapshot(&env, COMMIT).join(sub)),
            "{text}"
        );
    }
}

/// Run the CLI with `cache` as the HF cache, offline (the cache is the only way to the Hub).
fn run_with_cache(cache: &Path, cwd: &Path, args: &[&str]) -> std::process::Output {
    common::command()
        .env("HF_HUB_CACHE", cache)
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap()
}

/// Every output file of `a` is byte-identical to `b`'s.
fn same_files(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "README.md" && n != "mergekit_config.yml")
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b));
    for n in names(a) {
        assert!(
            std::fs::read(a.join(&n)).unwrap() == std::fs::read(b.join(&n)).unwrap(),
            "{n} differs"
        );
    }
}

#[test]
fn a_mergekit_config_naming_hub_repos_runs_from_the_cache_offline() {
    let (tmp, env) = build_cache();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let config = |a: &str, b: &str, lora: &str| {
        format!(
            "merge_method: linear\nmodels:\n  - model: {a}+{lora}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\ndtype: float16\n"
        )
    };
    let golden = common::golden().join("models");
    let local = config(
        golden.join("base").to_str().unwrap(),
        golden.join("other").to_str().unwrap(),
        golden.join("lora").to_str().unwrap(),
    );
    let hub = config("org/base@v1", "hf://org/base/variants/other", "org/lora");
    std::fs::write(work.join("local.yml"), local).unwrap();
    std::fs::write(work.join("hub.yml"), hub).unwrap();
    for (cfg, out) in [("local.yml", "local-out"), ("hub.yml", "hub-out")] {
        let o = run_with_cache(&env.cache_dir, &work, &["merge", cfg, out, "--quiet"]);
        assert!(o.status.success(), "{}", common::stderr(&o));
    }
    same_files(&work.join("hub-out"), &work.join("local-out"));
}

#[test]
fn blockmerge_and_inspect_take_hub_names_and_a_missing_repo_is_named_offline() {
    let (tmp, env) = build_cache();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let golden = common::golden().join("models");
    let g = |m: &str| golden.join(m).to_str().unwrap().to_string();
    let args = |m1: &str, m2: &str, lora: &str, out: &str| {
        vec![
            "blockmerge".to_string(),
            "--model_path1".into(),
            m1.into(),
            "--model_path2".into(),
            m2.into(),
            "--lora2".into(),
            lora.into(),
            "--lora2-weight".into(),
            "0.25".into(),
            "--gradient_values".into(),
            "[0.9,0.0]".into(),
            "-o".into(),
            out.into(),
            "--quiet".into(),
        ]
    };
    for (a, out) in [
        (
            args(&g("base"), &g("other"), &g("lora"), "local-out"),
            "local",
        ),
        (
            args(
                "org/base",
                "hf://org/base@main/variants/other",
                "org/lora@v1",
                "hub-out",
            ),
            "hub",
        ),
    ] {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = run_with_cache(&env.cache_dir, &work, &a);
        // org/lora has no tag v1: the adapter reference must fail, naming it.
        if out == "hub" {
            let err = common::stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(
                err.starts_with("error: org/lora@v1: cannot open: "),
                "{err}"
            );
            assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
            assert!(err.contains(env.cache_dir.to_str().unwrap()), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            let fixed = args(
                "org/base",
                "hf://org/base@main/variants/other",
                "org/lora",
                "hub-out",
            );
            let fixed: Vec<&str> = fixed.iter().map(String::as_str).collect();
            let o = run_with_cache(&env.cache_dir, &work, &fixed);
            assert!(o.status.success(), "{}", common::stderr(&o));
        } else {
            assert!(o.status.success(), "{}", common::stderr(&o));
        }
    }
    same_files(&work.join("hub-out"), &work.join("local-out"));
    let local = run_with_cache(&env.cache_dir, &work, &["inspect", &g("base")]);
    let hub = run_with_cache(&env.cache_dir, &work, &["inspect", "org/base"]);
    assert!(hub.status.success(), "{}", common::stderr(&hub));
    // The listing names files by where they are; the tensors and sizes are the same.
    let rows = |o: &std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(rows(&hub), rows(&local));
}

#[test]
fn transformers_cache_names_the_cache_as_in_mergekit() {
    let (tmp, env) = build_cache();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let golden = common::golden().join("models");
    let cfg = |a: &str| {
        format!(
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {}\n    parameters: {{weight: 0.3}}\ndtype: float16\n",
            golden.join("other").display()
        )
    };
    std::fs::write(work.join("hub.yml"), cfg("org/base@v1")).unwrap();
    std::fs::write(
        work.join("local.yml"),
        cfg(golden.join("base").to_str().unwrap()),
    )
    .unwrap();
    let cache = env.cache_dir.to_str().unwrap();
    // The environment's (empty) cache does not have the repo; --transformers-cache does.
    let run = |args: &[&str]| {
        common::command()
            .current_dir(&work)
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["merge", "hub.yml", "without", "--quiet"]);
    assert_eq!(o.status.code(), Some(1), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("org/base"),
        "{}",
        common::stderr(&o)
    );
    for (cfg, out) in [("hub.yml", "hub-out"), ("local.yml", "local-out")] {
        let o = run(&["merge", cfg, out, "--quiet", "--transformers-cache", cache]);
        assert!(o.status.success(), "{}", common::stderr(&o));
    }
    same_files(&work.join("hub-out"), &work.join("local-out"));
}
