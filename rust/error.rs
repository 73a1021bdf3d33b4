//! One error type for the core. The first four kinds are the user's to fix (the recipe,
//! the tokenizer, the chat template, a data row); `Io` is a file the core could not read
//! or write; `Internal` is a bug in mmrecipe (a caller broke the core's contract). The
//! Python binding maps each kind to one exception class (`python::to_py`).

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The build plan (a resolved recipe) is invalid: names the recipe key.
    Plan { key: String, message: String },
    /// The tokenizer could not be loaded or lacks a required token.
    Tokenizer(String),
    /// The chat template does not compile or fails to render.
    Template(String),
    /// One data row is unusable: names source, row and field.
    Data { source: String, row: u64, field: String, message: String },
    /// A file could not be read or written (the spill file of tokenized samples).
    Io { path: String, message: String },
    /// A bug in mmrecipe: malformed buffers, calls out of order, no thread pool.
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn plan(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Plan { key: key.into(), message: message.into() }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Plan { key, message } => write!(f, "{key}: {message}"),
            Error::Tokenizer(m) => write!(f, "tokenizer: {m}"),
            Error::Template(m) => write!(f, "chat template: {m}"),
            Error::Data { source, row, field, message } => {
                write!(f, "source '{source}', row {row}, field '{field}': {message}")
            }
            Error::Io { path, message } => write!(f, "{path}: {message}"),
            Error::Internal(m) => write!(f, "internal error in mmrecipe (please report it): {m}"),
        }
    }
}

impl std::error::Error for Error {}
