//! The local Hugging Face cache, laid out as huggingface_hub lays it out, so a model that is
//! already downloaded is read from there with no network at all.
//!
//! Layout (huggingface_hub's `file_download.py`): repo `org/name` lives in
//! `<cache>/models--org--name/`, with `refs/<revision>` (a file holding a commit sha),
//! `snapshots/<commit>/<files…>` (symlinks into `blobs/`) and `blobs/`. A file appears in a
//! snapshot only once it is completely downloaded (partial downloads are
//! `blobs/*.incomplete`), so a file present in a snapshot is whole.
//!
//! The environment is read once, by [`HfEnv::from_env`], and passed down; everything else
//! takes an [`HfEnv`], so tests build one by hand.
//!
//! A cached snapshot is an ordinary folder: read it with
//! [`LocalSource::new`](super::LocalSource::new), and `Model::from_source` works unchanged.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use super::reference::{validate_repo_id, validate_revision, validate_subfolder};
use crate::format::index::parse_index;

/// The Hugging Face settings that decide where cached models are and whether the network
/// may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfEnv {
    /// `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE` (legacy), else `HF_HOME/hub`.
    pub cache_dir: PathBuf,
    /// `HF_HOME`, else `XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface` (where
    /// huggingface_hub keeps the token file).
    pub hf_home: PathBuf,
    /// `HF_HUB_OFFLINE` (or, when that is unset, the older `TRANSFORMERS_OFFLINE`) is true:
    /// never use the network.
    pub offline: bool,
    /// The variable that decided `offline`, for messages that say what to unset.
    pub offline_var: &'static str,
}

impl HfEnv {
    /// The cache at `cache_dir`, online: for tests and explicit settings.
    pub fn at(cache_dir: impl Into<PathBuf>) -> HfEnv {
        let cache_dir = cache_dir.into();
        HfEnv {
            hf_home: cache_dir
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            cache_dir,
            offline: false,
            offline_var: "HF_HUB_OFFLINE",
        }
    }

    /// The settings of this process's environment.
    pub fn from_env() -> HfEnv {
        HfEnv::from_vars(|name| std::env::var_os(name), std::env::home_dir())
    }

    /// The settings that variables `var` give, with `home` the user's home folder (for `~`
    /// and the default cache). huggingface_hub's precedence, with one difference: a
    /// variable set to the empty string counts as unset rather than as the current folder.
    /// A leading `~` is expanded; `$VAR`s inside values are not.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>, home: Option<PathBuf>) -> HfEnv {
        let home = home.unwrap_or_else(|| PathBuf::from("~"));
        let get = |name: &str| {
            var(name)
                .filter(|v| !v.is_empty())
                .map(|v| expand_home(PathBuf::from(v), &home))
        };
        let hf_home = get("HF_HOME").unwrap_or_else(|| {
            get("XDG_CACHE_HOME")
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .unwrap_or_else(|| hf_home.join("hub"));
        // Python's `os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")`:
        // the older variable counts only when the newer one is unset or empty.
        let (offline_var, value) = match var("HF_HUB_OFFLINE").filter(|v| !v.is_empty()) {
            Some(v) => ("HF_HUB_OFFLINE", Some(v)),
            None => match var("TRANSFORMERS_OFFLINE").filter(|v| !v.is_empty()) {
                Some(v) => ("TRANSFORMERS_OFFLINE", Some(v)),
                None => ("HF_HUB_OFFLINE", None),
            },
        };
        HfEnv {
            cache_dir,
            hf_home,
            offline: value.is_some_and(|v| is_true(&v.to_string_lossy())),
            offline_var,
        }
    }
}

/// huggingface_hub's `_is_true`: "1", "ON", "YES" or "TRUE", in any case.
pub fn is_true(value: &str) -> bool {
    ["1", "ON", "YES", "TRUE"]
        .iter()
        .any(|t| value.eq_ignore_ascii_case(t))
}

fn expand_home(path: PathBuf, home: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => home.join(rest),
        Err(_) => path,
    }
}

/// The folder of repo `org/name` in the cache: `models--org--name`.
pub fn repo_dir(env: &HfEnv, repo: &str) -> PathBuf {
    env.cache_dir.join(format!(
        "models--{}",
        repo.split('/').collect::<Vec<_>>().join("--")
    ))
}

/// The commit `revision` (default `main`) of `repo` resolves to in the cache: through
/// `refs/<revision>`, or the revision itself when it is a full 40-hex commit. `None` when
/// the cache cannot resolve it.
pub fn cached_commit(
    env: &HfEnv,
    repo: &str,
    revision: Option<&str>,
) -> io::Result<Option<String>> {
    check(validate_repo_id(repo))?;
    let revision = revision.unwrap_or("main");
    check(validate_revision(revision))?;
    let ref_file = repo_dir(env, repo).join("refs").join(revision);
    match std::fs::read_to_string(&ref_file) {
        // huggingface_hub writes the sha with no newline; a hand-edited ref may have one.
        Ok(sha) if is_commit(sha.trim()) => return Ok(Some(sha.trim().to_string())),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: not a commit sha; delete the file (or the repo's folder) and download the model again",
                    ref_file.display()
                ),
            ));
        }
        Err(e) if is_absent(&e) => {}
        Err(e) => return Err(in_cache(&ref_file, e)),
    }
    Ok(is_commit(revision).then(|| revision.to_ascii_lowercase()))
}

/// The cached snapshot folder of `repo` at `revision` (plus `subfolder`) when it holds a
/// complete checkpoint; `None` when the revision is not in the cache or its files are not
/// all there. Complete means: the shard index and every shard it names (safetensors, else
/// PyTorch); or without an index, `model.safetensors`, every shard of a
/// `*-NNNNN-of-MMMMM.*` series, other `.safetensors` files, or `pytorch_model*.bin`; or a
/// PEFT adapter (`adapter_config.json` and its weights). config.json is not required:
/// only the Hub knows whether the repo has one.
pub fn cached_snapshot(
    env: &HfEnv,
    repo: &str,
    revision: Option<&str>,
    subfolder: Option<&str>,
) -> io::Result<Option<PathBuf>> {
    if let Some(sub) = subfolder {
        check(validate_subfolder(sub))?;
    }
    let Some(commit) = cached_commit(env, repo, revision)? else {
        return Ok(None);
    };
    let mut dir = repo_dir(env, repo).join("snapshots").join(commit);
    if let Some(sub) = subfolder {
        dir.push(sub);
    }
    Ok(holds_checkpoint(&dir)?.then_some(dir))
}

/// The error for a repo that is not (fully) in the cache while the network is off.
pub fn offline_missing(env: &HfEnv, repo: &str, revision: Option<&str>) -> String {
    let rev = revision.unwrap_or("main");
    format!(
        "{repo}@{rev}: not in the Hugging Face cache ({}) with all its checkpoint files, and {} forbids downloading it; download it first (hf download {repo} --revision {rev}) or unset {}",
        repo_dir(env, repo).display(),
        env.offline_var,
        env.offline_var,
    )
}

/// Whether `dir` holds a whole checkpoint (see [`cached_snapshot`]).
fn holds_checkpoint(dir: &Path) -> io::Result<bool> {
    let names = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            // `is_file` follows the links into blobs/; a dangling link is a missing file.
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect::<Vec<_>>(),
        Err(e) if is_absent(&e) => return Ok(false),
        Err(e) => return Err(in_cache(dir, e)),
    };
    let has = |n: &str| names.iter().any(|x| x == n);
    if has("adapter_config.json") && (has("adapter_model.safetensors") || has("adapter_model.bin"))
    {
        return Ok(true);
    }
    let weights = |ext: &str| -> Vec<&str> {
        names
            .iter()
            .map(String::as_str)
            .filter(|n| n.ends_with(ext) && !n.starts_with("adapter_model"))
            .collect()
    };
    // The order Model::from_source looks for a checkpoint in.
    if has("model.safetensors.index.json") {
        return index_complete(dir, "model.safetensors.index.json");
    }
    let safetensors = weights(".safetensors");
    if !safetensors.is_empty() {
        return Ok(series_complete(&safetensors));
    }
    if has("pytorch_model.bin.index.json") {
        return index_complete(dir, "pytorch_model.bin.index.json");
    }
    let bins: Vec<&str> = weights(".bin")
        .into_iter()
        .filter(|n| n.starts_with("pytorch_model"))
        .collect();
    Ok(!bins.is_empty() && series_complete(&bins))
}

/// Whether every shard the index names is in `dir`. An index that does not parse counts as
/// complete: it is whole in the cache, and opening the model reports what is wrong with it.
fn index_complete(dir: &Path, index: &str) -> io::Result<bool> {
    let path = dir.join(index);
    let text = std::fs::read(&path).map_err(|e| in_cache(&path, e))?;
    let Ok(parsed) = parse_index(&String::from_utf8_lossy(&text)) else {
        return Ok(true);
    };
    // parse_index refuses shard names that leave the folder.
    Ok(parsed.shards().iter().all(|s| dir.join(s).is_file()))
}

/// Whether every `PREFIX-i-of-N.EXT` series among `names` has all its members 1..=N.
/// Names outside any series stand alone.
fn series_complete(names: &[&str]) -> bool {
    let parsed: Vec<(&str, &str, u64, u64)> = names.iter().filter_map(|n| shard_of(n)).collect();
    parsed.iter().all(|&(prefix, ext, _, total)| {
        let mut seen: Vec<u64> = parsed
            .iter()
            .filter(|&&(p, e, i, t)| {
                p == prefix && e == ext && t == total && (1..=total).contains(&i)
            })
            .map(|&(_, _, i, _)| i)
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len() as u64 == total
    })
}

/// `model-00002-of-00003.safetensors` → ("model", "safetensors", 2, 3).
fn shard_of(name: &str) -> Option<(&str, &str, u64, u64)> {
    let (stem, ext) = name.rsplit_once('.')?;
    let (head, total) = stem.rsplit_once("-of-")?;
    let (prefix, index) = head.rsplit_once('-')?;
    let num = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    Some((prefix, ext, num(index)?, num(total)?))
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Not there at all (or a path through a file): the cache does not have it.
fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn in_cache(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!(
            "{}: {e}; check the Hugging Face cache's permissions (HF_HUB_CACHE)",
            path.display()
        ),
    )
}

fn check(r: Result<(), String>) -> io::Result<()> {
    r.map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> HfEnv {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        HfEnv::from_vars(|k| map.get(k).cloned(), Some(PathBuf::from("/home/u")))
    }

    #[test]
    fn cache_dir_precedence() {
        let cache = |vars: &[(&str, &str)]| env_of(vars).cache_dir;
        assert_eq!(cache(&[]), Path::new("/home/u/.cache/huggingface/hub"));
        assert_eq!(
            cache(&[("XDG_CACHE_HOME", "/x")]),
            Path::new("/x/huggingface/hub")
        );
        assert_eq!(
            cache(&[("XDG_CACHE_HOME", "/x"), ("HF_HOME", "/h")]),
            Path::new("/h/hub")
        );
        assert_eq!(
            cache(&[("HF_HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/old")]),
            Path::new("/old")
        );
        assert_eq!(
            cache(&[
                ("HF_HOME", "/h"),
                ("HUGGINGFACE_HUB_CACHE", "/old"),
                ("HF_HUB_CACHE", "/c")
            ]),
            Path::new("/c")
        );
        assert_eq!(cache(&[("HF_HUB_CACHE", "~/c")]), Path::new("/home/u/c"));
        assert_eq!(cache(&[("HF_HOME", "~")]), Path::new("/home/u/hub"));
        // Empty counts as unset.
        assert_eq!(
            cache(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/h")]),
            Path::new("/h/hub")
        );
        assert_eq!(env_of(&[("HF_HOME", "/h")]).hf_home, Path::new("/h"));
    }

    #[test]
    fn offline_values() {
        let off = |vars: &[(&str, &str)]| {
            let e = env_of(vars);
            (e.offline, e.offline_var)
        };
        for v in ["1", "ON", "yes", "True", "tRuE"] {
            assert_eq!(
                off(&[("HF_HUB_OFFLINE", v)]),
                (true, "HF_HUB_OFFLINE"),
                "{v}"
            );
        }
        for v in ["0", "", "off", "no", " 1", "2", "y"] {
            assert!(!off(&[("HF_HUB_OFFLINE", v)]).0, "{v:?}");
        }
        assert_eq!(off(&[]), (false, "HF_HUB_OFFLINE"));
        assert_eq!(
            off(&[("TRANSFORMERS_OFFLINE", "1")]),
            (true, "TRANSFORMERS_OFFLINE")
        );
        // The newer variable, when set, decides alone.
        assert_eq!(
            off(&[("HF_HUB_OFFLINE", "0"), ("TRANSFORMERS_OFFLINE", "1")]),
            (false, "HF_HUB_OFFLINE")
        );
    }

    #[test]
    fn shard_series() {
        assert_eq!(
            shard_of("model-00002-of-00003.safetensors"),
            Some(("model", "safetensors", 2, 3))
        );
        assert_eq!(shard_of("model.safetensors"), None);
        assert!(series_complete(&["a-1-of-2.bin", "a-2-of-2.bin", "x.bin"]));
        assert!(!series_complete(&["a-1-of-2.bin", "x.bin"]));
        assert!(!series_complete(&["a-1-of-2.bin", "a-1-of-2.bin"]));
        assert!(!series_complete(&["a-0-of-1.bin"]));
        assert!(series_complete(&["model.safetensors"]));
    }

    #[test]
    fn repo_folder_names() {
        let env = HfEnv::at("/c");
        assert_eq!(
            repo_dir(&env, "org/name"),
            Path::new("/c/models--org--name")
        );
    }

    #[test]
    fn bad_names_are_refused_not_looked_up() {
        let env = HfEnv::at("/nonexistent");
        for (repo, rev, sub) in [
            ("../x", None, None),
            ("org/name", Some("../../etc"), None),
            ("org/name", None, Some("../x")),
        ] {
            let e = cached_snapshot(&env, repo, rev, sub).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
        assert_eq!(cached_snapshot(&env, "org/name", None, None).unwrap(), None);
    }
}
