//! One error type for the core; the Python binding maps each kind to a class in
//! `mmrecipe.errors`.

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
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn plan(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Plan { key: key.into(), message: message.into() }
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
        }
    }
}

impl std::error::Error for Error {}
