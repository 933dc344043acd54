//! The one error type of `scfm-common`.

use std::path::PathBuf;

/// Everything that can go wrong in the shared library: configuration, data and storage.
///
/// Every variant names the file, field or value at fault so the message alone tells
/// the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid; `field` is its dotted path (e.g. `model.n_heads`).
    #[error("invalid config `{field}`: {message}")]
    Config {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it and what is allowed.
        message: String,
    },
    /// A configuration or manifest file could not be parsed.
    #[error("cannot parse {path}: {message}")]
    Parse {
        /// The file that failed to parse.
        path: PathBuf,
        /// The parser's message (includes line/column where known).
        message: String,
    },
    /// An HDF5 file could not be read or written.
    #[error("HDF5 error in {path}: {source}")]
    Hdf5 {
        /// The file being accessed.
        path: PathBuf,
        /// The underlying HDF5 error.
        #[source]
        source: hdf5::Error,
    },
    /// A data file is readable but its content is not what the format requires.
    #[error("bad data in {path}: {message}")]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What was expected and what was found.
        message: String,
    },
    /// An object-store operation failed.
    #[error("storage error at {url}: {source}")]
    Store {
        /// The URL or key being accessed.
        url: String,
        /// The underlying object_store error.
        #[source]
        source: object_store::Error,
    },
    /// An object-store operation kept failing transiently for its whole retry window.
    #[error(
        "storage error at {url}: {source} (gave up after {attempts} attempts in {seconds:.1} s; the window is SCFM_STORE_RETRY_TIMEOUT_S={window_s})"
    )]
    StoreGaveUp {
        /// The URL or key being accessed.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// Seconds spent on them.
        seconds: f64,
        /// The retry window in seconds.
        window_s: u64,
        /// The last attempt's error.
        #[source]
        source: object_store::Error,
    },
    /// A stored object failed verification (checksum, size or content).
    #[error("corrupt object {url}: {message}")]
    Corrupt {
        /// The URL or key of the object.
        url: String,
        /// What did not match.
        message: String,
    },
    /// Evaluation inputs are inconsistent (lengths, sizes, non-finite values) or too small
    /// for a metric (e.g. fewer than two labels for a silhouette).
    #[error("cannot evaluate: {message}")]
    Eval {
        /// What is wrong with the inputs.
        message: String,
    },
    /// A local I/O error.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The path being accessed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for `scfm-common`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Eval`].
    pub fn eval(message: impl Into<String>) -> Self {
        Error::Eval {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}
