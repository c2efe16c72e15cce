//! A Hub-like HTTP server for the tests, on 127.0.0.1 ports of its own: the API
//! (`/api/models/{repo}/revision/{rev}`) and resolve (`/{repo}/resolve/{rev}/{file}`)
//! endpoints on one port, weights redirected (302) to a second "storage" port under another
//! host name (`localhost`), which serves Range/206 with ETags; small files are served by the
//! API host directly, as the Hub does for non-LFS files. Plain folders are served at
//! `/plain/{repo}/{file}` for the HTTP source. Faults are injected per server; every request
//! is recorded (host role, method, path, range, Authorization, status, time).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Api,
    Storage,
}

#[derive(Clone, Debug)]
pub struct Req {
    pub role: Role,
    pub method: String,
    pub path: String,
    /// The `Range` header: (first, last) byte.
    pub range: Option<(u64, Option<u64>)>,
    pub auth: Option<String>,
    pub status: u16,
    /// Body bytes sent.
    pub sent: u64,
    pub at: Instant,
}

#[derive(Clone, Debug)]
pub enum FaultKind {
    /// Answer this status (with `Retry-After` seconds if given) instead of the bytes.
    Status(u16, Option<u64>),
    /// Send the headers and half of the body, then close the connection.
    Cut,
    /// Close the connection without an answer.
    Drop,
    /// Answer after this long.
    Stall(Duration),
    /// Answer 200 with the whole file, as a server without range support does.
    IgnoreRange,
}

#[derive(Clone, Debug)]
struct Fault {
    file: String,
    kind: FaultKind,
    times: u32,
}

struct Repo {
    sha: String,
    files: BTreeMap<String, Vec<u8>>,
    gated: bool,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    faults: Vec<Fault>,
    /// Per file name: how many times its ETag changed.
    etag_gen: HashMap<String, u32>,
    log: Vec<Req>,
}

pub struct HubServer {
    pub api_port: u16,
    pub storage_port: u16,
    state: Arc<Mutex<State>>,
}

pub const TOKEN: &str = "hf_test_token";

fn sha_of(repo: &str) -> String {
    let mut h = DefaultHasher::new();
    repo.hash(&mut h);
    let a = h.finish();
    format!(
        "{a:016x}{:016x}{:08x}",
        a.rotate_left(21) ^ 0x5555,
        a as u32
    )
}

impl HubServer {
    /// Serves `golden/<dir>` for every fixture model folder, `golden/gated` (a copy of base
    /// that needs [`TOKEN`]) and `golden/nested` (base's files under `weights/`).
    pub fn start() -> HubServer {
        let models = crate::common::golden().join("models");
        let mut repos = BTreeMap::new();
        for e in std::fs::read_dir(&models).unwrap() {
            let dir = e.unwrap().path();
            let name = dir.file_name().unwrap().to_str().unwrap().to_string();
            repos.insert(format!("golden/{name}"), Repo::of(&dir, "", false));
        }
        repos.insert(
            "golden/gated".to_string(),
            Repo::of(&models.join("base"), "", true),
        );
        repos.insert(
            "golden/nested".to_string(),
            Repo::of(&models.join("base"), "weights/", false),
        );
        for (name, r) in repos.iter_mut() {
            r.sha = sha_of(name);
        }
        let state = Arc::new(Mutex::new(State {
            repos,
            ..State::default()
        }));
        let api = TcpListener::bind("127.0.0.1:0").unwrap();
        let storage = TcpListener::bind("127.0.0.1:0").unwrap();
        let api_port = api.local_addr().unwrap().port();
        let storage_port = storage.local_addr().unwrap().port();
        for (listener, role) in [(api, Role::Api), (storage, Role::Storage)] {
            let state = state.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || {
                        let _ = handle(conn, role, &state, storage_port);
                    });
                }
            });
        }
        HubServer {
            api_port,
            storage_port,
            state,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn sha(&self, repo: &str) -> String {
        self.state.lock().unwrap().repos[repo].sha.clone()
    }

    /// The next `times` GETs of files whose name contains `file` fail with `kind`.
    pub fn fault(&self, file: &str, kind: FaultKind, times: u32) {
        self.state.lock().unwrap().faults.push(Fault {
            file: file.to_string(),
            kind,
            times,
        });
    }

    /// From now on, files whose name contains `file` have another ETag.
    pub fn change_etag(&self, file: &str) {
        *self
            .state
            .lock()
            .unwrap()
            .etag_gen
            .entry(file.to_string())
            .or_default() += 1;
    }

    pub fn log(&self) -> Vec<Req> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// Body bytes sent so far, both ports.
    pub fn bytes_sent(&self) -> u64 {
        self.log().iter().map(|r| r.sent).sum()
    }
}

impl Repo {
    fn of(dir: &Path, prefix: &str, gated: bool) -> Repo {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap();
            files.insert(format!("{prefix}{name}"), std::fs::read(&p).unwrap());
        }
        Repo {
            sha: String::new(),
            files,
            gated,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(Ok(v)) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .map(|h| u8::from_str_radix(h, 16))
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

fn read_request(conn: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let path = target.split('?').next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    Some(Request {
        method,
        path,
        headers,
    })
}

struct Answer {
    status: u16,
    /// Close without answering, or answer late.
    drop: bool,
    stall: Option<Duration>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then close (a cut transfer).
    cut_at: Option<usize>,
}

impl Answer {
    fn new(status: u16) -> Answer {
        Answer {
            status,
            drop: false,
            stall: None,
            headers: Vec::new(),
            body: Vec::new(),
            cut_at: None,
        }
    }
    fn header(mut self, k: &str, v: impl ToString) -> Answer {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    fn error(status: u16, code: &str, msg: &str) -> Answer {
        let mut a = Answer::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", msg);
        a.body = format!("{{\"error\":\"{msg}\"}}").into_bytes();
        a
    }
}

fn handle(mut conn: TcpStream, role: Role, state: &Mutex<State>, storage: u16) -> Option<()> {
    let req = read_request(&conn)?;
    let range = req.headers.get("range").and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()))
    });
    let mut st = state.lock().unwrap();
    let answer = route(&mut st, role, &req, range, storage);
    let head_only = req.method == "HEAD";
    let sent = if head_only {
        0
    } else {
        answer.cut_at.unwrap_or(answer.body.len())
    };
    st.log.push(Req {
        role,
        method: req.method.clone(),
        path: req.path.clone(),
        range,
        auth: req.headers.get("authorization").cloned(),
        // 0: closed without an answer.
        status: if answer.drop { 0 } else { answer.status },
        sent: if answer.drop { 0 } else { sent as u64 },
        at: Instant::now(),
    });
    drop(st);
    if answer.drop {
        return None;
    }
    if let Some(d) = answer.stall {
        std::thread::sleep(d);
    }
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        answer.status,
        answer.body.len()
    );
    for (k, v) in &answer.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    conn.write_all(out.as_bytes()).ok()?;
    if !head_only {
        conn.write_all(&answer.body[..sent]).ok()?;
    }
    conn.flush().ok()?;
    Some(())
}

fn route(
    st: &mut State,
    role: Role,
    req: &Request,
    range: Option<(u64, Option<u64>)>,
    storage: u16,
) -> Answer {
    let segs: Vec<String> = req
        .path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let authorized = req.headers.get("authorization").map(String::as_str);
    let not_found = || Answer::error(404, "EntryNotFound", "Entry not found");
    match (role, segs.as_slice()) {
        (Role::Api, ["api", "models", org, name, "revision", rev]) => {
            let Some(repo) = st.repos.get(&format!("{org}/{name}")) else {
                return Answer::error(401, "RepoNotFound", "Repository not found");
            };
            if *rev != "main" && *rev != repo.sha {
                return Answer::error(404, "RevisionNotFound", "Invalid rev id");
            }
            let siblings: Vec<serde_json::Value> = repo
                .files
                .iter()
                .map(|(f, b)| serde_json::json!({"rfilename": f, "size": b.len()}))
                .collect();
            let mut a = Answer::new(200).header("Content-Type", "application/json");
            a.body = serde_json::to_vec(&serde_json::json!({
                "id": format!("{org}/{name}"),
                "sha": repo.sha,
                "gated": if repo.gated { "auto" } else { "false" },
                "siblings": siblings,
            }))
            .unwrap();
            a
        }
        (Role::Api, [org, name, "resolve", rev, file @ ..]) => {
            let file = file.join("/");
            let Some(repo) = st.repos.get(&format!("{org}/{name}")) else {
                return Answer::error(401, "RepoNotFound", "Repository not found");
            };
            if *rev != "main" && *rev != repo.sha {
                return Answer::error(404, "RevisionNotFound", "Invalid rev id");
            }
            if repo.gated && authorized != Some(&format!("Bearer {TOKEN}")) {
                let status = if authorized.is_some() { 403 } else { 401 };
                return Answer::error(status, "GatedRepo", "Access to this model is restricted");
            }
            let Some(bytes) = repo.files.get(&file) else {
                return not_found();
            };
            if file.ends_with(".safetensors") || file.ends_with(".bin") {
                let etag = etag(st, &file, bytes);
                return Answer::new(302)
                    .header(
                        "Location",
                        format!("http://localhost:{storage}/blobs/{org}/{name}/{file}"),
                    )
                    .header("X-Repo-Commit", &repo.sha)
                    .header("X-Linked-Size", bytes.len())
                    .header("X-Linked-Etag", etag);
            }
            let (bytes, sha) = (bytes.clone(), repo.sha.clone());
            serve(st, &file, &bytes, range).header("X-Repo-Commit", sha)
        }
        (Role::Api, ["plain", org, name, file @ ..])
        | (Role::Storage, ["blobs", org, name, file @ ..]) => {
            let file = file.join("/");
            let Some(bytes) = st
                .repos
                .get(&format!("{org}/{name}"))
                .and_then(|r| r.files.get(&file))
                .cloned()
            else {
                return not_found();
            };
            serve(st, &file, &bytes, range)
        }
        _ => not_found(),
    }
}

fn etag(st: &State, file: &str, bytes: &[u8]) -> String {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    let generation: u32 = st
        .etag_gen
        .iter()
        .filter(|(k, _)| file.contains(k.as_str()))
        .map(|(_, g)| *g)
        .sum();
    format!("\"{:016x}-{generation}\"", h.finish())
}

/// The bytes of `file`, ranged, with faults applied.
fn serve(st: &mut State, file: &str, bytes: &[u8], range: Option<(u64, Option<u64>)>) -> Answer {
    let etag = etag(st, file, bytes);
    let fault = st
        .faults
        .iter_mut()
        .find(|f| f.times > 0 && file.contains(&f.file))
        .map(|f| {
            f.times -= 1;
            f.kind.clone()
        });
    if let Some(FaultKind::Status(status, retry_after)) = fault {
        let mut a = Answer::error(status, "Injected", "injected fault");
        if let Some(s) = retry_after {
            a = a.header("Retry-After", s);
        }
        return a;
    }
    let len = bytes.len() as u64;
    let range = if let Some(FaultKind::IgnoreRange) = fault {
        None
    } else {
        range
    };
    let mut a = match range {
        None => {
            let mut a = Answer::new(200);
            a.body = bytes.to_vec();
            a
        }
        Some((first, _)) if first >= len => {
            return Answer::new(416).header("Content-Range", format!("bytes */{len}"));
        }
        Some((first, last)) => {
            let last = last.unwrap_or(len - 1).min(len - 1);
            let mut a =
                Answer::new(206).header("Content-Range", format!("bytes {first}-{last}/{len}"));
            a.body = bytes[first as usize..=last as usize].to_vec();
            a
        }
    };
    match fault {
        Some(FaultKind::Cut) => a.cut_at = Some(a.body.len() / 2),
        Some(FaultKind::Drop) => a.drop = true,
        Some(FaultKind::Stall(d)) => a.stall = Some(d),
        _ => {}
    }
    a.header("ETag", etag).header("Accept-Ranges", "bytes")
}
