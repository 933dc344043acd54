//! Object storage behind one type: a local directory or an object-store URL.
//!
//! [`Store`] wraps an `object_store` backend plus a key prefix; keys are `/`-separated
//! paths below the store's URL. Local paths and `file://` URLs use
//! `object_store::local::LocalFileSystem` (writes go to a temporary file and are renamed
//! into place, so a reader never sees a half-written object). `s3://bucket/prefix`,
//! `gs://bucket/prefix` and `az://container/prefix` use object_store's cloud clients,
//! configured from the environment as those clients document (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` + `AWS_ALLOW_HTTP=true` for an
//! S3-compatible server; `GOOGLE_SERVICE_ACCOUNT`; `AZURE_STORAGE_ACCOUNT_NAME`,
//! `AZURE_STORAGE_ACCOUNT_KEY`, …). Each cloud backend is a cargo feature (`s3`, `gcs`,
//! `azure`, all on by default; [`backend_feature`]): a URL whose backend a build leaves out
//! is refused, naming the feature.
//!
//! Every request has a deadline, and an operation that fails transiently (a server that
//! refuses connections, a 5xx answer, a timeout) is retried with exponential backoff and
//! jitter, each wait capped at [`MAX_WAIT`], until its retry window has passed: by default
//! [`DEFAULT_RETRY_WINDOW`], or `SCFM_STORE_RETRY_TIMEOUT_S` seconds
//! ([`default_retry_window`]). The cloud clients retry a failed request a few times
//! quickly on their own; the window is kept here, around each whole operation.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub mod recording;
mod stream;

pub use stream::{BLOCKS_AHEAD, ObjectReader, PART_BYTES, PARTS_IN_FLIGHT, READ_BLOCK, Streamed};

/// A place to put and get objects.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    /// The directory behind a local store.
    local: Option<std::path::PathBuf>,
    /// How long one operation is retried when it fails transiently.
    window: Duration,
    /// Parts of one streamed upload held at a time ([`Store::parts_in_flight`]).
    parts: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// The end of an object ([`Store::get_tail_opt`]).
#[derive(Debug, Clone)]
pub struct Tail {
    /// The last bytes of the object (all of them when `bytes.len() == size`).
    pub bytes: Bytes,
    /// The object's size in bytes.
    pub size: u64,
    /// When the object was last written.
    pub modified: std::time::SystemTime,
}

/// How long a store operation is retried when it fails transiently, unless
/// `SCFM_STORE_RETRY_TIMEOUT_S` says otherwise.
pub const DEFAULT_RETRY_WINDOW: Duration = Duration::from_secs(60);
/// The ceiling of the first wait before an operation is attempted again (it doubles with
/// each attempt, up to [`MAX_WAIT`]).
pub const FIRST_WAIT: Duration = Duration::from_millis(250);
/// The longest wait between two attempts of an operation.
pub const MAX_WAIT: Duration = Duration::from_secs(5);

/// The parts in flight of this process's stores ([`Store::parts_in_flight`]):
/// `SCFM_STORE_PARTS_IN_FLIGHT` (a whole number from 1), else [`PARTS_IN_FLIGHT`]. Read
/// once; another value is reported and the default used.
pub fn default_parts_in_flight() -> usize {
    static PARTS: OnceLock<usize> = OnceLock::new();
    *PARTS.get_or_init(|| match std::env::var("SCFM_STORE_PARTS_IN_FLIGHT") {
        Err(_) => PARTS_IN_FLIGHT,
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => {
                tracing::warn!(
                    value = %v,
                    "SCFM_STORE_PARTS_IN_FLIGHT is not a whole number from 1; using {PARTS_IN_FLIGHT}"
                );
                PARTS_IN_FLIGHT
            }
        },
    })
}

/// The retry window of this process's stores: `SCFM_STORE_RETRY_TIMEOUT_S` seconds, else
/// [`DEFAULT_RETRY_WINDOW`]. Read once; a value that is not a whole number of seconds is
/// reported and the default used. `SCFM_STORE_RETRIES`, read by older releases, is named
/// in a warning when set, since it no longer changes anything.
pub fn default_retry_window() -> Duration {
    static WINDOW: OnceLock<Duration> = OnceLock::new();
    *WINDOW.get_or_init(|| {
        if let Some(v) = std::env::var_os("SCFM_STORE_RETRIES") {
            tracing::warn!(
                value = ?v,
                "SCFM_STORE_RETRIES is no longer read: a failed store operation is retried until SCFM_STORE_RETRY_TIMEOUT_S seconds (default 60) have passed"
            );
        }
        match std::env::var("SCFM_STORE_RETRY_TIMEOUT_S") {
            Err(_) => DEFAULT_RETRY_WINDOW,
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(s) => Duration::from_secs(s),
                Err(_) => {
                    tracing::warn!(
                        value = %v,
                        "SCFM_STORE_RETRY_TIMEOUT_S is not a whole number of seconds; using {} s",
                        DEFAULT_RETRY_WINDOW.as_secs()
                    );
                    DEFAULT_RETRY_WINDOW
                }
            },
        }
    })
}

/// Exponential backoff with jitter: each wait is drawn uniformly between half and all of
/// a ceiling that starts at `first` and doubles with every wait, up to `max`. The jitter
/// keeps many processes that lost the same server from retrying in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    ceiling: Duration,
    max: Duration,
}

impl Backoff {
    /// Waits from about `first` growing to at most `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            ceiling: first.min(max),
            max,
        }
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (ceiling * 2).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(unit_random())
    }
}

/// A random number in [0, 1) (for jitter; not for anything that must be reproducible).
fn unit_random() -> f64 {
    use std::hash::BuildHasher;
    // Every RandomState has fresh keys, so this hashes the same input differently each time.
    let h = std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether an object_store error may go away when the operation is repeated (network,
/// server and timeout errors; not a missing object, a refused credential or a bad path).
fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        // A full disk does not empty itself within a retry's back-off.
        E::Generic { .. } if storage_full(e) => false,
        E::Generic { .. } | E::JoinError { .. } => true,
        E::NotFound { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::NotImplemented { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::InvalidPath { .. }
        | E::UnknownConfigurationKey { .. }
        | E::NotSupported { .. } => false,
        _ => false,
    }
}

/// Whether `e` is a store failure that may go away with time: one that was retried for
/// its whole window ([`Error::StoreGaveUp`]) or a transient object-store error; not a full
/// disk, a missing object, a refused credential or a malformed path.
pub fn is_transient(e: &Error) -> bool {
    match e {
        Error::StoreGaveUp { .. } => true,
        Error::Store { source, .. } => transient(source),
        _ => false,
    }
}

/// Whether an I/O error somewhere in `e`'s source chain is "no space left on device".
fn storage_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::StorageFull
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The runtime a store operation runs on: the caller's when it is a multi-thread runtime
/// (a binary's one runtime, see [`crate::runtime::Rt`]: its workers keep driving the
/// pooled connections between calls), else a fallback runtime of 2 threads started on
/// first use (callers on a current-thread runtime, which drives nothing while idle).
fn io_handle() -> tokio::runtime::Handle {
    if let Ok(h) = tokio::runtime::Handle::try_current()
        && h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    {
        return h;
    }
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("scfm-store-io")
            .enable_all()
            .build()
            .expect("cannot start the storage I/O runtime")
    })
    .handle()
    .clone()
}

/// Installs rustls' crypto provider for the process: ring, the only one compiled in
/// (tonic's `tls-ring`; object_store's `ring`; reqwest's `rustls-no-provider`, which uses
/// the process default and panics without one). Called by every entry point that may use
/// TLS and before a cloud store is built; idempotent.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The cargo feature that compiles in the backend of an object-store URL scheme (`s3` →
/// `s3`, `gs` → `gcs`, `az` → `azure`; features of scfm-common, and of `scfm` and
/// `scfm-worker`, which forward them), and whether this build has it. `None` for a scheme
/// that no feature provides.
pub fn backend_feature(scheme: &str) -> Option<(&'static str, bool)> {
    match scheme {
        "s3" => Some(("s3", cfg!(feature = "s3"))),
        "gs" => Some(("gcs", cfg!(feature = "gcs"))),
        "az" => Some(("azure", cfg!(feature = "azure"))),
        _ => None,
    }
}

/// The error for `url`, whose `scheme`'s backend (cargo feature `feature`) this build lacks.
fn compiled_out(url: &str, scheme: &str, feature: &str) -> Error {
    Error::config(
        "url",
        format!(
            "`{url}`: this build has no `{scheme}://` backend; build scfm and scfm-worker with the cargo feature `{feature}` (on by default)"
        ),
    )
}

impl Store {
    /// Opens `url`: a local path (created if missing) or `file:///abs/path`.
    /// Cloud schemes (`s3://`, `gs://`, `az://`) are refused with a message saying so.
    pub fn open(url: &str) -> Result<Store> {
        let local = if let Some(rest) = url.strip_prefix("file://") {
            Some(std::path::PathBuf::from(rest))
        } else if url.contains("://") {
            None
        } else {
            Some(std::path::PathBuf::from(url))
        };
        let Some(path) = local else {
            return Self::open_cloud(url);
        };
        std::fs::create_dir_all(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let abs = std::fs::canonicalize(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let fs = LocalFileSystem::new_with_prefix(&abs)
            .map_err(|source| Error::Store {
                url: url.to_string(),
                source,
            })?
            .with_automatic_cleanup(true);
        Ok(Store {
            inner: Arc::new(fs),
            prefix: ObjPath::default(),
            url: format!("file://{}", abs.display()),
            local: Some(abs),
            window: default_retry_window(),
            parts: default_parts_in_flight(),
        })
    }

    /// Checks that `url` names a store this build can open (without contacting it):
    /// a local path, `file://`, or `s3://`, `gs://` or `az://` with a bucket and the
    /// backend compiled in ([`backend_feature`]).
    pub fn check_url(url: &str) -> Result<()> {
        if url.starts_with("file://") || !url.contains("://") {
            return Ok(());
        }
        let (scheme, rest) = url.split_once("://").unwrap_or(("", ""));
        let Some((feature, compiled)) = backend_feature(scheme) else {
            return Err(Error::config(
                "url",
                format!(
                    "`{url}`: object-store scheme `{scheme}://` is not supported (local paths, file://, s3://, gs:// and az:// are)"
                ),
            ));
        };
        if !compiled {
            return Err(compiled_out(url, scheme, feature));
        }
        if rest.split('/').next().unwrap_or("").is_empty() {
            return Err(Error::config(
                "url",
                format!("`{url}`: no bucket (expected {scheme}://BUCKET/PREFIX)"),
            ));
        }
        Ok(())
    }

    /// Opens an `s3://`, `gs://` or `az://` URL with credentials and endpoint from the
    /// environment, request deadlines and retries (a few quick ones per request in the
    /// client; the time-based window is [`Store::retry`]'s).
    #[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
    fn open_cloud(url: &str) -> Result<Store> {
        Self::check_url(url)?;
        install_crypto_provider();
        let (scheme, rest) = url.split_once("://").expect("checked");
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let base = format!("{scheme}://{bucket}");
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: default_retry_window(),
        };
        // Deadlines as client config keys, so that the client options the builders read
        // from the environment (AWS_ALLOW_HTTP, proxies, …) are kept.
        use object_store::ClientConfigKey as C;
        let timeouts = [
            (C::ConnectTimeout, "10s".to_string()),
            (
                C::Timeout,
                format!("{}s", env_or("SCFM_STORE_TIMEOUT_S", 120u64)),
            ),
        ];
        let err = |source| Error::Store {
            url: url.to_string(),
            source,
        };
        let inner: Arc<dyn ObjectStore> = match scheme {
            #[cfg(feature = "s3")]
            "s3" => Arc::new(
                timeouts
                    .into_iter()
                    .fold(
                        object_store::aws::AmazonS3Builder::from_env(),
                        |b, (k, v)| {
                            b.with_config(object_store::aws::AmazonS3ConfigKey::Client(k), v)
                        },
                    )
                    .with_url(&base)
                    .with_retry(retry)
                    .build()
                    .map_err(err)?,
            ),
            #[cfg(feature = "gcs")]
            "gs" => Arc::new(
                timeouts
                    .into_iter()
                    .fold(
                        object_store::gcp::GoogleCloudStorageBuilder::from_env(),
                        |b, (k, v)| b.with_config(object_store::gcp::GoogleConfigKey::Client(k), v),
                    )
                    .with_url(&base)
                    .with_retry(retry)
                    .build()
                    .map_err(err)?,
            ),
            #[cfg(feature = "azure")]
            "az" => Arc::new(
                timeouts
                    .into_iter()
                    .fold(
                        object_store::azure::MicrosoftAzureBuilder::from_env(),
                        |b, (k, v)| {
                            b.with_config(object_store::azure::AzureConfigKey::Client(k), v)
                        },
                    )
                    .with_url(&base)
                    .with_retry(retry)
                    .build()
                    .map_err(err)?,
            ),
            _ => unreachable!("check_url refuses the schemes this build lacks"),
        };
        let prefix = prefix.trim_matches('/');
        Ok(Store::from_backend(
            inner,
            prefix,
            format!("{base}/{prefix}").trim_end_matches('/'),
        ))
    }

    /// A build without object-store backends: every cloud URL is refused by name.
    #[cfg(not(any(feature = "s3", feature = "gcs", feature = "azure")))]
    fn open_cloud(url: &str) -> Result<Store> {
        Self::check_url(url)?;
        unreachable!("check_url refuses every cloud scheme in a build without backends")
    }

    /// The local file of `key` when this store is a local directory (objects can then be
    /// read in place), else `None`.
    pub fn local_path(&self, key: &str) -> Option<std::path::PathBuf> {
        let root = self.local.as_ref()?;
        let mut p = root.join(self.prefix.as_ref());
        for part in key.split('/').filter(|s| !s.is_empty()) {
            p.push(part);
        }
        Some(p)
    }

    /// Wraps an existing backend (used by tests and by cloud backends).
    pub fn from_backend(inner: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Store {
        Store {
            inner,
            prefix: ObjPath::from(prefix),
            url: url.to_string(),
            local: None,
            window: default_retry_window(),
            parts: default_parts_in_flight(),
        }
    }

    /// The same store seen through a [`recording::Recording`] of its backend (tests and
    /// benchmarks count its requests with the handle returned).
    pub fn recorded(&self) -> (Store, Arc<recording::Recording>) {
        let rec = Arc::new(recording::Recording::new(self.inner.clone()));
        let store = Store {
            inner: rec.clone(),
            ..self.clone()
        };
        (store, rec)
    }

    /// The same store with another retry window (e.g. a short one for best-effort
    /// cleanup while the store may be down).
    pub fn with_retry_window(mut self, window: Duration) -> Store {
        self.window = window;
        self
    }

    /// How long an operation on this store is retried when it fails transiently.
    pub fn retry_window(&self) -> Duration {
        self.window
    }

    /// The same store holding at most `parts` (at least 1) parts of a streamed upload at
    /// a time.
    pub fn with_parts_in_flight(mut self, parts: usize) -> Store {
        self.parts = parts.max(1);
        self
    }

    /// How many parts of one streamed upload ([`Store::put_streamed`]) this store holds
    /// in memory at a time: the parts uploading and the one being read, [`PART_BYTES`]
    /// each. 1 reads a part only when the previous one is stored (the least memory); 2
    /// (the default) reads the next while one uploads.
    pub fn parts_in_flight(&self) -> usize {
        self.parts
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full URL of `key`.
    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{}", self.url.trim_end_matches('/'), key)
    }

    fn path(&self, key: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in key.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    fn err(&self, key: &str, source: object_store::Error) -> Error {
        Error::Store {
            url: self.url_of(key),
            source,
        }
    }

    /// Runs `op` on the store's I/O runtime until it succeeds, fails for good (not
    /// [`transient`]), or has failed transiently for the store's retry window; between
    /// attempts it waits as [`Backoff`] says, from [`FIRST_WAIT`] up to [`MAX_WAIT`], never
    /// past the window's end. An attempt under way when the window ends is not cut short:
    /// each request has its own deadline.
    ///
    /// Every operation runs on a multi-thread runtime whatever runtime the caller is on
    /// (the caller's own when it is one, see `io_handle`): the HTTP clients pool
    /// connections, and a pooled connection is driven by the runtime that opened it — used
    /// from another, idle runtime it would hang until its deadline.
    async fn retry<T, F, Fut>(&self, key: &str, what: &'static str, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(Arc<dyn ObjectStore>, ObjPath) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let (inner, path, url) = (self.inner.clone(), self.path(key), self.url_of(key));
        let window = self.window;
        let task = io_handle().spawn(async move {
            let start = tokio::time::Instant::now();
            let deadline = start + window;
            let mut backoff = Backoff::new(FIRST_WAIT, MAX_WAIT);
            let mut attempt = 1u32;
            loop {
                match op(inner.clone(), path.clone()).await {
                    Ok(v) => {
                        if attempt > 1 {
                            tracing::info!(url = %url, attempts = attempt, seconds = start.elapsed().as_secs_f64(), "{what} succeeded after retrying");
                        }
                        return Ok(v);
                    }
                    Err(e) if transient(&e) => {
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        if left.is_zero() {
                            return Err((e, Some((attempt, start.elapsed()))));
                        }
                        let wait = backoff.next_wait().min(left);
                        tracing::warn!(url = %url, attempt, error = %e, retry_in_s = wait.as_secs_f64(), window_left_s = left.as_secs_f64(), "{what} failed; retrying");
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                    Err(e) => return Err((e, None)),
                }
            }
        });
        match task.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((source, None))) => Err(self.err(key, source)),
            Ok(Err((source, Some((attempts, spent))))) => Err(Error::StoreGaveUp {
                url: self.url_of(key),
                attempts,
                seconds: spent.as_secs_f64(),
                window_s: window.as_secs(),
                source,
            }),
            Err(join) => Err(self.err(key, object_store::Error::JoinError { source: join })),
        }
    }

    /// Writes `bytes` at `key` (atomically: readers see the old object or the new one).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.retry(key, "put", move |s, p| {
            let payload = PutPayload::from(bytes.clone());
            async move { s.put(&p, payload).await }
        })
        .await?;
        Ok(())
    }

    /// Reads `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        self.retry(
            key,
            "get",
            |s, p| async move { s.get(&p).await?.bytes().await },
        )
        .await
    }

    /// Reads `key`, or `None` when it does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.get(key).await {
            Ok(b) => Ok(Some(b)),
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads at most the last `max_bytes` of `key` (one ranged request), with the
    /// object's size and modification time; `None` when it does not exist. The bytes are
    /// the whole object when `tail.bytes.len() == tail.size`.
    pub async fn get_tail_opt(&self, key: &str, max_bytes: u64) -> Result<Option<Tail>> {
        let got = self
            .retry(key, "get", move |s, p| async move {
                let opts = GetOptions::new().with_range(Some(GetRange::Suffix(max_bytes)));
                let r = s.get_opts(&p, opts).await?;
                let (size, modified) = (r.meta.size, r.meta.last_modified);
                Ok((r.bytes().await?, size, modified))
            })
            .await;
        match got {
            Ok((bytes, size, modified)) => Ok(Some(Tail {
                bytes,
                size,
                modified: modified.into(),
            })),
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Keys (relative to the store) below `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let metas: Vec<object_store::ObjectMeta> = self
            .retry(prefix, "list", |s, p| async move {
                s.list(Some(&p)).try_collect().await
            })
            .await?;
        let strip = self.prefix.as_ref().len();
        let mut keys: Vec<String> = metas
            .into_iter()
            .map(|m| {
                m.location.as_ref()[strip..]
                    .trim_start_matches('/')
                    .to_string()
            })
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Deletes `key`; a missing key is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self
            .retry(key, "delete", |s, p| async move { s.delete(&p).await })
            .await
        {
            Ok(())
            | Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_roundtrip_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().join("run").to_str().unwrap()).unwrap();
        s.put("ckpt/a.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        s.put("ckpt/b.bin", Bytes::from_static(b"xy"))
            .await
            .unwrap();
        assert_eq!(
            s.get("ckpt/b.bin").await.unwrap(),
            Bytes::from_static(b"xy")
        );
        assert_eq!(
            s.list("ckpt").await.unwrap(),
            vec!["ckpt/a.json", "ckpt/b.bin"]
        );
        assert!(s.get_opt("nope").await.unwrap().is_none());
        let t = s.get_tail_opt("ckpt/b.bin", 1).await.unwrap().unwrap();
        assert_eq!((&t.bytes[..], t.size), (&b"y"[..], 2));
        assert!(t.modified.elapsed().unwrap() < Duration::from_secs(600));
        let t = s.get_tail_opt("ckpt/b.bin", 100).await.unwrap().unwrap();
        assert_eq!(&t.bytes[..], b"xy");
        assert!(s.get_tail_opt("nope", 10).await.unwrap().is_none());
        s.delete("ckpt/a.json").await.unwrap();
        s.delete("ckpt/a.json").await.unwrap();
        assert_eq!(s.list("").await.unwrap(), vec!["ckpt/b.bin"]);
        assert!(dir.path().join("run/ckpt/b.bin").exists());
        let e = s.get("missing.json").await.unwrap_err().to_string();
        assert!(e.contains("missing.json"), "{e}");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(1000));
        for ceiling in [200, 400, 800, 1000, 1000, 1000].map(ms) {
            let w = b.next_wait();
            assert!(
                w >= ceiling / 2 && w <= ceiling,
                "{w:?} outside the ceiling {ceiling:?}"
            );
        }
        let draws: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::new(ms(1000), ms(1000)).next_wait())
            .collect();
        assert!(draws.len() > 1, "no jitter: {draws:?}");
    }

    /// A server that refuses every connection: the operation is retried for the store's
    /// window (not a fixed number of quick attempts), and the error names the object, the
    /// attempts and the setting.
    #[cfg(feature = "s3")]
    #[tokio::test]
    async fn a_refusing_server_is_retried_for_the_window_then_named() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        install_crypto_provider();
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_bucket_name("b")
            .with_region("us-east-1")
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .unwrap();
        let store = Store::from_backend(Arc::new(s3), "run", "s3://b/run")
            .with_retry_window(Duration::from_secs(3));
        let t = std::time::Instant::now();
        let e = store
            .put("x.bin", Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        let took = t.elapsed();
        let msg = e.to_string();
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(10),
            "{took:?}: {msg}"
        );
        assert!(
            matches!(e, Error::StoreGaveUp { attempts, .. } if attempts >= 4),
            "{msg}"
        );
        assert!(
            msg.contains("s3://b/run/x.bin") && msg.contains("SCFM_STORE_RETRY_TIMEOUT_S=3"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_scheme_is_named() {
        let e = Store::open("ftp://host/run").unwrap_err().to_string();
        assert!(e.contains("ftp://"), "{e}");
        let e = Store::open("s3:///run").unwrap_err().to_string();
        assert!(e.contains("no bucket"), "{e}");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// Each cloud scheme maps to its cargo feature; a URL whose backend is compiled out is
    /// refused naming the scheme and the feature (in this build or one without it).
    #[test]
    fn compiled_out_backends_name_their_feature() {
        assert_eq!(backend_feature("s3"), Some(("s3", cfg!(feature = "s3"))));
        assert_eq!(backend_feature("gs"), Some(("gcs", cfg!(feature = "gcs"))));
        assert_eq!(
            backend_feature("az"),
            Some(("azure", cfg!(feature = "azure")))
        );
        assert_eq!(backend_feature("ftp"), None);
        assert_eq!(
            compiled_out("gs://b/run", "gs", "gcs").to_string(),
            "invalid config `url`: `gs://b/run`: this build has no `gs://` backend; build scfm and scfm-worker with the cargo feature `gcs` (on by default)"
        );
        for scheme in ["s3", "gs", "az"] {
            let (feature, compiled) = backend_feature(scheme).unwrap();
            let url = format!("{scheme}://bucket/run");
            match Store::check_url(&url) {
                Ok(()) => assert!(compiled, "{url}"),
                Err(e) => {
                    assert!(!compiled, "{url}: {e}");
                    assert_eq!(
                        e.to_string(),
                        compiled_out(&url, scheme, feature).to_string()
                    );
                    // Opening it fails the same way, before any client is built.
                    let e = Store::open(&url).map(|_| ()).unwrap_err().to_string();
                    assert!(e.contains(&format!("cargo feature `{feature}`")), "{e}");
                }
            }
        }
    }
}
