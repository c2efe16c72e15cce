//! The one error type of the library.
//!
//! Every failure a user can act on becomes an [`Error`] that names the file, the tensor (when
//! there is one) and what is wrong, so the CLI can print a single line:
//! `error: <file>: <tensor>: <what is wrong>: <cause>`.
//!
//! Each level's `Display` shows only its own message; the cause (an OS error, ...) is reached
//! through `source()`, and [`Error::report`] joins the chain, so each message appears once.

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
    // Transparent: the wrapped error's message and source, not the error again as a source.
    #[error(transparent)]
    Header(HeaderError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    AdapterConfig(#[from] AdapterConfigError),
    /// A PyTorch `.bin` (zip, legacy pickle, or the pickle inside) that cannot be read; the
    /// tensor it concerns is named in the error's context, not repeated here. Its message
    /// already spells out the parser's inner errors, so it is not chained again as a source.
    /// (Boxed: the parsers' errors are large, and every `Result` carries this type.)
    #[error("{}", .0.detail())]
    Torch(Box<TorchBinError>),
    /// `action` is shown; the OS reason is the source, shown once by [`Error::report`].
    #[error("{action}")]
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
    /// An invariant of mergestream itself failed: a bug, not a problem with the input.
    #[error("internal error (a bug in mergestream, please report it): {0}")]
    Internal(String),
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
        // Sources answer `Interrupted` only when the run was cancelled (std retries EINTR).
        if source.kind() == io::ErrorKind::Interrupted {
            return Error::new(ErrorKind::Interrupted);
        }
        Error::new(ErrorKind::Io { action, source })
    }

    /// A broken invariant (a bug in mergestream), reported as such rather than as bad input.
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::new(ErrorKind::Internal(msg.into()))
    }

    /// The whole chain on one line: this error's message, then each source's, once each.
    pub fn report(&self) -> Report<'_> {
        Report(self)
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

    /// Exit status for the CLI: 2 for usage errors, 1 for everything else (bugs included: the
    /// 0/1/2 contract has no status of its own for them).
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
        f.write_str(&one_line(&self.kind.to_string()))
    }
}

/// One line, always: messages from JSON/YAML parsers may carry newlines (joined with a
/// space) or other control characters (escaped), which would break the `error:` line.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, part) in text.lines().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        for c in part.trim().chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
    }
    out
}

/// [`Error::report`]: `<message>: <source>: <source's source>...`, on one line (for any
/// error, so other error types can be reported the same way).
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = one_line(&self.0.to_string());
        let mut next = self.0.source();
        while let Some(e) = next {
            let msg = one_line(&e.to_string());
            // A wrapper that also prints its source in its own message (`#[error("{0}")]`
            // with `#[from]`) would otherwise show it twice.
            if !msg.is_empty() && !line.ends_with(&msg) {
                line.push_str(": ");
                line.push_str(&msg);
            }
            next = e.source();
        }
        f.write_str(&line)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn enoent() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    #[test]
    fn io_reason_is_a_source_shown_once() {
        let e = Error::io("cannot open", enoent()).in_file("/m/x.safetensors");
        assert_eq!(e.to_string(), "/m/x.safetensors: cannot open");
        let src = std::error::Error::source(&e).expect("the OS error is the source");
        assert_eq!(src.to_string(), enoent().to_string());
        let line = e.report().to_string();
        assert_eq!(line, format!("/m/x.safetensors: cannot open: {}", enoent()));
        assert_eq!(line.matches("os error").count(), 1, "{line}");
    }

    #[test]
    fn wrapped_parser_errors_are_not_repeated() {
        let e = Error::from(IndexError::MissingWeightMap).in_file("i.json");
        assert_eq!(e.report().to_string(), "i.json: index has no weight_map");
        assert!(std::error::Error::source(&e).is_none());
    }

    #[test]
    fn a_source_repeated_in_its_wrapper_is_shown_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Wrapper(#[from] io::Error);
        let w = Wrapper(enoent());
        assert_eq!(Report(&w).to_string(), enoent().to_string());
    }

    #[test]
    fn one_line_always() {
        let e = Error::invalid("bad\n  yaml\tat\x1b[31m line 2").in_file("a\nb.yml");
        let line = e.report().to_string();
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert_eq!(line, "a\\nb.yml: bad yaml\\tat\\u{1b}[31m line 2");
    }

    #[test]
    fn internal_errors_say_they_are_bugs_and_exit_1() {
        let e = Error::internal("3 bytes computed where the plan has 4");
        assert_eq!(e.exit_code(), 1);
        assert!(
            e.to_string()
                .starts_with("internal error (a bug in mergestream, please report it): 3 bytes")
        );
        assert_eq!(Error::usage("x").exit_code(), 2);
        assert_eq!(Error::invalid("x").exit_code(), 1);
    }
}
