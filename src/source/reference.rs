//! What a model argument names: a local path, a Hub repo, an HTTP(S) URL or an S3 prefix.
//!
//! [`parse_reference`] is a pure function of the text; whether a local path exists is asked
//! of a closure, so callers pass `Path::exists` and tests pass what they like. The rules, in
//! order (DESIGN §9):
//! 1. an existing local path, whatever it looks like;
//! 2. `hf://org/name[@revision][/subfolder]`, as huggingface_hub's `parse_hf_uri` reads it:
//!    an optional `models/` type prefix; the revision is percent-decoded (`feature%2Fx` is
//!    branch `feature/x`) except the special refs `refs/pr/N` and `refs/convert/NAME`, which
//!    keep their slashes; an `@` after the subfolder starts belongs to the subfolder. Like
//!    `HfFileSystem`, single-segment ids (`hf://gpt2`) are refused: the Hub namespaces every
//!    repo now. Dataset, Space and bucket URIs are refused: they hold no models.
//! 3. `http://…` and `https://…`: a folder or file URL, kept as given;
//! 4. `s3://bucket[/prefix]`;
//! 5. `org/name` and `org/name@revision` (mergekit's form: everything after the first `@` is
//!    the revision, slashes included).
//!
//! Repo ids follow huggingface_hub's `validate_repo_id`: each part 1–96 ASCII letters,
//! digits, `-`, `_`, `.`, starting and ending with a letter, digit or `_`, no `--` or `..`,
//! not ending in `.git`. Revisions follow git's ref-name rules closely enough that no
//! revision can step out of a cache folder (`..`, empty components) or hide in a message
//! (control characters, spaces).
//!
//! mergekit's `model+lora` is split by the config parser before this; `+` is an ordinary
//! character here.

use std::fmt;
use std::path::{Path, PathBuf};

/// What a model or adapter argument names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// An existing local file or folder.
    Local(PathBuf),
    /// A Hugging Face Hub model repo.
    Hub {
        /// `org/name`.
        repo: String,
        /// A branch, tag or commit; `None` means the default branch (`main`).
        revision: Option<String>,
        /// A folder inside the repo holding the checkpoint, `/`-separated, without leading or
        /// trailing `/`.
        subfolder: Option<String>,
    },
    /// An `http://` or `https://` URL, as given.
    Http(String),
    /// An S3 (or S3-compatible) location.
    S3 {
        bucket: String,
        /// The key prefix of the model's folder (or one file), without trailing `/`; empty
        /// for the bucket's root.
        prefix: String,
    },
}

/// The accepted forms, for messages.
const FORMS: &str = "org/name[@rev], hf://…, https://…, s3://…";

/// Read a model argument. `local_exists` says whether a path exists locally; an existing
/// path always wins over every other reading of the text.
pub fn parse_reference(
    text: &str,
    local_exists: impl Fn(&Path) -> bool,
) -> Result<Reference, String> {
    // Messages quote the text: control characters (a newline) would break them apart.
    parse(text, local_exists).map_err(|e| {
        e.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_debug().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    })
}

fn parse(text: &str, local_exists: impl Fn(&Path) -> bool) -> Result<Reference, String> {
    if text.is_empty() {
        return Err(format!(
            "an empty model reference: give a local file or folder, or one of {FORMS}"
        ));
    }
    if local_exists(Path::new(text)) {
        return Ok(Reference::Local(PathBuf::from(text)));
    }
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    if let Some(body) = text.strip_prefix("hf://") {
        return parse_hf_uri(body).map_err(|why| {
            format!(
                "{text}: not a Hub reference: {why}; expected hf://org/name[@revision][/subfolder]"
            )
        });
    }
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return check_url(text)
            .map(|()| Reference::Http(text.to_string()))
            .map_err(|why| format!("{text}: not a usable URL: {why}; expected https://host/path"));
    }
    if let Some(body) = text.strip_prefix("s3://") {
        return parse_s3(body).map_err(|why| {
            format!("{text}: not an S3 reference: {why}; expected s3://bucket/prefix")
        });
    }
    let missing = format!("{text}: no such file or folder, and not a model reference ({FORMS})");
    let (repo, revision) = match text.split_once('@') {
        Some((repo, rev)) => (repo, Some(rev)),
        None => (text, None),
    };
    // A path-like text (`./x`, `/x`, `~/x`) gets no advice about repo ids.
    if repo.matches('/').count() != 1 || repo.starts_with(['.', '/', '~']) {
        return Err(missing);
    }
    // Shaped like a repo id: say what is wrong with it, after what was expected.
    validate_repo_id(repo).map_err(|why| format!("{missing}; as a Hub repo id: {why}"))?;
    if revision == Some("") {
        return Err(format!(
            "{missing}; as a Hub reference: an empty revision after `@`"
        ));
    }
    if let Some(rev) = revision {
        validate_revision(rev).map_err(|why| format!("{missing}; as a Hub revision: {why}"))?;
    }
    Ok(Reference::Hub {
        repo: repo.to_string(),
        revision: revision.map(str::to_string),
        subfolder: None,
    })
}

/// The body of an `hf://` URI (after the scheme).
fn parse_hf_uri(body: &str) -> Result<Reference, String> {
    let location = body.trim_end_matches('/');
    let location = match location.split_once('/') {
        Some(("models", rest)) => rest,
        Some((kind @ ("datasets" | "spaces" | "kernels" | "buckets"), _)) => {
            return Err(format!("`{kind}/` names no model repo"));
        }
        _ => location,
    };
    if location.is_empty() {
        return Err("no repo id".to_string());
    }
    let (repo, revision, subfolder) = match location.find('@') {
        // An `@` counts only right after `org/name`; later it is part of the subfolder.
        Some(at) if location[..at].matches('/').count() <= 1 => {
            let repo = &location[..at];
            let rest = &location[at + 1..];
            let (rev, sub) = match special_ref_len(rest) {
                Some(n) => (rest[..n].to_string(), rest[n..].strip_prefix('/')),
                None => {
                    let (rev, sub) = match rest.split_once('/') {
                        Some((r, s)) => (r, Some(s)),
                        None => (rest, None),
                    };
                    (percent_decode(rev)?, sub)
                }
            };
            if rev.is_empty() {
                return Err("an empty revision after `@`".to_string());
            }
            (repo, Some(rev), sub)
        }
        _ => {
            let mut parts = location.splitn(3, '/');
            let org = parts.next().unwrap_or_default();
            let Some(name) = parts.next() else {
                return Err(format!(
                    "`{location}` is a single name; the Hub's repo ids are org/name"
                ));
            };
            (&location[..org.len() + 1 + name.len()], None, parts.next())
        }
    };
    if repo.matches('/').count() != 1 {
        return Err(format!("the repo id `{repo}` is not org/name"));
    }
    validate_repo_id(repo)?;
    if let Some(rev) = &revision {
        validate_revision(rev)?;
    }
    let subfolder = subfolder.filter(|s| !s.is_empty());
    if let Some(sub) = subfolder {
        validate_subfolder(sub)?;
    }
    Ok(Reference::Hub {
        repo: repo.to_string(),
        revision,
        subfolder: subfolder.map(str::to_string),
    })
}

/// The length of a special ref (`refs/pr/N`, `refs/convert/NAME`) at the start of `s`, when
/// it is followed by the end or a `/`; these revisions keep their slashes in `hf://` URIs.
fn special_ref_len(s: &str) -> Option<usize> {
    let tail_len = |rest: &str, ok: fn(char) -> bool| -> Option<usize> {
        let n = rest.find(|c: char| !ok(c)).unwrap_or(rest.len());
        (n > 0 && (n == rest.len() || rest[n..].starts_with('/'))).then_some(n)
    };
    if let Some(rest) = s.strip_prefix("refs/pr/") {
        return tail_len(rest, |c| c.is_ascii_digit()).map(|n| "refs/pr/".len() + n);
    }
    if let Some(rest) = s.strip_prefix("refs/convert/") {
        let word = |c: char| c.is_alphanumeric() || matches!(c, '_' | '.' | '-');
        return tail_len(rest, word).map(|n| "refs/convert/".len() + n);
    }
    None
}

/// Whether `rev` is written as is in an `hf://` URI (a whole special ref).
fn is_special_ref(rev: &str) -> bool {
    special_ref_len(rev) == Some(rev.len())
}

/// Decode `%XX` escapes (other `%` signs stay), as Python's `unquote`.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("the revision `{s}` decodes to invalid UTF-8"))
}

/// `/` and `%` escaped, so that [`percent_decode`] gives `s` back.
fn percent_encode_revision(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

/// A Hub repo id, `org/name` (huggingface_hub's `validate_repo_id`, ASCII only).
pub fn validate_repo_id(repo: &str) -> Result<(), String> {
    let Some((org, name)) = repo.split_once('/') else {
        return Err(format!("`{repo}` is not org/name"));
    };
    for part in [org, name] {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        if part.is_empty() || part.len() > 96 {
            return Err(format!("`{repo}`: each part must be 1 to 96 characters"));
        }
        if !part.chars().all(|c| word(c) || c == '-' || c == '.') {
            return Err(format!(
                "`{repo}` may use only letters, digits, `-`, `_` and `.`"
            ));
        }
        if !part.starts_with(word) || !part.ends_with(word) {
            return Err(format!(
                "`{repo}`: a name cannot start or end with `-` or `.`"
            ));
        }
    }
    if repo.contains("--") || repo.contains("..") {
        return Err(format!("`{repo}` cannot contain `--` or `..`"));
    }
    if repo.ends_with(".git") {
        return Err(format!("`{repo}` cannot end in `.git`"));
    }
    Ok(())
}

/// A branch, tag or commit name (git's ref-name rules, which also keep it inside a folder).
pub fn validate_revision(rev: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("the revision `{}` {why}", rev.escape_debug()));
    if rev.is_empty() || rev.len() > 255 {
        return bad("must be 1 to 255 characters");
    }
    if let Some(c) = rev
        .chars()
        .find(|&c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
    {
        return bad(&format!("cannot contain {:?}", c));
    }
    if rev.contains("..") || rev.contains("@{") || rev == "@" {
        return bad("cannot contain `..` or `@{`");
    }
    if rev.split('/').any(|c| c.is_empty() || c.starts_with('.')) {
        return bad("cannot have empty parts or parts starting with `.`");
    }
    if rev.ends_with('.') || rev.ends_with(".lock") {
        return bad("cannot end in `.` or `.lock`");
    }
    Ok(())
}

/// A folder inside a repo: `/`-separated, no empty, `.` or `..` parts.
pub fn validate_subfolder(sub: &str) -> Result<(), String> {
    if sub
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "the subfolder `{sub}` cannot have empty, `.` or `..` parts"
        ));
    }
    if sub.chars().any(|c| c.is_control() || c == '\\') {
        return Err(format!(
            "the subfolder `{}` cannot contain control characters or `\\`",
            sub.escape_debug()
        ));
    }
    Ok(())
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() {
        return Err("no host".to_string());
    }
    if url.chars().any(|c| c.is_control() || c == ' ') {
        return Err("it contains spaces or control characters (percent-encode them)".to_string());
    }
    Ok(())
}

fn parse_s3(body: &str) -> Result<Reference, String> {
    let (bucket, prefix) = body.split_once('/').unwrap_or((body, ""));
    // AWS's bucket naming rules (which S3-compatible stores share).
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !(3..=63).contains(&bucket.len())
        || !bucket.chars().all(ok_char)
        || !bucket.starts_with(alnum)
        || !bucket.ends_with(alnum)
        || bucket.contains("..")
    {
        return Err(format!(
            "the bucket name `{bucket}` must be 3 to 63 lowercase letters, digits, `.` or `-`, starting and ending with a letter or digit"
        ));
    }
    if prefix.chars().any(char::is_control) {
        return Err("the prefix contains control characters".to_string());
    }
    Ok(Reference::S3 {
        bucket: bucket.to_string(),
        prefix: prefix.trim_end_matches('/').to_string(),
    })
}

impl fmt::Display for Reference {
    /// The text [`parse_reference`] reads back as the same reference (for a local path, when
    /// it exists). Hub repos show as users write them, `org/name@rev`, when that is exact.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Local(p) => write!(f, "{}", p.display()),
            Reference::Hub {
                repo,
                revision,
                subfolder: None,
            } => match revision {
                Some(rev) => write!(f, "{repo}@{rev}"),
                None => f.write_str(repo),
            },
            Reference::Hub {
                repo,
                revision,
                subfolder: Some(sub),
            } => {
                // An org named like a type prefix would be read as one: say `models/` first.
                let org = repo.split('/').next().unwrap_or_default();
                let typed = ["models", "datasets", "spaces", "kernels", "buckets"].contains(&org);
                write!(f, "hf://{}{repo}", if typed { "models/" } else { "" })?;
                if let Some(rev) = revision {
                    if is_special_ref(rev) {
                        write!(f, "@{rev}")?;
                    } else {
                        write!(f, "@{}", percent_encode_revision(rev))?;
                    }
                }
                write!(f, "/{sub}")
            }
            Reference::Http(url) => f.write_str(url),
            Reference::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Reference::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn none(_: &Path) -> bool {
        false
    }

    fn hub(repo: &str, rev: Option<&str>, sub: Option<&str>) -> Reference {
        Reference::Hub {
            repo: repo.into(),
            revision: rev.map(Into::into),
            subfolder: sub.map(Into::into),
        }
    }

    #[test]
    fn an_existing_path_wins() {
        for text in [
            "org/name",
            "hf://org/name",
            "s3://bucket/x",
            "https://h/x",
            "a b",
        ] {
            assert_eq!(
                parse_reference(text, |p| p == Path::new(text)),
                Ok(Reference::Local(PathBuf::from(text)))
            );
        }
    }

    #[test]
    fn bare_repo_ids() {
        assert_eq!(
            parse_reference("Gryphe/MythoMax-L2-13b", none),
            Ok(hub("Gryphe/MythoMax-L2-13b", None, None))
        );
        assert_eq!(
            parse_reference("Gryphe/MythoMax-L2-13b@main", none),
            Ok(hub("Gryphe/MythoMax-L2-13b", Some("main"), None))
        );
        // mergekit: everything after the first `@` is the revision.
        assert_eq!(
            parse_reference("org/name@feature/x", none),
            Ok(hub("org/name", Some("feature/x"), None))
        );
        assert_eq!(
            parse_reference("org/name@refs/pr/3", none),
            Ok(hub("org/name", Some("refs/pr/3"), None))
        );
    }

    #[test]
    fn hf_uris() {
        let cases = [
            ("hf://org/name", hub("org/name", None, None)),
            ("hf://org/name/", hub("org/name", None, None)),
            ("hf://models/org/name", hub("org/name", None, None)),
            ("hf://org/name@v1.0", hub("org/name", Some("v1.0"), None)),
            (
                "hf://org/name/sub/dir",
                hub("org/name", None, Some("sub/dir")),
            ),
            (
                "hf://org/name@dev/sub",
                hub("org/name", Some("dev"), Some("sub")),
            ),
            (
                "hf://org/name@feature%2Fx/s",
                hub("org/name", Some("feature/x"), Some("s")),
            ),
            (
                "hf://org/name@refs/pr/10/s",
                hub("org/name", Some("refs/pr/10"), Some("s")),
            ),
            (
                "hf://org/name@refs/convert/parquet",
                hub("org/name", Some("refs/convert/parquet"), None),
            ),
            // An `@` inside the subfolder is the subfolder's.
            ("hf://org/name/sub@x", hub("org/name", None, Some("sub@x"))),
        ];
        for (text, want) in cases {
            assert_eq!(parse_reference(text, none), Ok(want), "{text}");
        }
    }

    #[test]
    fn urls_and_s3() {
        assert_eq!(
            parse_reference("https://example.com/models/m", none),
            Ok(Reference::Http("https://example.com/models/m".into()))
        );
        assert_eq!(
            parse_reference("HTTP://example.com/m.safetensors", none),
            Ok(Reference::Http("HTTP://example.com/m.safetensors".into()))
        );
        let s3 = |b: &str, p: &str| Reference::S3 {
            bucket: b.into(),
            prefix: p.into(),
        };
        assert_eq!(
            parse_reference("s3://my-bucket/llama/7b/", none),
            Ok(s3("my-bucket", "llama/7b"))
        );
        assert_eq!(
            parse_reference("s3://my-bucket", none),
            Ok(s3("my-bucket", ""))
        );
    }

    #[test]
    fn refusals_say_what_is_accepted() {
        assert_eq!(
            parse_reference("models/x/y", none).unwrap_err(),
            "models/x/y: no such file or folder, and not a model reference (org/name[@rev], hf://…, https://…, s3://…)"
        );
        assert_eq!(
            parse_reference("org/na--me", none).unwrap_err(),
            "org/na--me: no such file or folder, and not a model reference (org/name[@rev], hf://…, https://…, s3://…); as a Hub repo id: `org/na--me` cannot contain `--` or `..`"
        );
        assert_eq!(
            parse_reference("./missing", none).unwrap_err(),
            "./missing: no such file or folder, and not a model reference (org/name[@rev], hf://…, https://…, s3://…)"
        );
        assert_eq!(
            parse_reference("org/x\n@y", none).unwrap_err(),
            "org/x\\n@y: no such file or folder, and not a model reference (org/name[@rev], hf://…, https://…, s3://…); as a Hub repo id: `org/x\\n` may use only letters, digits, `-`, `_` and `.`"
        );
        assert_eq!(
            parse_reference("hf://gpt2", none).unwrap_err(),
            "hf://gpt2: not a Hub reference: `gpt2` is a single name; the Hub's repo ids are org/name; expected hf://org/name[@revision][/subfolder]"
        );
        for bad in [
            "./missing",
            "-org/name",
            "org/name.",
            "org/name.git",
            "org/name@",
            "org/name@a..b",
            "org/name@../x",
            "org/name@a b",
            "hf://datasets/org/name",
            "hf://org/name@",
            "hf://org/name/../x",
            "hf://org/name@%2E%2E",
            "https://",
            "s3://A",
            "s3://ab",
            "",
        ] {
            let e = parse_reference(bad, none).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn display_is_what_users_write() {
        assert_eq!(hub("o/n", Some("main"), None).to_string(), "o/n@main");
        assert_eq!(
            hub("o/n", Some("feature/x"), Some("s")).to_string(),
            "hf://o/n@feature%2Fx/s"
        );
        assert_eq!(
            hub("o/n", Some("refs/pr/1"), Some("s")).to_string(),
            "hf://o/n@refs/pr/1/s"
        );
    }

    fn part() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_]([A-Za-z0-9_.-]{0,10}[A-Za-z0-9_])?"
            .prop_filter("no -- or ..", |s| !s.contains("--") && !s.contains(".."))
    }

    fn revision() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_-]{1,12}",
            "[0-9a-f]{40}",
            "[a-z]{1,5}/[a-z0-9%@]{1,5}",
            "refs/pr/[0-9]{1,3}",
            "refs/convert/[a-z]{1,8}",
        ]
    }

    fn reference() -> impl Strategy<Value = Reference> {
        let repo = (part(), part())
            .prop_map(|(o, n)| format!("{o}/{n}"))
            .prop_filter("not .git", |r| !r.ends_with(".git"));
        let hub = (
            repo,
            proptest::option::of(revision()),
            proptest::option::of("[a-z0-9_@%+]{1,6}(/[a-z0-9_.@]{1,6}){0,2}"),
        )
            .prop_filter("valid subfolder", |(_, _, s)| {
                s.as_deref().is_none_or(|s| validate_subfolder(s).is_ok())
            })
            .prop_map(|(repo, revision, subfolder)| Reference::Hub {
                repo,
                revision,
                subfolder,
            });
        let http = "https?://[a-z0-9.]{1,10}(/[a-z0-9._%-]{0,8}){0,3}".prop_map(Reference::Http);
        let s3 = (
            "[a-z0-9][a-z0-9-]{1,10}[a-z0-9]",
            "([a-z0-9._+=-]{1,8}(/[a-z0-9._ -]{1,8}){0,3})?",
        )
            .prop_map(|(bucket, prefix)| Reference::S3 {
                bucket,
                prefix: prefix.trim_end_matches('/').to_string(),
            });
        prop_oneof![hub, http, s3]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics(text in "\\PC{0,40}|(hf://|s3://|https://|[a-z]{1,4}/)[a-z@/%.2F-]{0,20}") {
            if let Err(e) = parse_reference(&text, none) {
                prop_assert!(!e.chars().any(char::is_control), "{}", e);
            }
        }

        #[test]
        fn display_round_trips(r in reference()) {
            prop_assert_eq!(parse_reference(&r.to_string(), none), Ok(r));
        }
    }
}
