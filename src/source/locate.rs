//! From what a user typed to where the bytes are: a model or adapter argument (a CLI path, a
//! path in a config) becomes a [`Source`] and, when it names one file, that file.
//!
//! An existing local path always wins and behaves exactly as before. Otherwise the text is a
//! model reference ([`parse_reference`]): a Hub repo is read from the local HF cache when it
//! is complete there (no network at all), else — unless offline — from the Hub at one commit;
//! an `http(s)://` URL by range requests; an `s3://` prefix from S3 or an S3-compatible store.
//! This is the one place where kinds of references are told apart.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use super::{
    CachingSource, HfEnv, HttpSource, HubConfig, HubSource, LocalSource, Reference, S3Config,
    S3Source, Source, cached_snapshot, offline_missing, parse_reference, repo_dir,
};

/// A model argument resolved to its bytes.
#[derive(Debug, Clone)]
pub struct Located {
    pub source: Arc<dyn Source>,
    /// The file the argument named, when it named one file rather than a folder.
    pub file: Option<String>,
}

/// Everything about the environment that decides where references lead (read once).
#[derive(Debug, Clone)]
pub struct Environment {
    pub hf: HfEnv,
    pub hub: HubConfig,
    pub s3: S3Config,
    /// `--cache`: store Hub files in the HF cache as they are read.
    pub store_in_cache: bool,
}

/// Checkpoint files a URL or an S3 key may name directly.
const CHECKPOINT_FILES: [&str; 4] = [".safetensors", ".bin", ".pt", ".pth"];

impl Environment {
    pub fn from_env() -> Environment {
        Environment {
            hf: HfEnv::from_env(),
            hub: HubConfig::from_env(),
            s3: S3Config::from_env(),
            store_in_cache: false,
        }
    }
}

impl Environment {
    /// Hub files read during the run are stored in the HF cache (`--cache`).
    pub fn with_cache(mut self, store: bool) -> Environment {
        self.store_in_cache = store;
        self
    }

    /// Use `dir` as the Hugging Face hub cache (mergekit's `--transformers-cache`), instead
    /// of the one the environment names.
    pub fn with_hub_cache(mut self, dir: Option<PathBuf>) -> Environment {
        if let Some(d) = dir {
            self.hf.cache_dir = d;
        }
        self
    }

    /// Remote reads stop retrying and waiting once `cancel` is set (Ctrl-C).
    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Environment {
        self.hub.http.cancel = Some(Arc::clone(&cancel));
        self.s3.cancel = Some(cancel);
        self
    }
}

/// The environment [`locate`] uses, when the program set one (the CLI does, once, with its
/// interrupt flag); otherwise it is read from the process environment at each call.
static PROCESS_ENVIRONMENT: OnceLock<Environment> = OnceLock::new();

/// Fix the environment [`locate`] uses for the rest of the process; false if already set.
pub fn set_environment(env: Environment) -> bool {
    PROCESS_ENVIRONMENT.set(env).is_ok()
}

/// Where the bytes of `reference` are, in this process's environment.
pub fn locate(reference: &Path) -> io::Result<Located> {
    match PROCESS_ENVIRONMENT.get() {
        Some(env) => locate_in(reference, env),
        None => locate_in(reference, &Environment::from_env()),
    }
}

/// [`locate`] in an explicit environment.
pub fn locate_in(reference: &Path, env: &Environment) -> io::Result<Located> {
    let missing = match std::fs::metadata(reference) {
        Ok(meta) => return Ok(local(reference, meta.is_file())),
        Err(e) => e,
    };
    // What can only be a path (absolute, relative with dots, several folders) gets the
    // system's own reason.
    let Some(text) = reference.to_str().filter(|t| !looks_like_a_path(t)) else {
        return Err(missing);
    };
    let parsed = parse_reference(text, |p| p.exists()).map_err(|msg| {
        let msg = msg.strip_prefix(&format!("{text}: ")).unwrap_or(&msg);
        io::Error::new(io::ErrorKind::NotFound, msg.to_string())
    })?;
    match parsed {
        Reference::Local(p) => {
            let meta = std::fs::metadata(&p)?;
            Ok(local(&p, meta.is_file()))
        }
        Reference::Hub {
            repo,
            revision,
            subfolder,
        } => {
            if let Some(dir) =
                cached_snapshot(&env.hf, &repo, revision.as_deref(), subfolder.as_deref())?
            {
                return Ok(Located {
                    source: Arc::new(LocalSource::new(dir)),
                    file: None,
                });
            }
            if env.hf.offline {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    offline_missing(&env.hf, &repo, revision.as_deref()),
                ));
            }
            let hub = HubSource::open(&repo, revision.as_deref(), subfolder.as_deref(), &env.hub)?;
            let source: Arc<dyn Source> = if env.store_in_cache {
                let commit = hub.commit().to_string();
                Arc::new(CachingSource::new(
                    Arc::new(hub),
                    repo_dir(&env.hf, &repo),
                    &commit,
                    revision.as_deref(),
                    subfolder.as_deref(),
                ))
            } else {
                Arc::new(hub)
            };
            Ok(Located { source, file: None })
        }
        Reference::Http(url) => {
            if env.hf.offline {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("offline ({} is set): not reading {url}", env.hf.offline_var),
                ));
            }
            // The Hub's client: its token goes to the Hub's own host and nowhere else.
            let source = HttpSource::new(&env.hub.client(), &url)?;
            let file = source.file_name().map(str::to_string);
            Ok(Located {
                source: Arc::new(source),
                file,
            })
        }
        Reference::S3 { bucket, prefix } => {
            // A key naming one checkpoint file: its folder is the source.
            let names_a_file = CHECKPOINT_FILES.iter().any(|x| prefix.ends_with(x));
            let (prefix, file) = match prefix.rsplit_once('/') {
                _ if !names_a_file => (prefix, None),
                Some((dir, name)) => (dir.to_string(), Some(name.to_string())),
                None => (String::new(), Some(prefix)),
            };
            let source = S3Source::open(&bucket, &prefix, &env.s3)?;
            Ok(Located {
                source: Arc::new(source),
                file,
            })
        }
    }
}

fn looks_like_a_path(text: &str) -> bool {
    !text.contains("://")
        && (text.starts_with(['/', '.', '~'])
            || text.contains('\\')
            || text.matches('/').count() > 1)
}

fn local(path: &Path, is_file: bool) -> Located {
    if is_file {
        let dir = path.parent().unwrap_or(Path::new(""));
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            return Located {
                source: Arc::new(LocalSource::new(dir)),
                file: Some(name.to_string()),
            };
        }
    }
    Located {
        source: Arc::new(LocalSource::new(path)),
        file: None,
    }
}
