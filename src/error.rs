//! The one error type of the library.
//!
//! Every failure a user can act on becomes an [`Error`] that names the file, the tensor (when
//! there is one) and what is wrong, so the CLI can print a single line:
//! `error: <file>: <tensor>: <what is wrong>`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::format::index::IndexError;
use crate::format::peft::AdapterConfigError;
use crate::format::safetensors::HeaderError;
use crate::format::torch_bin::TorchBinError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure with its context: which file, which tensor, what went wrong.
#[derive(Debug)]
pub struct Error {
    pub file: Option<PathBuf>,
    pub tensor: Option<String>,
    pub kind: ErrorKind,
}

/// What went wrong, without the context.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("{0}")]
    Header(HeaderError),
    #[error("{0}")]
    Index(#[from] IndexError),
    #[error("{0}")]
    AdapterConfig(#[from] AdapterConfigError),
    /// A PyTorch `.bin` (zip, legacy pickle, or the pickle inside) that cannot be read; the
    /// tensor it concerns is named in the error's context, not repeated here.
    /// (Boxed: the parsers' errors are large, and every `Result` carries this type.)
    #[error("{}", .0.detail())]
    Torch(#[source] Box<TorchBinError>),
    #[error("{action}: {source}")]
    Io {
        action: &'static str,
        source: io::Error,
    },
    /// The input is readable but not something we can merge (mismatched shapes, a LoRA key
    /// without its base tensor, ...).
    #[error("{0}")]
    Invalid(String),
    /// The command line or a config asks for something contradictory.
    #[error("{0}")]
    Usage(String),
    #[error("interrupted; nothing was written")]
    Interrupted,
}

impl Error {
    pub fn new(kind: ErrorKind) -> Self {
        Error {
            file: None,
            tensor: None,
            kind,
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::new(ErrorKind::Invalid(msg.into()))
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        Error::new(ErrorKind::Usage(msg.into()))
    }

    pub fn io(action: &'static str, source: io::Error) -> Self {
        Error::new(ErrorKind::Io { action, source })
    }

    /// Attach the file, unless a more specific one is already known.
    pub fn in_file(mut self, path: impl AsRef<Path>) -> Self {
        if self.file.is_none() {
            self.file = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Attach the tensor name, unless a more specific one is already known.
    pub fn at_tensor(mut self, name: impl Into<String>) -> Self {
        if self.tensor.is_none() {
            self.tensor = Some(name.into());
        }
        self
    }

    /// Exit status for the CLI: 2 for usage errors, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Usage(_) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names come from files: escape control characters so the message stays one line.
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display().to_string().escape_debug())?;
        }
        if let Some(tensor) = &self.tensor {
            write!(f, "{}: ", tensor.escape_debug())?;
        }
        // One line, always: messages from JSON/YAML parsers may carry newlines.
        let what = self.kind.to_string();
        let mut first = true;
        for part in what.lines() {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(part.trim())?;
            first = false;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.kind.source()
    }
}

impl From<HeaderError> for Error {
    fn from(e: HeaderError) -> Self {
        let tensor = e.tensor.clone();
        Error {
            file: None,
            tensor,
            kind: ErrorKind::Header(e),
        }
    }
}

impl From<IndexError> for Error {
    fn from(e: IndexError) -> Self {
        Error::new(ErrorKind::Index(e))
    }
}

impl From<AdapterConfigError> for Error {
    fn from(e: AdapterConfigError) -> Self {
        Error::new(ErrorKind::AdapterConfig(e))
    }
}

impl From<TorchBinError> for Error {
    fn from(e: TorchBinError) -> Self {
        let tensor = e.tensor().map(str::to_string);
        Error {
            file: None,
            tensor,
            kind: ErrorKind::Torch(Box::new(e)),
        }
    }
}

/// Attach context to any `Result` whose error converts into [`Error`].
pub trait Context<T> {
    fn in_file(self, path: impl AsRef<Path>) -> Result<T>;
    fn at_tensor(self, name: &str) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn in_file(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| e.into().in_file(path))
    }
    fn at_tensor(self, name: &str) -> Result<T> {
        self.map_err(|e| e.into().at_tensor(name))
    }
}
