//! The one error type of `scfm-coordinator`.

/// Errors of the coordinator library.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Configuration, storage or data error from `scfm-common`.
    #[error(transparent)]
    Common(#[from] scfm_common::Error),
    /// A setting cannot be used (address, TLS files, ...).
    #[error("{0}")]
    Config(String),
    /// A checkpoint could not be read.
    #[error("checkpoint {0}")]
    Checkpoint(String),
    /// The job failed.
    #[error("job failed: {0}")]
    JobFailed(String),
    /// A coordinator could not be asked (unreachable, refused the token, …).
    #[error("coordinator {addr}: {message}")]
    Rpc {
        /// The coordinator's address.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// A worker process could not be started or supervised.
    #[error("worker process: {0}")]
    Process(String),
}
