//! The one error type of `scfm-worker`.

/// Errors of the worker library.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Configuration, data or storage error from `scfm-common`.
    #[error(transparent)]
    Common(#[from] scfm_common::Error),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A checkpoint is missing, corrupt or does not match this run.
    #[error("checkpoint {url}: {message}")]
    Checkpoint {
        /// The checkpoint URL or key.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// Training diverged or hit an impossible state (NaN loss, inconsistent data).
    #[error("training failed at step {step}: {message}")]
    Training {
        /// Optimizer step.
        step: u64,
        /// What happened.
        message: String,
    },
    /// A collective operation between workers failed (dead peer, timeout, mismatch).
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    /// The coordinator refused or failed a request.
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// The libtorch loaded at run time is not the one the worker was built against (or its
    /// version cannot be told).
    #[error("{0}")]
    Libtorch(String),
    /// The requested collective backend (`cluster.collective`) cannot be used.
    #[error("collective backend: {0}")]
    Backend(String),
    /// The requested device cannot be used.
    #[error("device: {0}")]
    Device(String),
    /// The training data could not be read (the message names the shard or file).
    #[error("data: {0}")]
    Data(String),
    /// The job is over for this worker: the coordinator ended it (its Stop order) or
    /// dropped this worker. The binary exits with code 3 after its normal shutdown.
    #[error("{0}")]
    Ended(String),
    /// An invariant of the worker was broken (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias for the worker library.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
