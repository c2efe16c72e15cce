//! Models read from S3 through `S3Source`, against a real S3-compatible server (moto) that
//! each test starts on 127.0.0.1 and stops when it ends: the same tensors and output bytes as
//! the local files, and clear errors naming `s3://…` for what is missing, changed or refused.

use crate::common;
use crate::common::{folder, model_files};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mergestream::Model;
use mergestream::output;
use mergestream::pipeline::RunOptions;
use mergestream::plan::convert::{ConvertOptions, plan_convert};
use mergestream::source::{S3Config, S3Source, Source};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

/// The line that installs the server (the one `.ci/run` runs).
const INSTALL: &str = "python3 -m pip install 'moto[server]==5.2.1'";

/// A moto server on a free port of 127.0.0.1, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        // The script, else the module (a fresh pyenv may not have the script's shim yet).
        let spawn = |program: &str, pre: &[&str]| {
            Command::new(program)
                .args(pre)
                .args(["-H", "127.0.0.1", "-p", "0"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        };
        let mut child = match spawn("moto_server", &[])
            .or_else(|_| spawn("python3", &["-m", "moto.server"]))
        {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start moto_server, the S3 server these tests need ({e}): install it with \
                 `{INSTALL}`"
            ),
        };
        // Port 0: the server picks a free port and says which on stderr.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            // Keep draining after the port is known: the server logs every request, and a
            // full pipe would block it.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("Running on http://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.trim().parse::<u16>().ok());
                }
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(p)) => p,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "moto_server, the S3 server these tests need, did not start: install it \
                     with `{INSTALL}`"
                );
            }
        };
        Moto { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client configuration for this server with any keys (moto checks none by default).
    fn config(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            allow_http: true,
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing".into()),
            max_retries: 2,
            initial_backoff: Duration::from_millis(10),
            // Small parts, so that reads of the small fixtures go out as several GETs.
            part_size: 16 << 10,
            parts_in_flight: 3,
            ..S3Config::default()
        }
    }

    /// A plain HTTP request to the server; (status, body).
    fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            self.port,
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, resp)
    }

    fn create_bucket(&self, bucket: &str) {
        let (status, resp) = self.http("PUT", &format!("/{bucket}"), b"");
        assert_eq!(status, 200, "creating bucket {bucket}: {resp}");
    }

    /// Uploads `(key, bytes)` pairs to `bucket` with an S3 client.
    fn put(&self, bucket: &str, objects: &[(String, Vec<u8>)]) {
        let store = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for (key, bytes) in objects {
            rt.block_on(store.put(
                &ObjectPath::from(key.as_str()),
                PutPayload::from(bytes.clone()),
            ))
            .unwrap_or_else(|e| panic!("uploading {key}: {e}"));
        }
    }

    /// Uploads every file of `dir` under `prefix`.
    fn upload_dir(&self, bucket: &str, dir: &Path, prefix: &str) {
        let objects: Vec<(String, Vec<u8>)> = folder(dir)
            .into_iter()
            .map(|(name, bytes)| (format!("{prefix}/{name}"), bytes))
            .collect();
        self.put(bucket, &objects);
    }

    /// From now on, requests must carry credentials the server knows (it knows none).
    fn require_auth(&self) {
        let (status, resp) = self.http("POST", "/moto-api/reset-auth", b"0");
        assert_eq!(status, 200, "{resp}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: false,
        ..RunOptions::default()
    }
}

/// The model at `dir`, uploaded under `prefix`, read from S3: same tensors, files and
/// config as the local model, and a convert run with the same output bytes.
fn same_as_local(moto: &Moto, dir: &Path, prefix: &str) {
    let s3 = S3Source::open("models", prefix, &moto.config()).unwrap();
    assert_eq!(
        s3.location().to_str().unwrap(),
        format!("s3://models/{prefix}")
    );
    let mut names = s3.list().unwrap();
    names.sort();
    assert_eq!(names, folder(dir).into_keys().collect::<Vec<_>>());
    let s3: Arc<dyn Source> = Arc::new(s3);

    let remote = Model::from_source(s3.clone()).unwrap();
    let local = Model::open(dir).unwrap();
    assert_eq!(remote.tensors(), local.tensors(), "{prefix}");
    assert_eq!(remote.files, local.files);
    assert_eq!(remote.config().unwrap(), local.config().unwrap());
    assert_eq!(
        remote.file_path(0).to_str().unwrap(),
        format!("s3://models/{prefix}/{}", local.files[0])
    );

    let opts = ConvertOptions {
        input: dir.to_path_buf(),
        dtype: None,
        max_shard_size: 100_000,
        model_card: None,
    };
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan_convert(&opts).unwrap();
    let local_out = tmp.path().join("local");
    output::run(&plan, &local_out, false, &quiet()).unwrap();

    // The same plan with the model, and the files copied beside it, read from S3.
    let mut plan = plan_convert(&opts).unwrap();
    let names: Vec<String> = plan.outputs.copies.iter().map(|(_, n)| n.clone()).collect();
    assert!(
        names.iter().any(|n| n == "tokenizer_config.json"),
        "{names:?}"
    );
    plan.outputs.copies.clear();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    plan.outputs.copy_present(&s3, &names);
    assert_eq!(plan.outputs.copies.len(), names.len());
    plan.sources[0] = remote;
    let s3_out = tmp.path().join("s3");
    output::run(&plan, &s3_out, false, &quiet()).unwrap();

    let (l, r) = (folder(&local_out), folder(&s3_out));
    assert!(l.keys().any(|f| f.ends_with(".safetensors")));
    assert!(l.contains_key("tokenizer_config.json"));
    assert_eq!(l.keys().collect::<Vec<_>>(), r.keys().collect::<Vec<_>>());
    for (f, bytes) in &l {
        assert!(bytes == &r[f], "{prefix}: {f} differs from the local run");
    }
}

#[test]
fn s3_models_give_the_same_tensors_and_outputs_as_local_files() {
    let moto = Moto::start();
    moto.create_bucket("models");
    let models = common::golden().join("models");
    moto.upload_dir("models", &models.join("base"), "golden/base");
    moto.upload_dir("models", &models.join("base_bin"), "golden/base_bin");
    same_as_local(&moto, &models.join("base"), "golden/base");
    same_as_local(&moto, &models.join("base_bin"), "golden/base_bin");

    // A model at the top level of a bucket.
    moto.create_bucket("flat");
    let objects: Vec<(String, Vec<u8>)> = folder(&models.join("base")).into_iter().collect();
    moto.put("flat", &objects);
    let flat = S3Source::open("flat", "", &moto.config()).unwrap();
    assert_eq!(flat.location().to_str().unwrap(), "s3://flat");
    let flat = Model::from_source(Arc::new(flat)).unwrap();
    let local = Model::open(&models.join("base")).unwrap();
    assert_eq!(
        flat.file_path(0).to_str().unwrap(),
        format!("s3://flat/{}", local.files[0])
    );
    assert_eq!(flat.tensors(), local.tensors());

    // A trailing slash names the same prefix; the parent prefix holds no objects itself.
    let s3 = S3Source::open("models", "/golden/base/", &moto.config()).unwrap();
    assert_eq!(s3.location().to_str().unwrap(), "s3://models/golden/base");
    let e = S3Source::open("models", "golden", &moto.config()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "s3://models/golden: no objects under this prefix"
    );

    // Positional reads from several threads at once give the local bytes.
    let shard = "model-00002-of-00003.safetensors";
    let want = std::fs::read(models.join("base").join(shard)).unwrap();
    assert_eq!(s3.file_len(shard).unwrap(), Some(want.len() as u64));
    let f = s3.open(shard).unwrap();
    assert_eq!(f.len(), want.len() as u64);
    let step = want.len() / 8;
    std::thread::scope(|scope| {
        for i in 0..8 {
            let (f, want) = (&f, &want);
            scope.spawn(move || {
                let start = i * step;
                let mut buf = vec![0u8; step];
                f.read_at(start as u64, &mut buf).unwrap();
                assert!(buf == want[start..start + step], "range {i}");
            });
        }
    });
    // A read of many parts, in flight together.
    let mut whole = vec![0u8; want.len() - 3];
    f.read_at(3, &mut whole).unwrap();
    assert!(whole == want[3..]);
    let mut buf = [0u8; 16];
    let e = f.read_at(want.len() as u64 - 8, &mut buf).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);

    // Called from inside a tokio runtime (a caller of its own), reads still work.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        f.read_at(0, &mut buf).unwrap();
        assert_eq!(buf[..], want[..16]);
    });
}

#[test]
fn s3_a_server_that_went_away_fails_after_bounded_retries() {
    let moto = Moto::start();
    moto.create_bucket("models");
    moto.upload_dir("models", &common::golden().join("models/base"), "base");
    let cfg = moto.config();
    let s3 = S3Source::open("models", "base", &cfg).unwrap();
    let f = s3.open("model-00001-of-00003.safetensors").unwrap();
    drop(moto);

    let t = std::time::Instant::now();
    let mut buf = [0u8; 8];
    let e = f.read_at(0, &mut buf).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("after 2 retries"), "{msg}");
    assert!(msg.contains("onnect"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    let e = S3Source::open("models", "base", &cfg).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("s3://models/base: cannot list: "), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn s3_errors_name_the_object_and_what_is_wrong() {
    let moto = Moto::start();
    moto.create_bucket("models");
    let base = common::golden().join("models/base");
    moto.upload_dir("models", &base, "base");
    let cfg = moto.config();

    // A missing bucket.
    let e = S3Source::open("nobucket", "base", &cfg).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("s3://nobucket/base: no such bucket (NoSuchBucket"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");

    // A missing prefix.
    let e = S3Source::open("models", "nothing/here", &cfg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "s3://models/nothing/here: no objects under this prefix"
    );

    // A missing object: absent for lookups, an error naming it for a model.
    let s3: Arc<dyn Source> = Arc::new(S3Source::open("models", "base", &cfg).unwrap());
    assert_eq!(s3.file_len("missing.safetensors").unwrap(), None);
    assert_eq!(s3.read_small("missing.json").unwrap(), None);
    let e = Model::from_source_file(s3.clone(), "missing.safetensors").unwrap_err();
    let msg = e.report().to_string();
    assert!(
        msg.starts_with("s3://models/base/missing.safetensors: ") && msg.contains("no such object"),
        "{msg}"
    );

    // An object overwritten between open and read: the read fails, naming the change.
    let key = "base/model-00003-of-00003.safetensors".to_string();
    let f = s3.open("model-00003-of-00003.safetensors").unwrap();
    let mut first = vec![0u8; 64];
    f.read_at(0, &mut first).unwrap();
    let mut changed = std::fs::read(base.join("model-00003-of-00003.safetensors")).unwrap();
    assert_eq!(first, changed[..64]);
    let last = changed.len() - 1;
    changed[last] ^= 0xff; // same size, different bytes
    moto.put("models", &[(key, changed)]);
    let e = f.read_at(0, &mut first).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("the object changed since it was opened"),
        "{e}"
    );
    // Reopened, it reads the new version.
    let f = s3.open("model-00003-of-00003.safetensors").unwrap();
    let mut end = [0u8; 1];
    f.read_at(last as u64, &mut end).unwrap();
    assert_eq!(
        end[0],
        std::fs::read(base.join("model-00003-of-00003.safetensors")).unwrap()[last] ^ 0xff
    );
}

#[test]
fn s3_wrong_credentials_give_a_clear_error() {
    let moto = Moto::start();
    moto.create_bucket("models");
    moto.upload_dir("models", &common::golden().join("models/base"), "base");
    moto.require_auth();
    let cfg = S3Config {
        access_key_id: Some("AKIAWRONGWRONGWRONG1".into()),
        secret_access_key: Some("wrong".into()),
        ..moto.config()
    };
    let e = S3Source::open("models", "base", &cfg).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(
            "s3://models/base: access denied: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY \
             and AWS_SESSION_TOKEN (InvalidAccessKeyId"
        ),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn s3_references_work_from_the_command_line_like_local_paths() {
    let moto = Moto::start();
    moto.create_bucket("models");
    let models = common::golden().join("models");
    moto.upload_dir("models", &models.join("base"), "golden/base");
    moto.upload_dir("models", &models.join("other"), "golden/other");
    moto.upload_dir("models", &models.join("lora"), "golden/lora");
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        common::command()
            .env("AWS_ENDPOINT_URL", moto.endpoint())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .current_dir(tmp.path())
            .args(args)
            .output()
            .unwrap()
    };
    let g = |m: &str| models.join(m).to_str().unwrap().to_string();
    let blockmerge = |m1: &str, m2: &str, lora: &str, out: &str| {
        let o = run(&[
            "blockmerge",
            "--model_path1",
            m1,
            "--model_path2",
            m2,
            "--lora2",
            lora,
            "--gradient_values",
            "[0.9,0.0]",
            "-o",
            out,
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", common::stderr(&o));
    };
    blockmerge(&g("base"), &g("other"), &g("lora"), "local-out");
    blockmerge(
        "s3://models/golden/base",
        "s3://models/golden/other/",
        "s3://models/golden/lora",
        "s3-out",
    );
    // The cards differ in the command line (the model references) only.
    assert_eq!(
        model_files(&tmp.path().join("s3-out")),
        model_files(&tmp.path().join("local-out"))
    );
    // One object named directly: its folder is the source.
    let o = run(&[
        "inspect",
        "s3://models/golden/base/model-00001-of-00003.safetensors",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let o = run(&["inspect", "s3://models/golden/missing"]);
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: s3://models/golden/missing: "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn s3_a_cancelled_run_drops_its_requests_at_once() {
    let moto = Moto::start();
    moto.create_bucket("models");
    moto.upload_dir("models", &common::golden().join("models/base"), "base");
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cfg = S3Config {
        // Without the interrupt, a vanished server would be retried for a long while.
        max_retries: 10,
        initial_backoff: Duration::from_secs(5),
        retry_timeout: Duration::from_secs(300),
        cancel: Some(Arc::clone(&cancel)),
        ..moto.config()
    };
    let s3 = S3Source::open("models", "base", &cfg).unwrap();
    let f = s3.open("model-00001-of-00003.safetensors").unwrap();
    drop(moto);
    let flag = Arc::clone(&cancel);
    let interrupter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let t = std::time::Instant::now();
    let mut buf = [0u8; 8];
    let e = f.read_at(0, &mut buf).unwrap_err();
    interrupter.join().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}
