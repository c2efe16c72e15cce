//! From what a user typed to where the bytes are: a model or adapter argument (a CLI path, a
//! path in a config) becomes a [`Source`] and, when it names one file, that file.
//!
//! An existing local path always wins and behaves exactly as before. Otherwise the text is a
//! model reference ([`parse_reference`]): a Hub repo is read from the local HF cache when it
//! is complete there (no network at all), else — unless offline — from the Hub at one commit.
//! This is the one place where kinds of references are told apart.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::{
    HfEnv, LocalSource, Reference, Source, cached_snapshot, offline_missing, parse_reference,
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
}

impl Environment {
    pub fn from_env() -> Environment {
        Environment {
            hf: HfEnv::from_env(),
        }
    }
}

/// Where the bytes of `reference` are, in this process's environment.
pub fn locate(reference: &Path) -> io::Result<Located> {
    locate_in(reference, &Environment::from_env())
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
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{repo}: not in the HF cache ({}), and reading from the Hub is not built in yet",
                    env.hf.cache_dir.display()
                ),
            ))
        }
        Reference::Http(url) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{url}: reading over HTTP is not built in yet"),
        )),
        Reference::S3 { bucket, prefix } => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("s3://{bucket}/{prefix}: reading from S3 is not built in yet"),
        )),
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
