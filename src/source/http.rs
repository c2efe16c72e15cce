//! Remote files read by HTTP range requests, and a folder URL as a [`Source`].
//!
//! [`HttpClient`] sends every request: it follows redirects itself so the bearer token goes
//! only to the origin it belongs to (the Hub redirects file reads to a storage host that must
//! never see it), and it retries connection errors, timeouts, 429 and 5xx with exponential
//! backoff and jitter, honouring `Retry-After`. [`HttpFile`] is one remote file: its length
//! and ETag are fixed when it is opened (by a first ranged GET that also keeps the file's
//! first bytes, where the safetensors header lives); every later read is a range request
//! whose `Content-Range` and ETag are checked, so a file changed under us is an error rather
//! than a silent mix, and a body cut mid-transfer is resumed from the last byte received.
//! [`HttpSource`] is a folder URL (or one file URL) as a model location.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Source, SourceFile};

/// How failed requests are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included (at least 1).
    pub attempts: u32,
    /// The delay before the first retry; it doubles with each further one.
    pub base_delay: Duration,
    /// The longest delay between attempts (`Retry-After` is honoured up to a minute).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// What an [`HttpClient`] is built from.
#[derive(Clone)]
pub struct HttpConfig {
    pub user_agent: String,
    /// A bearer token, and the origin (`scheme://host[:port]`) it is sent to; no other origin
    /// ever receives it.
    pub token: Option<(String, String)>,
    pub connect_timeout: Duration,
    /// The longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    pub retry: RetryPolicy,
    /// Bytes read at open time from the start of each file (safetensors headers usually fit).
    pub prefetch: u64,
    /// Set to stop: checked before every attempt and during backoff waits.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Reads of two parts or more go out as part requests, `parts_in_flight` at a time: one
    /// stream rarely fills a link (or a server's connection), several do.
    pub part_size: u64,
    pub parts_in_flight: usize,
}

impl fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // Never the token itself.
        f.debug_struct("HttpConfig")
            .field("user_agent", &self.user_agent)
            .field("token_origin", &self.token.as_ref().map(|t| &t.1))
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("retry", &self.retry)
            .field("prefetch", &self.prefetch)
            .field("part_size", &self.part_size)
            .field("parts_in_flight", &self.parts_in_flight)
            .finish()
    }
}

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig {
            user_agent: format!("mergestream/{}", env!("CARGO_PKG_VERSION")),
            token: None,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            prefetch: 64 * 1024,
            cancel: None,
            // Measured against a local nginx: 4 × 8 MiB beat one stream by ~15%.
            part_size: 8 << 20,
            parts_in_flight: 4,
        }
    }
}

/// An HTTP status the server answered that is not a retryable failure, with the Hub's
/// `X-Error-Code`/`X-Error-Message` when present. It is the inner error of the `io::Error`s
/// that report it, so callers (the Hub source) can tell a gated repo from a missing file.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpStatusError {
    pub status: u16,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

impl fmt::Display for HttpStatusError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "HTTP {}", status_text(self.status))?;
        match (&self.error_code, &self.error_message) {
            (Some(c), Some(m)) => write!(f, " ({c}: {m})"),
            (Some(c), None) => write!(f, " ({c})"),
            (None, Some(m)) => write!(f, " ({m})"),
            (None, None) => Ok(()),
        }
    }
}

impl std::error::Error for HttpStatusError {}

impl HttpStatusError {
    /// The status error inside `e`, if that is what `e` reports.
    pub fn of(e: &io::Error) -> Option<&HttpStatusError> {
        e.get_ref()?.downcast_ref::<HttpStatusError>()
    }

    fn into_io(self) -> io::Error {
        let kind = match self.status {
            404 | 410 => io::ErrorKind::NotFound,
            401 | 403 => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

fn status_text(status: u16) -> String {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        410 => "Gone",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    };
    if reason.is_empty() {
        status.to_string()
    } else {
        format!("{status} {reason}")
    }
}

/// A blocking HTTP client with the retry and token policy above; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    agent: ureq::Agent,
    cfg: Arc<HttpConfig>,
    /// Body bytes received, retries included (for progress and for tests).
    fetched: Arc<AtomicU64>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // Never the token.
        f.debug_struct("HttpClient")
            .field("token_origin", &self.cfg.token.as_ref().map(|t| &t.1))
            .finish()
    }
}

/// The answer to one request (after redirects), before its body is read.
struct Reply {
    /// The URL that answered (after redirects).
    url: String,
    status: u16,
    headers: ureq::http::HeaderMap,
    body: ureq::Body,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn status_error(&self) -> HttpStatusError {
        HttpStatusError {
            status: self.status,
            error_code: self.header("x-error-code").map(str::to_string),
            error_message: self.header("x-error-message").map(str::to_string),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        let s = self.header("retry-after")?.trim().parse::<u64>().ok()?;
        Some(Duration::from_secs(s))
    }
}

/// Why one attempt failed.
enum Failure {
    /// Worth another attempt (after `Retry-After` when the server gave one).
    Transient(String, Option<Duration>),
    /// Not worth retrying.
    Fatal(io::Error),
}

fn transient_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..=599).contains(&status)
}

fn transport_failure(e: ureq::Error) -> Failure {
    match e {
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound
        | ureq::Error::Protocol(_)
        | ureq::Error::BodyStalled => Failure::Transient(e.to_string(), None),
        other => Failure::Fatal(io::Error::other(other.to_string())),
    }
}

/// `scheme://authority` of an absolute URL, lowercased.
pub fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{authority}").to_ascii_lowercase())
}

/// Percent-encode one URL path segment (everything but RFC 3986 unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encode a `/`-separated relative path, segment by segment.
pub fn encode_path(s: &str) -> String {
    s.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// A random factor in [0.5, 1) for backoff jitter (std's per-hasher random keys suffice).
fn jitter() -> f64 {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    0.5 + (r >> 11) as f64 / (1u64 << 53) as f64 / 2.0
}

const MAX_REDIRECTS: u32 = 10;
/// Reads shorter than this are served from blocks of this size, the last few kept per file.
const BLOCK: u64 = 16 * 1024;
const BLOCKS_KEPT: usize = 8;
/// The largest file kept whole in memory when a server ignores range requests.
const WHOLE_FILE_LIMIT: u64 = 64 << 20;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

impl HttpClient {
    pub fn new(cfg: HttpConfig) -> HttpClient {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Redirects are followed by `send`, which decides where the token goes.
            .max_redirects(0)
            .user_agent(cfg.user_agent.as_str())
            .timeout_connect(Some(cfg.connect_timeout))
            .timeout_recv_response(Some(cfg.read_timeout))
            .timeout_per_read(Some(cfg.read_timeout))
            .build()
            .new_agent();
        HttpClient {
            agent,
            cfg: Arc::new(cfg),
            fetched: Arc::default(),
        }
    }

    pub fn config(&self) -> &HttpConfig {
        &self.cfg
    }

    /// Body bytes received so far by this client and its clones, retries included.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Read `buf.len()` bytes of `body` into `buf`; the count read before a failure is
    /// returned with it.
    fn fill(&self, body: ureq::Body, buf: &mut [u8]) -> Result<(), (usize, String)> {
        let mut r = body.into_with_config().limit(u64::MAX).reader();
        let mut got = 0;
        while got < buf.len() {
            let Some(dst) = buf.get_mut(got..) else { break };
            match r.read(dst) {
                Ok(0) => return Err((got, "the body ended early".to_string())),
                Ok(n) => {
                    got += n;
                    self.fetched.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((got, e.to_string())),
            }
        }
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cfg
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    fn cancelled_error() -> io::Error {
        io::Error::new(io::ErrorKind::Interrupted, "cancelled")
    }

    /// One request, redirects followed; the token is attached only on its own origin.
    fn send(&self, url: &str, range: Option<(u64, u64)>) -> Result<Reply, Failure> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.get(&url);
            if let Some((a, b)) = range {
                req = req.header("Range", format!("bytes={a}-{b}"));
            }
            if let Some((token, origin)) = &self.cfg.token
                && origin_of(&url).as_deref() == Some(origin.as_str())
            {
                req = req.header("Authorization", format!("Bearer {token}"));
            }
            let resp = req.call().map_err(transport_failure)?;
            let (parts, body) = resp.into_parts();
            let status = parts.status.as_u16();
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let loc = parts
                    .headers
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        Failure::Fatal(io::Error::other(format!(
                            "HTTP {status} redirect without a Location"
                        )))
                    })?;
                url = if loc.contains("://") {
                    loc.to_string()
                } else if loc.starts_with('/') {
                    let origin = origin_of(&url).unwrap_or_default();
                    format!("{origin}{loc}")
                } else {
                    return Err(Failure::Fatal(io::Error::other(format!(
                        "HTTP {status} redirect to an unsupported location {loc:?}"
                    ))));
                };
                continue;
            }
            return Ok(Reply {
                url,
                status,
                headers: parts.headers,
                body,
            });
        }
        Err(Failure::Fatal(io::Error::other(format!(
            "more than {MAX_REDIRECTS} redirects"
        ))))
    }

    /// Wait before attempt `attempt + 1` (`attempt` counts from 1); false when cancelled.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> bool {
        let p = &self.cfg.retry;
        let delay = match retry_after {
            // The server knows best, within reason: a longer wait would look like a hang.
            Some(d) => d.min(MAX_RETRY_AFTER),
            None => {
                let exp = p
                    .base_delay
                    .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
                exp.min(p.max_delay).mul_f64(jitter())
            }
        };
        let end = Instant::now() + delay;
        // Sleep in slices so cancellation is noticed promptly.
        loop {
            if self.cancelled() {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }

    /// Run `attempt` until it succeeds, fails fatally, or the policy's attempts are spent;
    /// `what` starts the final error (`bytes A..B`, `GET`). `attempt` returns whether it
    /// made progress, which earns a fresh count (a resumed body is not a failed request).
    fn retrying<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> Result<T, (Failure, bool)>,
    ) -> io::Result<T> {
        let max = self.cfg.retry.attempts.max(1);
        let mut n = 0;
        loop {
            if self.cancelled() {
                return Err(Self::cancelled_error());
            }
            n += 1;
            match attempt() {
                Ok(v) => return Ok(v),
                Err((Failure::Fatal(e), _)) => return Err(e),
                Err((Failure::Transient(reason, after), progress)) => {
                    if progress {
                        n = 1;
                    }
                    if n >= max {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("{what}: gave up after {max} attempts: {reason}"),
                        ));
                    }
                    if !self.backoff(n, after) {
                        return Err(Self::cancelled_error());
                    }
                }
            }
        }
    }

    /// The whole body of `url` (an API answer, a small file), retried.
    pub fn get_bytes(&self, url: &str, limit: u64) -> io::Result<Vec<u8>> {
        self.retrying("GET", || {
            let r = self.send(url, None).map_err(|f| (f, false))?;
            if !(200..300).contains(&r.status) {
                let e = r.status_error();
                return Err(if transient_status(r.status) {
                    let after = r.retry_after();
                    (Failure::Transient(e.to_string(), after), false)
                } else {
                    (Failure::Fatal(e.into_io()), false)
                });
            }
            let mut v = Vec::new();
            let read = r
                .body
                .into_with_config()
                .limit(limit)
                .reader()
                .read_to_end(&mut v);
            self.fetched.fetch_add(v.len() as u64, Ordering::Relaxed);
            read.map_err(|e| (Failure::Transient(e.to_string(), None), false))?;
            Ok(v)
        })
    }
}

/// `bytes a-b/total` (or `bytes */total`) → (a, b, total); a or b `None` for `*`.
fn parse_content_range(s: &str) -> Option<(Option<(u64, u64)>, u64)> {
    let rest = s.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let total = total.trim().parse().ok()?;
    if span.trim() == "*" {
        return Some((None, total));
    }
    let (a, b) = span.split_once('-')?;
    Some((
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
        total,
    ))
}

/// Cached blocks of a file: (offset, bytes).
type Blocks = VecDeque<(u64, Arc<Vec<u8>>)>;

/// One remote file, read by range requests.
#[derive(Clone)]
pub struct HttpFile {
    client: HttpClient,
    url: String,
    path: PathBuf,
    len: u64,
    etag: Option<String>,
    /// The file's first bytes, fetched at open time.
    head: Arc<Vec<u8>>,
    /// The last blocks fetched for small reads, oldest first.
    blocks: Arc<Mutex<Blocks>>,
    /// Where `url` last redirected to: reads go there directly, saving the Hub a request
    /// each, until it stops answering (a signed storage URL expires).
    target: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for HttpFile {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("HttpFile")
            .field("url", &self.url)
            .field("len", &self.len)
            .field("etag", &self.etag)
            .finish()
    }
}

impl HttpFile {
    /// Open `url`: one ranged GET of its first bytes fixes its length and ETag. Messages name
    /// the file `url` (see [`HttpFile::named`]).
    pub fn open(client: &HttpClient, url: &str) -> io::Result<HttpFile> {
        let want = client.cfg.prefetch.max(1);
        client.retrying(&format!("bytes 0..{want}"), || {
            Self::open_once(client, url, want).map_err(|f| (f, false))
        })
    }

    /// One attempt at [`HttpFile::open`], reading up to `want` bytes.
    fn open_once(client: &HttpClient, url: &str, want: u64) -> Result<HttpFile, Failure> {
        let r = client.send(url, Some((0, want - 1)))?;
        if transient_status(r.status) {
            let after = r.retry_after();
            return Err(Failure::Transient(r.status_error().to_string(), after));
        }
        if !(200..300).contains(&r.status) && r.status != 416 {
            return Err(Failure::Fatal(r.status_error().into_io()));
        }
        let fatal = |m: String| Failure::Fatal(io::Error::other(m));
        let etag = r.header("etag").map(str::to_string);
        let mut file = HttpFile {
            client: client.clone(),
            url: url.to_string(),
            path: PathBuf::from(url),
            len: 0,
            etag,
            head: Arc::default(),
            blocks: Arc::default(),
            target: Arc::new(Mutex::new((r.url != url).then(|| r.url.clone()))),
        };
        let content_range = r.header("content-range").map(str::to_string);
        match r.status {
            206 => {
                let Some((Some((a, b)), total)) =
                    content_range.as_deref().and_then(parse_content_range)
                else {
                    return Err(fatal(format!(
                        "a 206 answer without a valid Content-Range ({content_range:?})"
                    )));
                };
                if a != 0 || b < a || b >= total || b >= want {
                    return Err(fatal(format!(
                        "asked for bytes 0-{}, got Content-Range {content_range:?}",
                        want - 1
                    )));
                }
                let mut head = vec![0u8; (b - a + 1) as usize];
                client
                    .fill(r.body, &mut head)
                    .map_err(|(_, e)| Failure::Transient(e, None))?;
                file.len = total;
                file.head = Arc::new(head);
            }
            // Past the end: an empty file.
            416 => {
                match content_range.as_deref().and_then(parse_content_range) {
                    Some((None, total)) => file.len = total,
                    _ => return Err(Failure::Fatal(r.status_error().into_io())),
                }
                if file.len != 0 {
                    return Err(fatal(format!(
                        "bytes 0-{} not satisfiable in a file of {} bytes",
                        want - 1,
                        file.len
                    )));
                }
            }
            // No range support: acceptable for a file small enough to keep whole.
            _ => {
                let len = r.body.content_length().unwrap_or(u64::MAX);
                if len > WHOLE_FILE_LIMIT {
                    return Err(fatal(format!(
                        "the server ignores range requests (200 instead of 206) and the file is over {} MiB",
                        WHOLE_FILE_LIMIT >> 20
                    )));
                }
                let mut head = vec![0u8; len as usize];
                client
                    .fill(r.body, &mut head)
                    .map_err(|(_, e)| Failure::Transient(e, None))?;
                file.len = len;
                file.head = Arc::new(head);
            }
        }
        Ok(file)
    }

    /// The same file, named `path` in messages.
    pub fn named(mut self, path: impl Into<PathBuf>) -> HttpFile {
        self.path = path.into();
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The ETag seen when the file was opened.
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    fn set_target(&self, to: Option<String>) {
        if let Ok(mut t) = self.target.lock() {
            *t = to;
        }
    }

    /// One attempt at bytes `[offset, offset + buf.len())`; on failure, how many bytes were
    /// filled.
    fn read_once(&self, offset: u64, buf: &mut [u8]) -> Result<(), (Failure, usize)> {
        let end = offset + buf.len() as u64 - 1;
        let range = Some((offset, end));
        let target = self.target.lock().ok().and_then(|t| t.clone());
        let r = match target {
            Some(t) => {
                let r = self.client.send(&t, range).map_err(|f| (f, 0))?;
                if matches!(r.status, 401 | 403 | 404 | 410) {
                    // Expired or withdrawn: ask the file's own URL again.
                    self.set_target(None);
                    self.client.send(&self.url, range).map_err(|f| (f, 0))?
                } else {
                    r
                }
            }
            None => self.client.send(&self.url, range).map_err(|f| (f, 0))?,
        };
        if (200..300).contains(&r.status) && r.url != self.url {
            self.set_target(Some(r.url.clone()));
        }
        if transient_status(r.status) {
            let after = r.retry_after();
            return Err((Failure::Transient(r.status_error().to_string(), after), 0));
        }
        if !matches!(r.status, 200 | 206) {
            return Err((Failure::Fatal(r.status_error().into_io()), 0));
        }
        let fatal = |msg: String| (Failure::Fatal(io::Error::other(msg)), 0);
        if let (Some(was), Some(now)) = (&self.etag, r.header("etag"))
            && was != now
        {
            return Err((
                Failure::Fatal(io::Error::other(format!(
                    "changed while being read (ETag {was} became {now})"
                ))),
                0,
            ));
        }
        match r.status {
            206 => {
                let cr = r.header("content-range").unwrap_or("");
                match parse_content_range(cr) {
                    Some((_, total)) if total != self.len => {
                        return Err(fatal(format!(
                            "changed while being read (length {} became {total})",
                            self.len
                        )));
                    }
                    Some((Some((a, b)), _)) if a == offset && b == end => {}
                    _ => {
                        return Err(fatal(format!(
                            "asked for bytes {offset}-{end}, got Content-Range {cr:?}"
                        )));
                    }
                }
            }
            200 if offset == 0 && buf.len() as u64 == self.len => {
                if r.body.content_length().is_some_and(|l| l != self.len) {
                    return Err(fatal(format!(
                        "changed while being read (length {} became {})",
                        self.len,
                        r.body.content_length().unwrap_or(0)
                    )));
                }
            }
            _ => {
                return Err(fatal(
                    "the server ignored the range request (200 instead of 206)".to_string(),
                ));
            }
        }
        self.client
            .fill(r.body, buf)
            .map_err(|(got, e)| (Failure::Transient(e, None), got))
    }
}

impl SourceFile for HttpFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(end) = offset.checked_add(buf.len() as u64) else {
            return Err(io::ErrorKind::UnexpectedEof.into());
        };
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "bytes {offset}..{end} lie past the end of the file ({} bytes)",
                    self.len
                ),
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(src) = self.head.get(offset as usize..end as usize) {
            buf.copy_from_slice(src);
            return Ok(());
        }
        if (buf.len() as u64) < BLOCK {
            return self.read_blocks(offset, buf);
        }
        let part = self.client.config().part_size.max(1);
        if buf.len() as u64 >= 2 * part {
            return self.fetch_parts(offset, buf, part);
        }
        self.fetch(offset, buf)
    }
}

impl HttpFile {
    /// A large read as concurrent part requests, each retried and resumed on its own; the
    /// first failure is the read's.
    fn fetch_parts(&self, offset: u64, buf: &mut [u8], part: u64) -> io::Result<()> {
        let parts: Vec<(u64, &mut [u8])> = buf
            .chunks_mut(part as usize)
            .enumerate()
            .map(|(i, chunk)| (offset + i as u64 * part, chunk))
            .collect();
        let queue = Mutex::new(parts.into_iter());
        let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
        let work = || {
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some((at, chunk)) = next else { break };
                if first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some()
                {
                    break;
                }
                if let Err(e) = self.fetch(at, chunk) {
                    first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                    break;
                }
            }
        };
        std::thread::scope(|scope| {
            // Helpers the system refuses to start are not needed: this thread works too.
            for _ in 1..self.client.config().parts_in_flight {
                let _ = std::thread::Builder::new().spawn_scoped(scope, work);
            }
            work();
        });
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Bytes `[offset, offset + buf.len())` by range requests, resuming cut bodies.
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        // `done` bytes are in; a cut body resumes from there.
        let mut done = 0usize;
        self.client.retrying(&format!("bytes {offset}..{end}"), || {
            let from = offset + done as u64;
            let dst = buf.get_mut(done..).unwrap_or_default();
            match self.read_once(from, dst) {
                Ok(()) => Ok(()),
                Err((f, got)) => {
                    done += got;
                    Err((f, got > 0))
                }
            }
        })
    }

    /// A small read, served from whole aligned blocks kept for the next small reads: the
    /// pickle and zip parsers read a few KiB at a time around seeks, which would otherwise be
    /// a request each.
    fn read_blocks(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut pos = offset;
        let end = offset + buf.len() as u64;
        while pos < end {
            let start = pos - pos % BLOCK;
            let block = self.block(start)?;
            let from = (pos - start) as usize;
            let n = (block.len() - from.min(block.len())).min((end - pos) as usize);
            let (Some(src), Some(dst)) = (
                block.get(from..from + n),
                buf.get_mut((pos - offset) as usize..(pos - offset) as usize + n),
            ) else {
                return Err(io::ErrorKind::UnexpectedEof.into());
            };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            dst.copy_from_slice(src);
            pos += n as u64;
        }
        Ok(())
    }

    /// The block at `start`, from the cache or fetched (and cached).
    fn block(&self, start: u64) -> io::Result<Arc<Vec<u8>>> {
        if let Ok(blocks) = self.blocks.lock()
            && let Some((_, b)) = blocks.iter().find(|(s, _)| *s == start)
        {
            return Ok(b.clone());
        }
        let mut b = vec![0u8; (self.len - start).min(BLOCK) as usize];
        self.fetch(start, &mut b)?;
        let b = Arc::new(b);
        if let Ok(mut blocks) = self.blocks.lock() {
            if blocks.len() >= BLOCKS_KEPT {
                blocks.pop_front();
            }
            blocks.push_back((start, b.clone()));
        }
        Ok(b)
    }
}

/// Files whose names are probed when a folder URL cannot be listed.
const KNOWN_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
];

/// A folder URL (`https://host/path/`, files at `url/name`) or one file URL.
#[derive(Debug)]
pub struct HttpSource {
    client: HttpClient,
    /// The folder URL, without a trailing `/`.
    base: String,
    location: PathBuf,
    /// The one file, when the URL named a file.
    single: Option<String>,
    /// Files opened or found missing so far (a probe is one request, made once).
    opened: Mutex<HashMap<String, Option<HttpFile>>>,
}

impl HttpSource {
    /// The folder or file at `url`. A URL whose last segment ends in `.safetensors`, `.bin`,
    /// `.pt` or `.pth` is one file; anything else is a folder.
    pub fn new(client: &HttpClient, url: &str) -> io::Result<HttpSource> {
        if origin_of(url).is_none() || !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{url}: not an http(s):// URL"),
            ));
        }
        let trimmed = url.trim_end_matches('/');
        let last = trimmed.rsplit('/').next().unwrap_or("");
        let is_file = !url.ends_with('/')
            && [".safetensors", ".bin", ".pt", ".pth"]
                .iter()
                .any(|x| last.ends_with(x));
        let (base, single) = match trimmed.rsplit_once('/') {
            Some((dir, name)) if is_file => (dir.to_string(), Some(name.to_string())),
            _ => (trimmed.to_string(), None),
        };
        Ok(HttpSource {
            client: client.clone(),
            location: PathBuf::from(&base),
            base,
            single,
            opened: Mutex::default(),
        })
    }

    /// The client every file is read with.
    pub fn client(&self) -> &HttpClient {
        &self.client
    }

    /// The one file the URL named, if it named one.
    pub fn file_name(&self) -> Option<&str> {
        self.single.as_deref()
    }

    fn url_of(&self, name: &str) -> String {
        format!("{}/{}", self.base, encode_path(name))
    }

    /// File `name`, opened once; `None` when the server has no such file.
    fn probe(&self, name: &str) -> io::Result<Option<HttpFile>> {
        if self.single.as_deref().is_some_and(|s| s != name) {
            return Ok(None);
        }
        if let Some(f) = self.lock().get(name) {
            return Ok(f.clone());
        }
        let f = match HttpFile::open(&self.client, &self.url_of(name)) {
            Ok(f) => Some(f.named(self.path_of(name))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        self.lock().insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<HttpFile>>> {
        // A panic elsewhere cannot leave the map half-updated: inserts are single calls.
        self.opened.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Source for HttpSource {
    fn bytes_fetched(&self) -> Option<u64> {
        Some(self.client.bytes_fetched())
    }

    fn location(&self) -> &Path {
        &self.location
    }

    fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from(self.url_of(name))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        if let Some(s) = &self.single {
            return Ok(vec![s.clone()]);
        }
        let mut names = Vec::new();
        for name in KNOWN_FILES {
            if self.probe(name)?.is_some() {
                names.push(name.to_string());
            }
        }
        // Shards named by an index.
        for index in [
            "model.safetensors.index.json",
            "pytorch_model.bin.index.json",
        ] {
            if !names.iter().any(|n| n == index) {
                continue;
            }
            let Some(bytes) = self.read_small(index)? else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.url_of(index)),
                )
            })?;
            if let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) {
                for shard in map.values().filter_map(|s| s.as_str()) {
                    if !shard.contains('/') && !names.iter().any(|n| n == shard) {
                        names.push(shard.to_string());
                    }
                }
            }
        }
        Ok(names)
    }

    fn file_len(&self, name: &str) -> io::Result<Option<u64>> {
        Ok(self.probe(name)?.map(|f| f.len))
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn SourceFile>> {
        match self.probe(name)? {
            Some(f) => Ok(Box::new(f)),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: not found (HTTP 404)", self.url_of(name)),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-1023/4096"),
            Some((Some((0, 1023)), 4096))
        );
        assert_eq!(parse_content_range("bytes */0"), Some((None, 0)));
        assert_eq!(parse_content_range("bytes 5-/9"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn origins_and_paths() {
        assert_eq!(
            origin_of("https://HuggingFace.co/org/name/resolve/x").as_deref(),
            Some("https://huggingface.co")
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8080?x").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(origin_of("/relative"), None);
        assert_eq!(origin_of("http:///x"), None);
        assert_eq!(encode_path("sub dir/a+b.json"), "sub%20dir/a%2Bb.json");
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.5..1.0).contains(&j), "{j}");
        }
    }
}
