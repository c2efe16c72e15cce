//! A model under an S3 prefix (`s3://bucket/prefix`), on AWS or an S3-compatible store.
//!
//! Built on `object_store` (the Apache Arrow project's client) rather than the AWS SDK: it
//! signs requests, speaks to any S3-compatible endpoint, retries transient failures with
//! bounded backoff, resumes a body cut mid-transfer (checking the ETag) and sends
//! `If-Match` — everything a range reader needs, in one crate with a fraction of the SDK's
//! dependencies and build time.
//!
//! `object_store` is async; the pipeline is threads. Each source owns a tokio runtime with
//! one worker that drives the connections, and every call `block_on`s its request on the
//! calling thread, so reads from several pipeline threads run concurrently, behind no lock.
//! (Calling from inside another tokio runtime is not supported: `block_on` would panic.)
//!
//! A file's size and ETag are fixed when it is opened and every range read carries
//! `If-Match`: an object overwritten during a run is an error, never a mix of versions. A
//! large read is split into parts fetched concurrently into the caller's buffer.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, RetryConfig,
};
use tokio::runtime::Runtime;

use super::{Source, SourceFile};

/// How to reach and sign for S3: the standard AWS environment ([`S3Config::from_env`]), or
/// set by hand (tests, other callers).
#[derive(Clone)]
pub struct S3Config {
    /// The region (`AWS_REGION`, else `AWS_DEFAULT_REGION`, else `us-east-1`).
    pub region: String,
    /// Another store's endpoint, e.g. `http://127.0.0.1:9000` (`AWS_ENDPOINT_URL_S3`, else
    /// `AWS_ENDPOINT_URL`); `None` is AWS. Buckets are addressed path-style under it.
    pub endpoint: Option<String>,
    /// `AWS_ACCESS_KEY_ID`; without keys, `object_store`'s other providers are tried
    /// (web identity, container and instance credentials).
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN` (temporary credentials).
    pub session_token: Option<String>,
    /// Send unsigned requests (public buckets; `AWS_SKIP_SIGNATURE=true`).
    pub skip_signature: bool,
    /// Allow plain `http://` endpoints (`AWS_ALLOW_HTTP=true`, or an endpoint that starts
    /// with `http://`: a local store the user named).
    pub allow_http: bool,
    /// Retries of one request after a transient failure (connection errors, timeouts, 5xx,
    /// throttling), with exponential backoff; a cut body is resumed within the same budget.
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// The first backoff delay (doubling, capped at 15 s).
    pub initial_backoff: Duration,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Time allowed for one whole request, body included.
    pub request_timeout: Duration,
    /// A read larger than this is split into ranged GETs of this size…
    pub part_size: usize,
    /// …of which this many are in flight at once.
    pub parts_in_flight: usize,
    /// Set to stop: requests in flight are dropped (checked every 50 ms).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for S3Config {
    fn default() -> S3Config {
        S3Config {
            region: "us-east-1".to_string(),
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            skip_signature: false,
            allow_http: false,
            max_retries: 5,
            retry_timeout: Duration::from_secs(120),
            initial_backoff: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            part_size: 8 << 20,
            parts_in_flight: 4,
            cancel: None,
        }
    }
}

// Secrets stay out of debug output and so out of logs.
impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "…"),
            )
            .field("session_token", &self.session_token.as_ref().map(|_| "…"))
            .field("skip_signature", &self.skip_signature)
            .field("allow_http", &self.allow_http)
            .field("max_retries", &self.max_retries)
            .field("part_size", &self.part_size)
            .field("parts_in_flight", &self.parts_in_flight)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// The standard AWS environment variables (see the fields).
    pub fn from_env() -> S3Config {
        S3Config::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`S3Config::from_env`], with variables looked up by `var` (empty values count as
    /// unset, as the AWS tools do).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> S3Config {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let flag = |k: &str| get(k).is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let endpoint = get("AWS_ENDPOINT_URL_S3").or_else(|| get("AWS_ENDPOINT_URL"));
        let allow_http = flag("AWS_ALLOW_HTTP")
            || endpoint
                .as_deref()
                .is_some_and(|e| e.to_ascii_lowercase().starts_with("http://"));
        S3Config {
            region: get("AWS_REGION")
                .or_else(|| get("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".to_string()),
            endpoint,
            access_key_id: get("AWS_ACCESS_KEY_ID"),
            secret_access_key: get("AWS_SECRET_ACCESS_KEY"),
            session_token: get("AWS_SESSION_TOKEN"),
            skip_signature: flag("AWS_SKIP_SIGNATURE"),
            allow_http,
            ..S3Config::default()
        }
    }

    fn store(&self, bucket: &str) -> object_store::Result<AmazonS3> {
        let client = ClientOptions::new()
            .with_allow_http(self.allow_http)
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout);
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: self.initial_backoff,
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&self.region)
            .with_allow_http(self.allow_http)
            .with_skip_signature(self.skip_signature)
            .with_client_options(client)
            .with_retry(retry);
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(k) = &self.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &self.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        if let Some(t) = &self.session_token {
            b = b.with_token(t);
        }
        b.build()
    }
}

/// What a source and its open files share: the client and the runtime that drives it.
struct Client {
    store: AmazonS3,
    part_size: usize,
    parts_in_flight: usize,
    cancel: Option<Arc<AtomicBool>>,
    /// Always `Some` until dropped.
    runtime: Option<Runtime>,
}

/// A request dropped because the run was interrupted.
struct Cancelled;

impl From<Cancelled> for io::Error {
    fn from(_: Cancelled) -> io::Error {
        io::Error::new(io::ErrorKind::Interrupted, "cancelled")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Dropping a runtime inside another one panics; shutting it down in the background
        // does not, and nothing is in flight once the last file is gone.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Client {
    /// Drive `f` to completion, or drop it when the run is cancelled.
    fn run<T: Send>(&self, f: impl Future<Output = T> + Send) -> Result<T, Cancelled> {
        let cancel = self.cancel.clone();
        let f = async move {
            let Some(flag) = cancel else {
                return Ok(f.await);
            };
            let watch = async move {
                while !flag.load(Ordering::Relaxed) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            };
            match futures_util::future::select(std::pin::pin!(f), std::pin::pin!(watch)).await {
                futures_util::future::Either::Left((v, _)) => Ok(v),
                futures_util::future::Either::Right(_) => Err(Cancelled),
            }
        };
        let Some(runtime) = &self.runtime else {
            unreachable!("the runtime is only taken on drop");
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called from inside some tokio runtime, where `block_on` would panic: block on
            // a plain thread instead.
            return std::thread::scope(|s| {
                s.spawn(|| runtime.block_on(f))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            });
        }
        runtime.block_on(f)
    }
}

/// The objects under `s3://bucket/prefix`, read by ranged GETs.
pub struct S3Source {
    client: Arc<Client>,
    bucket: String,
    /// The prefix without leading or trailing `/` (empty: the bucket's top level).
    prefix: String,
    location: PathBuf,
}

impl fmt::Debug for S3Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Source")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl S3Source {
    /// The objects under `prefix` in `bucket`. Lists the prefix once, so a missing bucket,
    /// refused credentials or an empty prefix fail here, naming `s3://bucket/prefix`.
    pub fn open(bucket: &str, prefix: &str, cfg: &S3Config) -> io::Result<S3Source> {
        let prefix = prefix.trim_matches('/').to_string();
        let location = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let named = |what: String| io::Error::other(format!("{location}: {what}"));
        if bucket.is_empty() || bucket.contains('/') {
            return Err(named("not a bucket name".to_string()));
        }
        let store = cfg
            .store(bucket)
            .map_err(|e| named(format!("bad S3 configuration: {}", one_line(&e))))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mergestream-s3")
            .enable_all()
            .build()
            .map_err(|e| named(format!("cannot start the S3 client: {e}")))?;
        let source = S3Source {
            client: Arc::new(Client {
                store,
                part_size: cfg.part_size,
                parts_in_flight: cfg.parts_in_flight,
                cancel: cfg.cancel.clone(),
                runtime: Some(runtime),
            }),
            bucket: bucket.to_string(),
            prefix,
            location: PathBuf::from(&location),
        };
        let names = source
            .list()
            .map_err(|e| io::Error::new(e.kind(), format!("{location}: {e}")))?;
        if names.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{location}: no objects under this prefix"),
            ));
        }
        Ok(source)
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix (without leading or trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }
}

impl Source for S3Source {
    fn location(&self) -> &Path {
        &self.location
    }

    fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}/{name}", self.location.display()))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let listing = self
            .client
            .run(self.client.store.list_with_delimiter(prefix.as_ref()))?
            .map_err(|e| io_error(e, "cannot list"))?;
        Ok(listing
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect())
    }

    fn file_len(&self, name: &str) -> io::Result<Option<u64>> {
        match self.client.run(self.client.store.head(&self.key(name)))? {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io_error(e, "")),
        }
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn SourceFile>> {
        let key = self.key(name);
        let meta = self
            .client
            .run(self.client.store.head(&key))?
            .map_err(|e| io_error(e, ""))?;
        Ok(Box::new(S3File {
            client: self.client.clone(),
            path: self.path_of(name),
            key,
            len: meta.size,
            e_tag: meta.e_tag,
        }))
    }

    // One GET, instead of a HEAD for the length, a HEAD to open and a GET.
    fn read_small(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let key = self.key(name);
        let got = self.client.run(async {
            let r = self
                .client
                .store
                .get_opts(&key, GetOptions::default())
                .await?;
            let size = r.meta.size;
            r.bytes().await.map(|b| (size, b))
        })?;
        match got {
            Ok((size, bytes)) if bytes.len() as u64 == size => Ok(Some(Vec::from(bytes))),
            Ok((size, bytes)) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short body: {} of {size} bytes", bytes.len()),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io_error(e, "")),
        }
    }
}

/// One object, its size and ETag fixed when it was opened.
struct S3File {
    client: Arc<Client>,
    path: PathBuf,
    key: ObjectPath,
    len: u64,
    e_tag: Option<String>,
}

impl SourceFile for S3File {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of bytes {offset}..{end} past the end ({} bytes)",
                    self.len
                ),
            ));
        }
        // A large read goes out as several ranged GETs at once, each straight into its part
        // of the caller's buffer: the link stays busy with no extra memory.
        let part = self.client.part_size.max(1);
        // Collected first: a lazy `map` in the future trips the compiler's `Send` check.
        let parts: Vec<_> = buf
            .chunks_mut(part)
            .enumerate()
            .map(|(i, dst)| self.read_part(offset + (i * part) as u64, dst))
            .collect();
        let in_flight = self.client.parts_in_flight.max(1);
        self.client.run(async move {
            futures_util::stream::iter(parts)
                .buffer_unordered(in_flight)
                .try_collect::<()>()
                .await
        })?
    }
}

impl S3File {
    /// One ranged GET of `dst.len()` bytes at `at`, into `dst`.
    async fn read_part(&self, at: u64, dst: &mut [u8]) -> io::Result<()> {
        let want = dst.len();
        let opts = GetOptions {
            // The store refuses the read (412) when the object is no longer the one opened.
            if_match: self.e_tag.clone(),
            range: Some((at..at + want as u64).into()),
            ..GetOptions::default()
        };
        let r = self
            .client
            .store
            .get_opts(&self.key, opts)
            .await
            .map_err(|e| io_error(e, ""))?;
        // Stores without ETags: a changed size still shows a different object.
        if r.meta.size != self.len {
            return Err(changed(format!(
                "its size is now {} bytes, was {}",
                r.meta.size, self.len
            )));
        }
        // The stream resumes a cut body itself (same ETag, within the retry budget).
        let mut stream = r.into_stream();
        let mut filled = 0usize;
        while let Some(bytes) = stream.next().await {
            let bytes = bytes.map_err(|e| io_error(e, ""))?;
            let Some(d) = dst.get_mut(filled..filled + bytes.len()) else {
                return Err(io::Error::other(format!(
                    "the server sent more than the {want} bytes asked for at offset {at}"
                )));
            };
            d.copy_from_slice(&bytes);
            filled += bytes.len();
        }
        if filled != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short body: {filled} of {want} bytes at offset {at}"),
            ));
        }
        Ok(())
    }
}

fn changed(detail: String) -> io::Error {
    io::Error::other(format!(
        "the object changed since it was opened ({detail}); rerun to read the new version"
    ))
}

/// An `object_store` error as one line saying what is wrong; the caller names the object.
/// `doing` prefixes errors other than the well-known ones ("cannot list").
fn io_error(e: object_store::Error, doing: &str) -> io::Error {
    use object_store::Error as E;
    let text = one_line(&e);
    let reason = s3_code(&text);
    let code = reason.as_deref().map(|r| r.split(':').next().unwrap_or(r));
    // Some requests (listings) come back as generic errors: the S3 code in the body, or
    // the status in the text, still tells what went wrong.
    let status = |s: &str| text.contains(&format!("status code: {s}"));
    let with_reason = |what: &str| match &reason {
        Some(r) => format!("{what} ({r})"),
        None => what.to_string(),
    };
    if code == Some("NoSuchBucket") {
        return io::Error::new(io::ErrorKind::NotFound, with_reason("no such bucket"));
    }
    if matches!(e, E::NotFound { .. }) || code == Some("NoSuchKey") || status("404") {
        return io::Error::new(io::ErrorKind::NotFound, with_reason("no such object"));
    }
    if matches!(e, E::Precondition { .. }) || code == Some("PreconditionFailed") || status("412") {
        return changed("its ETag no longer matches".to_string());
    }
    const DENIED: &[&str] = &[
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    ];
    if matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. })
        || code.is_some_and(|c| DENIED.contains(&c))
        || status("401")
        || status("403")
    {
        return io::Error::new(
            io::ErrorKind::PermissionDenied,
            with_reason(
                "access denied: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and \
                 AWS_SESSION_TOKEN",
            ),
        );
    }
    // The store's name adds nothing to a message that names the `s3://` object.
    // AWS redirects requests for a bucket of another region, without a body.
    if status("301") || code == Some("PermanentRedirect") {
        return io::Error::other(with_reason(
            "the bucket is in another region: set AWS_REGION to its region",
        ));
    }
    let what = reason.unwrap_or_else(|| text.trim_start_matches("Generic S3 error: ").to_string());
    if doing.is_empty() {
        io::Error::other(what)
    } else {
        io::Error::other(format!("{doing}: {what}"))
    }
}

/// The S3 error code and message of a response body quoted in an error
/// (`<Code>NoSuchKey</Code><Message>…</Message>`), as `NoSuchKey: …`.
fn s3_code(text: &str) -> Option<String> {
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let start = text.find(&open)? + open.len();
        let end = start + text[start..].find(&format!("</{t}>"))?;
        Some(text[start..end].trim().to_string())
    };
    let code = tag("Code")?;
    Some(match tag("Message") {
        Some(m) if !m.is_empty() => format!("{code}: {m}"),
        _ => code,
    })
}

/// An error and its sources on one line, bounded in length (a server's body can be long).
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    let mut s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > 400 {
        let cut = (0..=400)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_from_the_aws_environment() {
        let vars = [
            ("AWS_DEFAULT_REGION", "eu-west-3"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "SK"),
            ("AWS_SESSION_TOKEN", ""),
        ];
        let c = S3Config::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(c.region, "eu-west-3");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(c.allow_http);
        assert_eq!(c.access_key_id.as_deref(), Some("AK"));
        assert_eq!(c.secret_access_key.as_deref(), Some("SK"));
        assert_eq!(c.session_token, None);
        assert!(!format!("{c:?}").contains("SK"));

        let c = S3Config::from_vars(|k| match k {
            "AWS_REGION" => Some("us-west-2".into()),
            "AWS_DEFAULT_REGION" => Some("eu-west-3".into()),
            "AWS_ENDPOINT_URL" => Some("https://a.example".into()),
            "AWS_ENDPOINT_URL_S3" => Some("https://s3.example".into()),
            _ => None,
        });
        assert_eq!(c.region, "us-west-2");
        assert_eq!(c.endpoint.as_deref(), Some("https://s3.example"));
        assert!(!c.allow_http);
    }

    /// `text` as the generic error a listing gives.
    fn generic(text: &str) -> io::Error {
        let e = object_store::Error::Generic {
            store: "S3",
            source: text.into(),
        };
        io_error(e, "cannot list")
    }

    #[test]
    fn errors_say_what_is_wrong_on_one_line() {
        let e = generic(
            "Error performing GET http://h/b in 1ms - Server returned error response: \
             <Error>\n<Code>NoSuchKey</Code>\n<Message>The specified key does not exist.\
             </Message></Error>",
        );
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "no such object (NoSuchKey: The specified key does not exist.)"
        );
        let e = generic(
            "Error performing GET http://h/b in 1ms - Server returned non-2xx status code: 301 Moved Permanently: ",
        );
        assert_eq!(
            e.to_string(),
            "the bucket is in another region: set AWS_REGION to its region"
        );
        let e = generic(
            "Error performing GET http://h/b in 1ms - Server returned non-2xx status code: 403 Forbidden: ",
        );
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let e = generic(
            "Error performing GET http://h/b in 1ms - Server returned non-2xx status code: 412 Precondition Failed: ",
        );
        assert!(
            e.to_string()
                .starts_with("the object changed since it was opened")
        );
        let e = generic("Error performing GET http://h/b in 1ms - HTTP error: timed out\n");
        assert_eq!(
            e.to_string(),
            "cannot list: Error performing GET http://h/b in 1ms - HTTP error: timed out"
        );
    }

    #[test]
    fn s3_error_codes_are_found_in_bodies() {
        let body = "Client error with status 404 Not Found: <?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>";
        assert_eq!(
            s3_code(body).as_deref(),
            Some("NoSuchBucket: The specified bucket does not exist")
        );
        assert_eq!(s3_code("connection refused"), None);
    }
}
