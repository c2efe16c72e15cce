//! A Hugging Face Hub model repo at one commit, as a [`Source`].
//!
//! The revision (a branch, tag or commit) is resolved once, with the file list, by the API
//! (`/api/models/{repo}/revision/{rev}?blobs=true`, as `huggingface_hub.model_info` does);
//! every file is then read at that commit (`/{repo}/resolve/{commit}/{file}`), so a push
//! during a run cannot mix versions. Reads go through [`HttpFile`]: the Hub redirects LFS
//! files to a storage host, which never receives the token. The Hub's `X-Error-Code`s
//! become one clear line each (missing or private repo, gated repo, missing revision or
//! file).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::http::{
    HttpClient, HttpConfig, HttpFile, HttpStatusError, encode_path, encode_segment, origin_of,
};
use super::{Source, SourceFile};

/// Where the Hub is and who we are: from the environment by [`HubConfig::from_env`], or
/// built directly (tests, other endpoints).
#[derive(Clone)]
pub struct HubConfig {
    /// The Hub's URL, without a trailing `/` (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The access token (`HF_TOKEN`, else the token file); sent only to the endpoint's origin.
    pub token: Option<String>,
    /// Timeouts, retries and the rest; its `token` field is ignored (set from `token`).
    pub http: HttpConfig,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("http", &self.http)
            .finish()
    }
}

impl std::fmt::Debug for HubSource {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("HubSource")
            .field("location", &self.location)
            .finish()
    }
}

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

impl HubConfig {
    /// The public Hub (or `endpoint`) without a token.
    pub fn new(endpoint: &str) -> HubConfig {
        HubConfig {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: None,
            http: HttpConfig::default(),
        }
    }

    /// As `huggingface_hub` reads it: `HF_ENDPOINT`; the token from `HF_TOKEN`, else the file
    /// `HF_TOKEN_PATH`, else `$HF_HOME/token` (`HF_HOME` defaulting to
    /// `~/.cache/huggingface`).
    pub fn from_env() -> HubConfig {
        HubConfig::from_vars(|k| std::env::var(k).ok())
    }

    /// [`HubConfig::from_env`] with the variables given by `var` (empty values count as
    /// unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubConfig {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let mut cfg = HubConfig::new(var("HF_ENDPOINT").as_deref().unwrap_or(DEFAULT_ENDPOINT));
        cfg.token = var("HF_TOKEN").map(|t| t.trim().to_string()).or_else(|| {
            let file = var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
                var("HF_HOME")
                    .map(PathBuf::from)
                    .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache/huggingface")))
                    .map(|h| h.join("token"))
            })?;
            let t = std::fs::read_to_string(file).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        });
        cfg
    }

    /// A client that sends the token to the endpoint's origin only.
    pub fn client(&self) -> HttpClient {
        let mut http = self.http.clone();
        http.token = match (&self.token, origin_of(&self.endpoint)) {
            (Some(t), Some(origin)) => Some((t.clone(), origin)),
            _ => None,
        };
        HttpClient::new(http)
    }
}

/// A Hub model repo at one commit, optionally one of its subfolders.
pub struct HubSource {
    repo: String,
    commit: String,
    endpoint: String,
    has_token: bool,
    /// The subfolder's path with a trailing `/`, or empty.
    prefix: String,
    client: HttpClient,
    location: PathBuf,
    /// Files under the subfolder, by path relative to it, with their sizes when the API
    /// gave them.
    files: BTreeMap<String, Option<u64>>,
    opened: Mutex<HashMap<String, HttpFile>>,
}

/// The API's answer about one revision (only what we use).
#[derive(serde::Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
}

fn valid_repo(repo: &str) -> bool {
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match repo.split_once('/') {
        Some((org, name)) => ok_part(org) && ok_part(name),
        None => ok_part(repo),
    }
}

impl HubSource {
    /// Repo `repo` (`org/name`) at `revision` (default `main`), in `subfolder` if given:
    /// resolves the revision to a commit and lists the files, one API request.
    pub fn open(
        repo: &str,
        revision: Option<&str>,
        subfolder: Option<&str>,
        cfg: &HubConfig,
    ) -> io::Result<HubSource> {
        if !valid_repo(repo) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{repo:?}: not a Hub repo name (expected org/name)"),
            ));
        }
        let rev = revision.unwrap_or("main");
        let client = cfg.client();
        let endpoint = cfg.endpoint.trim_end_matches('/').to_string();
        let has_token = cfg.token.is_some();
        let url = format!(
            "{endpoint}/api/models/{repo}/revision/{}?blobs=true",
            encode_segment(rev)
        );
        let body = client.get_bytes(&url, 256 << 20).map_err(|e| {
            let code = HttpStatusError::of(&e).and_then(|s| s.error_code.as_deref());
            if code == Some("RevisionNotFound") {
                return io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{repo}: no revision {rev:?} on {endpoint} (no such branch, tag or commit)"
                    ),
                );
            }
            explain(&e, repo, &endpoint, has_token).unwrap_or_else(|| {
                io::Error::new(
                    e.kind(),
                    format!("{repo}: cannot resolve revision {rev:?} on {endpoint}: {e}"),
                )
            })
        })?;
        let info: RevisionInfo = serde_json::from_slice(&body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{url}: not the Hub's answer about a revision: {e}"),
            )
        })?;
        if info.sha.is_empty() || !info.sha.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{url}: the answer has no valid commit sha ({:?})", info.sha),
            ));
        }
        let sub = subfolder.map(|s| s.trim_matches('/')).unwrap_or("");
        let prefix = if sub.is_empty() {
            String::new()
        } else {
            format!("{sub}/")
        };
        let files: BTreeMap<String, Option<u64>> = info
            .siblings
            .into_iter()
            .filter_map(|s| {
                let rel = s.rfilename.strip_prefix(&prefix)?.to_string();
                Some((rel, s.size))
            })
            .collect();
        if !prefix.is_empty() && files.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{repo}@{}: no folder {sub:?}", info.sha),
            ));
        }
        let mut location = format!("hf://{repo}@{}", info.sha);
        if !sub.is_empty() {
            location = format!("{location}/{sub}");
        }
        Ok(HubSource {
            repo: repo.to_string(),
            commit: info.sha,
            endpoint,
            has_token,
            prefix,
            client,
            location: PathBuf::from(location),
            files,
            opened: Mutex::default(),
        })
    }

    /// The commit every file is read at.
    pub fn commit(&self) -> &str {
        &self.commit
    }

    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// The client every file is read with (its [`HttpClient::bytes_fetched`] counts them).
    pub fn client(&self) -> &HttpClient {
        &self.client
    }

    /// Where file `name` (relative to the subfolder) is read from.
    pub fn url_of(&self, name: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            self.repo,
            self.commit,
            encode_path(&format!("{}{name}", self.prefix))
        )
    }

    fn no_file(&self, name: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{}@{}: no file {:?}",
                self.repo,
                self.commit,
                self.prefix.clone() + name
            ),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HttpFile>> {
        // Inserts are single calls: a poisoned map is still consistent.
        self.opened.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The one-line message for a Hub error answer, when `e` is one we know.
fn explain(e: &io::Error, repo: &str, endpoint: &str, has_token: bool) -> Option<io::Error> {
    let s = HttpStatusError::of(e)?;
    let msg = match (s.error_code.as_deref(), s.status) {
        (Some("GatedRepo"), _) if has_token => format!(
            "{repo} is gated and HF_TOKEN has no access to it: accept its license on the Hub with that account"
        ),
        (Some("GatedRepo"), _) => {
            format!("{repo} is gated: accept its license on the Hub and set HF_TOKEN")
        }
        (Some("RepoNotFound"), _) | (None, 401 | 404) if has_token => {
            format!("{repo}: no such model repo on {endpoint} (or HF_TOKEN has no access to it)")
        }
        (Some("RepoNotFound"), _) | (None, 401 | 404) => {
            format!("{repo}: no such model repo on {endpoint} (or it is private: set HF_TOKEN)")
        }
        (Some("RevisionNotFound"), _) => return None,
        (Some("DisabledRepo"), _) => format!("{repo}: the repo is disabled on {endpoint}"),
        (_, 401 | 403) => format!(
            "{repo}: access denied by {endpoint} ({s}): set HF_TOKEN to a token with read access"
        ),
        _ => return None,
    };
    let kind = match s.error_code.as_deref() {
        Some("RepoNotFound") => io::ErrorKind::NotFound,
        _ => e.kind(),
    };
    Some(io::Error::new(kind, msg))
}

impl Source for HubSource {
    fn identity(&self, name: &str) -> String {
        let len = self.file_len(name).ok().flatten();
        format!("{}@{} {name} {len:?}", self.location.display(), self.commit)
    }

    fn bytes_fetched(&self) -> Option<u64> {
        Some(self.client.bytes_fetched())
    }

    fn location(&self) -> &Path {
        &self.location
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self
            .files
            .keys()
            .filter(|n| !n.contains('/'))
            .cloned()
            .collect())
    }

    fn file_len(&self, name: &str) -> io::Result<Option<u64>> {
        match self.files.get(name) {
            None => Ok(None),
            Some(Some(size)) => Ok(Some(*size)),
            Some(None) => Ok(Some(self.open(name)?.len())),
        }
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn SourceFile>> {
        if !self.files.contains_key(name) {
            return Err(self.no_file(name));
        }
        if let Some(f) = self.lock().get(name) {
            return Ok(Box::new(f.clone()));
        }
        let f =
            HttpFile::open(&self.client, &self.url_of(name)).map_err(
                |e| match HttpStatusError::of(&e).map(|s| (s.error_code.as_deref(), s.status)) {
                    Some((Some("EntryNotFound"), _) | (None, 404)) => self.no_file(name),
                    _ => explain(&e, &self.repo, &self.endpoint, self.has_token).unwrap_or(e),
                },
            )?;
        let f = f.named(self.path_of(name));
        if let Some(Some(size)) = self.files.get(name)
            && *size != f.len()
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} bytes at commit {}, but the listing said {size}",
                    f.len(),
                    self.commit
                ),
            ));
        }
        self.lock().insert(name.to_string(), f.clone());
        Ok(Box::new(f))
    }
}
