//! From what a user typed to where the bytes are: a model or adapter argument (a CLI path, a
//! path in a config) becomes a [`Source`] and, when it names one file, that file.
//!
//! An existing local path always wins and behaves exactly as before. This is the one place
//! where other kinds of references (Hub repos, URLs, S3) are recognised.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::{LocalSource, Source};

/// A model argument resolved to its bytes.
#[derive(Debug, Clone)]
pub struct Located {
    pub source: Arc<dyn Source>,
    /// The file the argument named, when it named one file rather than a folder.
    pub file: Option<String>,
}

/// Where the bytes of `reference` are.
pub fn locate(reference: &Path) -> io::Result<Located> {
    let meta = std::fs::metadata(reference)?;
    if meta.is_file() {
        let dir = reference.parent().unwrap_or(Path::new(""));
        let name = reference
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::other("the file name is not valid UTF-8"))?;
        return Ok(Located {
            source: Arc::new(LocalSource::new(dir)),
            file: Some(name.to_string()),
        });
    }
    Ok(Located {
        source: Arc::new(LocalSource::new(reference)),
        file: None,
    })
}
