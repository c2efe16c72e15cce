//! Models read from a Hub-like server (tests/hub_server.rs, on 127.0.0.1) through
//! `HubSource` and `HttpSource`: the same tensors and output bytes as the local files, through
//! injected faults; a file that changes is an error; the token reaches the Hub host and never
//! the storage host; a missing repo, revision, file and a gated repo each give their message;
//! opening a model reads its headers only.

use crate::common;
use crate::common::{folder, model_files};
use crate::hub_server::{FaultKind, HubServer, Req, Role, TOKEN};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use mergestream::Model;
use mergestream::output;
use mergestream::pipeline::RunOptions;
use mergestream::pipeline::reader::IoMode;
use mergestream::plan::convert::{ConvertOptions, plan_convert};
use mergestream::source::http::RetryPolicy;
use mergestream::source::{HttpClient, HttpConfig, HttpSource, HubConfig, HubSource, Source};

/// Quick retries, and a small prefetch so tensor data is read by range requests.
fn config(server: &HubServer, token: Option<&str>) -> HubConfig {
    let mut c = HubConfig::new(&server.endpoint());
    c.token = token.map(str::to_string);
    c.http.retry = RetryPolicy {
        attempts: 5,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(20),
    };
    c.http.prefetch = 1024;
    // Small parts: the fixtures' tensor reads go out as several concurrent part requests,
    // so every fault below also hits that path.
    c.http.part_size = 4096;
    c.http.parts_in_flight = 3;
    c
}

fn hub(repo: &str, cfg: &HubConfig) -> Arc<dyn Source> {
    Arc::new(HubSource::open(repo, None, None, cfg).unwrap())
}

fn local(dir: &str) -> std::path::PathBuf {
    common::golden().join("models").join(dir)
}

fn convert_options(input: &Path) -> ConvertOptions {
    ConvertOptions {
        input: input.to_path_buf(),
        dtype: None,
        max_shard_size: 100_000,
        model_card: None,
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        io: IoMode::Auto,
        progress: false,
        ..RunOptions::default()
    }
}

/// `convert` of the local folder `input`.
fn convert_local(input: &Path) -> BTreeMap<String, Vec<u8>> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    output::run(
        &plan_convert(&convert_options(input)).unwrap(),
        &out,
        false,
        &quiet(),
    )
    .unwrap();
    folder(&out)
}

/// `convert` of the same model read from `remote` (its copied files too); `before_run` runs
/// once the model is open (headers read), before any tensor data moves. The error report on
/// failure.
fn convert_remote(
    input: &Path,
    remote: &Arc<dyn Source>,
    before_run: impl FnOnce(),
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut plan = plan_convert(&convert_options(input)).unwrap();
    let names: Vec<String> = plan.outputs.copies.iter().map(|(_, n)| n.clone()).collect();
    assert!(!names.is_empty());
    plan.outputs.copies.clear();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    plan.outputs.copy_present(remote, &names);
    assert_eq!(plan.outputs.copies.len(), names.len());
    plan.sources[0] = Model::from_source(remote.clone()).unwrap();
    before_run();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    match output::run(&plan, &out, false, &quiet()) {
        Ok(_) => Ok(folder(&out)),
        Err(e) => {
            assert!(!out.exists());
            Err(e.report().to_string())
        }
    }
}

fn assert_same(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.keys().any(|f| f.ends_with(".safetensors")));
    for (f, bytes) in a {
        assert!(bytes == &b[f], "{f} differs");
    }
}

fn assert_same_model(remote: &Model, dir: &Path) {
    let local = Model::open(dir).unwrap();
    assert_eq!(remote.tensors(), local.tensors(), "{}", dir.display());
    assert_eq!(remote.files, local.files);
    assert_eq!(remote.config().unwrap(), local.config().unwrap());
}

/// The token went with every request to the Hub host and with none to the storage host,
/// which was used.
fn assert_token_only_to_hub(log: &[Req]) {
    let storage: Vec<&Req> = log.iter().filter(|r| r.role == Role::Storage).collect();
    assert!(!storage.is_empty());
    assert!(storage.iter().all(|r| r.auth.is_none()), "{storage:?}");
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        log.iter()
            .filter(|r| r.role == Role::Api)
            .all(|r| r.auth.as_deref() == Some(bearer.as_str()))
    );
}

#[test]
fn hub_repos_read_like_local_folders() {
    let server = HubServer::start();
    let cfg = config(&server, Some(TOKEN));
    for dir in [
        "base",
        "other",
        "lora",
        "base_bin",
        "other_legacy_bin",
        "base_f32",
    ] {
        let repo = format!("golden/{dir}");
        let src = HubSource::open(&repo, None, None, &cfg).unwrap();
        assert_eq!(src.commit(), server.sha(&repo));
        assert_eq!(
            src.location(),
            Path::new(&format!("hf://{repo}@{}", server.sha(&repo)))
        );
        let mut listed = src.list().unwrap();
        listed.sort();
        let mut files: Vec<String> = folder(&local(dir)).into_keys().collect();
        files.sort();
        assert_eq!(listed, files);
        let src: Arc<dyn Source> = Arc::new(src);
        assert_same_model(&Model::from_source(src).unwrap(), &local(dir));
    }
    for dir in ["base", "base_bin"] {
        server.clear_log();
        let src = HubSource::open(&format!("golden/{dir}"), None, None, &cfg).unwrap();
        let client = src.client().clone();
        let src: Arc<dyn Source> = Arc::new(src);
        let remote = convert_remote(&local(dir), &src, || ()).unwrap();
        assert_same(&remote, &convert_local(&local(dir)));
        // Every byte fetched about once: the repo's size, plus per file at most the first
        // KiB again and one 16 KiB block read for small reads (headers, pickle records).
        let files = folder(&local(dir));
        let size: usize = files.values().map(Vec::len).sum();
        let fetched = client.bytes_fetched() as usize;
        assert!(fetched >= size);
        assert!(
            fetched <= size + files.len() * 17 * 1024,
            "{fetched} bytes fetched for {size}"
        );
    }
    assert_token_only_to_hub(&server.log());
}

#[test]
fn a_subfolder_at_a_commit() {
    let server = HubServer::start();
    let cfg = config(&server, None);
    let sha = server.sha("golden/nested");
    let src = HubSource::open("golden/nested", Some(&sha), Some("weights"), &cfg).unwrap();
    assert_eq!(
        src.location(),
        Path::new(&format!("hf://golden/nested@{sha}/weights"))
    );
    assert!(src.list().unwrap().contains(&"config.json".to_string()));
    let src: Arc<dyn Source> = Arc::new(src);
    assert_same_model(&Model::from_source(src).unwrap(), &local("base"));
    // Every file was read at the commit, under the subfolder.
    let log = server.log();
    assert!(
        log.iter()
            .filter(|r| r.role == Role::Api && r.path.contains("/resolve/"))
            .all(|r| r
                .path
                .starts_with(&format!("/golden/nested/resolve/{sha}/weights/")))
    );

    let e = HubSource::open("golden/nested", None, Some("nope"), &cfg).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("golden/nested@{sha}: no folder \"nope\"")
    );
}

#[test]
fn opening_a_model_reads_its_headers_only() {
    let server = HubServer::start();
    // The default prefetch: one request per shard covers the header.
    let cfg = HubConfig::new(&server.endpoint());
    let src = HubSource::open("golden/base_f32", None, None, &cfg).unwrap();
    let client = src.client().clone();
    let model = Model::from_source(Arc::new(src)).unwrap();
    let sent = server.bytes_sent();
    assert!(sent > 0);
    assert_eq!(client.bytes_fetched(), sent);
    assert!(
        sent * 4 < model.data_bytes(),
        "{sent} of {}",
        model.data_bytes()
    );

    server.clear_log();
    let model = Model::from_source(hub("golden/base", &config(&server, None))).unwrap();
    let sent = server.bytes_sent();
    assert!(
        sent * 4 < model.data_bytes(),
        "{sent} of {}",
        model.data_bytes()
    );
    // The shards were read by ranges, never whole.
    assert!(
        server
            .log()
            .iter()
            .filter(|r| r.role == Role::Storage)
            .all(|r| r.range.is_some() && r.status == 206)
    );
}

#[test]
fn transient_faults_are_retried_and_the_bytes_stay_identical() {
    let expected = convert_local(&local("base"));
    let shard = "model-00002-of-00003.safetensors";
    let faults = [
        (FaultKind::Status(503, None), 2),
        (FaultKind::Status(500, None), 1),
        (FaultKind::Status(429, Some(1)), 1),
        (FaultKind::Cut, 3),
    ];
    for (kind, times) in faults {
        let server = HubServer::start();
        let src = hub("golden/base", &config(&server, Some(TOKEN)));
        let remote = convert_remote(&local("base"), &src, || {
            server.fault(shard, kind.clone(), times)
        })
        .unwrap();
        assert_same(&remote, &expected);
        let log: Vec<Req> = storage_requests(&server, shard);
        match kind {
            FaultKind::Status(status, retry_after) => {
                let failed: Vec<usize> = (0..log.len())
                    .filter(|&i| log[i].status == status)
                    .collect();
                assert_eq!(failed.len(), times as usize, "{kind:?}");
                // Each failed request was asked again, after Retry-After when given.
                for i in failed {
                    let again = log[i + 1..]
                        .iter()
                        .find(|r| r.range == log[i].range)
                        .unwrap();
                    if let Some(s) = retry_after {
                        assert!(again.at - log[i].at >= Duration::from_secs(s));
                    }
                }
            }
            FaultKind::Cut => {
                let cut: Vec<usize> = (0..log.len())
                    .filter(|&i| {
                        let (a, b) = log[i].range.unwrap();
                        log[i].status == 206 && log[i].sent < b.unwrap() - a + 1
                    })
                    .collect();
                assert_eq!(cut.len(), times as usize);
                // Resumed from the last byte received.
                for i in cut {
                    let (a, b) = log[i].range.unwrap();
                    let resumed = Some((a + log[i].sent, b));
                    assert!(log[i + 1..].iter().any(|r| r.range == resumed));
                }
            }
            _ => unreachable!(),
        }
        assert_token_only_to_hub(&server.log());
    }
}

#[test]
fn reads_go_to_the_storage_url_until_it_expires() {
    let server = HubServer::start();
    let src = hub("golden/base", &config(&server, Some(TOKEN)));
    let shard = "model-00002-of-00003.safetensors";
    // The storage URL stops answering once (a signed URL expired): the file is resolved again.
    let remote = convert_remote(&local("base"), &src, || {
        server.fault(shard, FaultKind::Status(403, None), 1)
    })
    .unwrap();
    assert_same(&remote, &convert_local(&local("base")));
    let log = server.log();
    let resolves = |f: &str| {
        log.iter()
            .filter(|r| r.role == Role::Api && r.path.ends_with(f))
            .count()
    };
    let reads = |f: &str| {
        log.iter()
            .filter(|r| r.role == Role::Storage && r.path.ends_with(f))
            .count()
    };
    // Opened once through the Hub, then read from storage directly.
    let first = "model-00001-of-00003.safetensors";
    assert_eq!(resolves(first), 1);
    assert!(reads(first) > 1);
    assert_eq!(resolves(shard), 2);
    assert_token_only_to_hub(&log);
}

#[test]
fn dropped_connections_and_timeouts_are_retried() {
    let expected = convert_local(&local("base"));
    let shard = "model-00002-of-00003.safetensors";
    let server = HubServer::start();
    let mut cfg = config(&server, None);
    cfg.http.read_timeout = Duration::from_millis(300);
    let src = hub("golden/base", &cfg);
    let remote = convert_remote(&local("base"), &src, || {
        server.fault(shard, FaultKind::Drop, 2);
        server.fault(shard, FaultKind::Stall(Duration::from_secs(3)), 1);
    })
    .unwrap();
    assert_same(&remote, &expected);
    // Two dropped, one stalled (answered too late), then the rest.
    let log: Vec<Req> = storage_requests(&server, shard);
    let asked = |r: &Req| log.iter().filter(|x| x.range == r.range).count();
    let retried: Vec<&Req> = log.iter().filter(|r| asked(r) > 1).collect();
    assert_eq!(retried.len(), 4, "{log:?}");
    assert_eq!(retried.iter().filter(|r| r.status == 0).count(), 2);
}

#[test]
fn servers_without_range_support() {
    let server = HubServer::start();
    let shard = "model-00002-of-00003.safetensors";
    let client = HttpClient::new(HttpConfig {
        prefetch: 1024,
        ..HttpConfig::default()
    });
    let url = format!("{}/plain/golden/base/", server.endpoint());
    // At open, a whole small file is kept: the model reads the same.
    server.fault(shard, FaultKind::IgnoreRange, 1);
    let src: Arc<dyn Source> = Arc::new(HttpSource::new(&client, &url).unwrap());
    assert_same_model(&Model::from_source(src.clone()).unwrap(), &local("base"));
    let remote = convert_remote(&local("base"), &src, || ()).unwrap();
    assert_same(&remote, &convert_local(&local("base")));

    // Ignored once the file was opened by ranges: an error, never wrong bytes.
    let src: Arc<dyn Source> = Arc::new(HttpSource::new(&client, &url).unwrap());
    let e = convert_remote(&local("base"), &src, || {
        server.fault(shard, FaultKind::IgnoreRange, 1)
    })
    .unwrap_err();
    let prefix = format!("{url}{shard}: model.layers.");
    assert!(e.starts_with(&prefix), "{e}");
    assert!(
        e.ends_with(": read failed: the server ignored the range request (200 instead of 206)"),
        "{e}"
    );
}

#[test]
fn faults_while_opening_are_retried_too() {
    let server = HubServer::start();
    // The index is served by the Hub host, the shards by the storage host.
    server.fault(
        "model.safetensors.index.json",
        FaultKind::Status(503, None),
        2,
    );
    server.fault("model-00001", FaultKind::Cut, 1);
    let model = Model::from_source(hub("golden/base", &config(&server, None))).unwrap();
    assert_same_model(&model, &local("base"));
    assert_eq!(server.log().iter().filter(|r| r.status == 503).count(), 2);
}

#[test]
fn persistent_failures_give_up_with_a_clear_error() {
    let server = HubServer::start();
    let sha = server.sha("golden/base");
    let src = hub("golden/base", &config(&server, None));
    let shard = "model-00002-of-00003.safetensors";
    let e = convert_remote(&local("base"), &src, || {
        server.fault(shard, FaultKind::Status(503, None), 1000)
    })
    .unwrap_err();
    let prefix = format!("hf://golden/base@{sha}/{shard}: model.layers.");
    assert!(e.starts_with(&prefix), "{e}");
    let tail =
        ": gave up after 5 attempts: HTTP 503 Service Unavailable (Injected: injected fault)";
    assert!(e.ends_with(tail), "{e}");
    assert!(e.contains("read failed: bytes "), "{e}");
}

#[test]
fn a_file_changed_while_being_read_is_an_error() {
    let server = HubServer::start();
    let sha = server.sha("golden/base");
    let src = hub("golden/base", &config(&server, None));
    let shard = "model-00002-of-00003.safetensors";
    let e = convert_remote(&local("base"), &src, || server.change_etag(shard)).unwrap_err();
    assert!(
        e.starts_with(&format!("hf://golden/base@{sha}/{shard}: model.layers.")),
        "{e}"
    );
    let re = regex::Regex::new(
        r#": read failed: changed while being read \(ETag "([0-9a-f]+)-0" became "([0-9a-f]+)-1"\)$"#,
    )
    .unwrap();
    let c = re.captures(&e).unwrap_or_else(|| panic!("{e}"));
    assert_eq!(&c[1], &c[2]);
}

#[test]
fn gated_repos_need_the_token() {
    let server = HubServer::start();
    let sha = server.sha("golden/gated");
    let index = format!("hf://golden/gated@{sha}/model.safetensors.index.json");

    let src = hub("golden/gated", &config(&server, None));
    let e = Model::from_source(src).unwrap_err().report().to_string();
    assert_eq!(
        e,
        format!(
            "{index}: cannot read: golden/gated is gated: accept its license on the Hub and set HF_TOKEN"
        )
    );

    let src = hub("golden/gated", &config(&server, Some("hf_other")));
    let e = Model::from_source(src).unwrap_err().report().to_string();
    assert_eq!(
        e,
        format!(
            "{index}: cannot read: golden/gated is gated and HF_TOKEN has no access to it: accept its license on the Hub with that account"
        )
    );

    server.clear_log();
    let src = hub("golden/gated", &config(&server, Some(TOKEN)));
    let remote = convert_remote(&local("base"), &src, || ()).unwrap();
    assert_same(&remote, &convert_local(&local("base")));
    assert_token_only_to_hub(&server.log());
}

#[test]
fn missing_repos_revisions_and_files_are_named() {
    let server = HubServer::start();
    let endpoint = server.endpoint();
    let cfg = config(&server, None);
    let e = HubSource::open("golden/nope", None, None, &cfg).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        e.to_string(),
        format!("golden/nope: no such model repo on {endpoint} (or it is private: set HF_TOKEN)")
    );
    let e = HubSource::open("golden/nope", None, None, &config(&server, Some(TOKEN))).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("golden/nope: no such model repo on {endpoint} (or HF_TOKEN has no access to it)")
    );
    let e = HubSource::open("golden/base", Some("v9"), None, &cfg).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("golden/base: no revision \"v9\" on {endpoint} (no such branch, tag or commit)")
    );
    let e = HubSource::open("not a repo", None, None, &cfg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "\"not a repo\": not a Hub repo name (expected org/name)"
    );

    let sha = server.sha("golden/base");
    let src = HubSource::open("golden/base", Some("main"), None, &cfg).unwrap();
    assert_eq!(src.file_len("tokenizer.json").unwrap(), None);
    let e = src.open("tokenizer.json").err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        e.to_string(),
        format!("golden/base@{sha}: no file \"tokenizer.json\"")
    );
    assert_eq!(src.read_small("tokenizer.json").unwrap(), None);
}

#[test]
fn cancelling_stops_requests() {
    let server = HubServer::start();
    let mut cfg = config(&server, None);
    let cancel = Arc::new(AtomicBool::new(true));
    cfg.http.cancel = Some(cancel);
    let e = HubSource::open("golden/base", None, None, &cfg).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::Interrupted);
    assert!(e.to_string().ends_with(": cancelled"), "{e}");
    assert!(server.log().is_empty());
}

#[test]
fn http_folder_and_file_urls() {
    let server = HubServer::start();
    let client = HttpClient::new(HttpConfig {
        prefetch: 1024,
        ..HttpConfig::default()
    });
    let url = format!("{}/plain/golden/base/", server.endpoint());
    let src = HttpSource::new(&client, &url).unwrap();
    assert_eq!(
        src.location(),
        Path::new(&format!("{}/plain/golden/base", server.endpoint()))
    );
    let mut listed = src.list().unwrap();
    listed.sort();
    let mut files: Vec<String> = folder(&local("base")).into_keys().collect();
    files.sort();
    assert_eq!(listed, files);
    let src: Arc<dyn Source> = Arc::new(src);
    assert_same_model(&Model::from_source(src.clone()).unwrap(), &local("base"));
    let remote = convert_remote(&local("base"), &src, || ()).unwrap();
    assert_same(&remote, &convert_local(&local("base")));

    // One file URL.
    let file = local("base_f32").join("model.safetensors");
    let url = format!(
        "{}/plain/golden/base_f32/model.safetensors",
        server.endpoint()
    );
    let src = HttpSource::new(&client, &url).unwrap();
    assert_eq!(src.file_name(), Some("model.safetensors"));
    let m = Model::from_source(Arc::new(src)).unwrap();
    assert_eq!(m.tensors(), Model::open(&file).unwrap().tensors());

    // A folder without a checkpoint.
    let url = format!("{}/plain/golden/nope/", server.endpoint());
    let src: Arc<dyn Source> = Arc::new(HttpSource::new(&client, &url).unwrap());
    let e = Model::from_source(src).unwrap_err().report().to_string();
    assert!(
        e.starts_with(&format!(
            "{}/plain/golden/nope: no checkpoint here",
            server.endpoint()
        )),
        "{e}"
    );
}

#[test]
fn the_hub_config_reads_the_variables_huggingface_hub_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join(".cache/huggingface")).unwrap();
    std::fs::write(home.join(".cache/huggingface/token"), "hf_from_home\n").unwrap();
    let hf_home = tmp.path().join("hf");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), "hf_from_hf_home").unwrap();
    let vars = |pairs: &[(&str, String)]| {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        HubConfig::from_vars(move |k| pairs.iter().find(|p| p.0 == k).map(|p| p.1.clone()))
    };
    let home_s = home.display().to_string();
    let c = vars(&[("HOME", home_s.clone())]);
    assert_eq!(c.endpoint, "https://huggingface.co");
    assert_eq!(c.token.as_deref(), Some("hf_from_home"));
    let c = vars(&[
        ("HOME", home_s.clone()),
        ("HF_HOME", hf_home.display().to_string()),
        ("HF_ENDPOINT", "https://mirror.example/".to_string()),
    ]);
    assert_eq!(c.endpoint, "https://mirror.example");
    assert_eq!(c.token.as_deref(), Some("hf_from_hf_home"));
    let c = vars(&[("HOME", home_s.clone()), ("HF_TOKEN", "hf_env".to_string())]);
    assert_eq!(c.token.as_deref(), Some("hf_env"));
    // The token never shows in debug output.
    assert!(!format!("{c:?}").contains("hf_env"));
    assert!(!format!("{:?}", c.client()).contains("hf_env"));
    let c = vars(&[("HOME", tmp.path().display().to_string())]);
    assert_eq!(c.token, None);
}

/// The CLI against the test Hub: online, an empty cache, the test endpoint and token.
fn cli_against(server: &HubServer, cwd: &Path, args: &[&str]) -> std::process::Output {
    crate::common::command()
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_TOKEN", TOKEN)
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_mergekit_config_naming_hub_repos_runs_against_the_hub_like_the_local_run() {
    let server = HubServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = |a: &str, b: &str, lora: &str| {
        format!(
            "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}+{lora}\nparameters: {{t: 0.3}}\ndtype: float16\n"
        )
    };
    let g = |m: &str| local(m).to_str().unwrap().to_string();
    std::fs::write(
        tmp.path().join("local.yml"),
        config(&g("base"), &g("other"), &g("lora")),
    )
    .unwrap();
    // The gated repo is a copy of base: it needs the token, which must never reach storage.
    std::fs::write(
        tmp.path().join("hub.yml"),
        config("golden/gated@main", "golden/other", "golden/lora"),
    )
    .unwrap();
    // Faults on the way: two 503s, a 429 with Retry-After, and a body cut halfway.
    server.fault("model-00002", FaultKind::Status(503, None), 2);
    server.fault("model-00003", FaultKind::Status(429, Some(0)), 1);
    server.fault("model-00001", FaultKind::Cut, 1);
    for (cfg, out) in [("local.yml", "local-out"), ("hub.yml", "hub-out")] {
        let o = cli_against(&server, tmp.path(), &["merge", cfg, out, "--quiet"]);
        assert!(o.status.success(), "{}", crate::common::stderr(&o));
    }
    let log = server.log();
    assert!(log.iter().any(|r| r.status == 503) && log.iter().any(|r| r.status == 429));
    let tensors = |d: &str| {
        let mut f = folder(&tmp.path().join(d));
        f.retain(|n, _| n.ends_with(".safetensors") || n.ends_with(".json"));
        f
    };
    assert_same(&tensors("hub-out"), &tensors("local-out"));
    assert_token_only_to_hub(&server.log());

    // Without the token, the gated repo is refused with what to do.
    let o = crate::common::command()
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", server.endpoint())
        .current_dir(tmp.path())
        .args(["inspect", "golden/gated"])
        .output()
        .unwrap();
    let err = crate::common::stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("gated") && err.contains("HF_TOKEN"), "{err}");
}

#[test]
fn ctrl_c_stops_a_remote_read_that_is_waiting_to_retry() {
    let server = HubServer::start();
    // Every read of this shard is refused with a long Retry-After: the run waits.
    server.fault(
        "model-00002-of-00003.safetensors",
        FaultKind::Status(503, Some(50)),
        1000,
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut child = crate::common::command()
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", server.endpoint())
        .args(["convert", "golden/base", out.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !server
        .log()
        .iter()
        .any(|r| r.path.contains("model-00002-of-00003") && r.status == 503)
    {
        assert!(
            start.elapsed().as_secs() < 30,
            "the faulted read never came"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let signalled = std::time::Instant::now();
    // SAFETY: sending a signal to our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        signalled.elapsed().as_secs() < 10,
        "took {:?} to stop",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("interrupted"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn the_summary_says_how_much_was_fetched() {
    let server = HubServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let o = cli_against(&server, tmp.path(), &["convert", "golden/base", "out"]);
    let err = crate::common::stderr(&o);
    assert!(o.status.success(), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("wrote "), "{err}");
    assert!(
        last.contains("; fetched ") && last.ends_with(" from remote inputs"),
        "{err}"
    );
    // Reading the data needs every tensor byte once; the server sent what we counted.
    let data: u64 = Model::open(&local("base"))
        .unwrap()
        .tensors()
        .iter()
        .map(|t| t.len)
        .sum();
    assert!(server.bytes_sent() >= data);
}

#[test]
fn with_cache_the_second_run_needs_no_network() {
    let server = HubServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hf-cache");
    let run = |offline: bool, args: &[&str]| {
        let mut c = crate::common::command();
        c.env("HF_HUB_CACHE", &cache)
            .env("HF_ENDPOINT", server.endpoint())
            .current_dir(tmp.path())
            .args(args);
        if !offline {
            c.env_remove("HF_HUB_OFFLINE");
        }
        c.output().unwrap()
    };
    let o = run(
        false,
        &["convert", "golden/base", "first", "--cache", "--quiet"],
    );
    assert!(o.status.success(), "{}", crate::common::stderr(&o));
    // The repo is now complete in the cache, in huggingface_hub's layout.
    let repo = cache.join("models--golden--base");
    let sha = server.sha("golden/base");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        sha
    );
    let snapshot = repo.join("snapshots").join(&sha);
    for (name, bytes) in folder(&local("base")) {
        let link = snapshot.join(&name);
        assert!(link.is_symlink(), "{name} is not linked");
        assert!(std::fs::read(&link).unwrap() == bytes, "{name} differs");
    }
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Offline now: the same command reads the cache and gives the same bytes.
    server.clear_log();
    let o = run(true, &["convert", "golden/base", "second", "--quiet"]);
    assert!(o.status.success(), "{}", crate::common::stderr(&o));
    assert!(server.log().is_empty(), "the second run used the network");
    // The cards differ in the command line (the output's name) only.
    assert_same(
        &model_files(&tmp.path().join("second")),
        &model_files(&tmp.path().join("first")),
    );
}

/// The requests the storage host answered for `file`.
fn storage_requests(server: &HubServer, file: &str) -> Vec<Req> {
    server
        .log()
        .into_iter()
        .filter(|r| r.role == Role::Storage && r.path.ends_with(file))
        .collect()
}
