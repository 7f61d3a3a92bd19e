//! The one error type of the library: every variant names the file, tensor or
//! option at fault, so the CLI can print it and exit non-zero.

use std::path::{Path, PathBuf};

/// Errors the engine reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while touching a file. The OS message is
    /// part of the text and deliberately not a `source()` as well: printers of
    /// the whole chain (`{:#}`) would show it twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A file whose contents are not what its format requires.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor whose shape does not fit (in a weights file, an input, an op).
    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor that is missing, unexpected, or of the wrong dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    /// A command-line option or argument with a value that cannot be used.
    #[error("option {option}: {msg}")]
    Arg { option: String, msg: String },
    /// The compute backend failed (driver, compiler, out of memory).
    #[error("backend: {0}")]
    Backend(String),
    /// SIGINT or SIGTERM stopped long work after saving its state; the
    /// message says how to continue. A caller running many jobs stops on it
    /// rather than counting it as one job's failure.
    #[error("{0}")]
    Interrupted(String),
    /// Anything else worth a plain message.
    #[error("{0}")]
    Msg(String),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err: source,
        }
    }

    /// A format error in the file at `path`.
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// A bad value for the command-line option `option`.
    pub fn arg(option: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Arg {
            option: option.into(),
            msg: msg.into(),
        }
    }

    /// A problem with the tensor called `name`.
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }

    /// A shape mismatch on the tensor called `name`.
    pub fn shape(name: impl Into<String>, expected: &[usize], got: &[usize]) -> Self {
        Error::Shape {
            name: name.into(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }
}

/// Fails with a shape error unless `got == expected`.
pub fn check_shape(name: &str, expected: &[usize], got: &[usize]) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::shape(name, expected, got))
    }
}
