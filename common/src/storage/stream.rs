//! Large objects in bounded memory: writes streamed in parts (multipart uploads), reads
//! streamed in blocks, both hashed (SHA-256) as the bytes pass.
//!
//! [`Store::put_streamed`] reads the object from a reader in parts of [`PART_BYTES`] and
//! holds at most the store's parts in flight ([`Store::parts_in_flight`], default
//! [`PARTS_IN_FLIGHT`]) at once — the parts uploading and the one being read — whatever
//! the object's size. Each part lives in a mapping of its own ([`PageBuf`]), returned to
//! the kernel when its upload is done. An attempt that fails aborts
//! its multipart upload (the store keeps nothing of it) and a transient failure starts the
//! object again from a fresh reader, within the store's retry window.
//!
//! [`Store::get_streamed`] hands the object over in blocks of at most [`READ_BLOCK`] bytes
//! with at most [`BLOCKS_AHEAD`] blocks read ahead; a transient failure mid-way resumes at
//! the byte where it stopped (a ranged request).

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::{GetOptions, GetRange, GetResultPayload, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};

use super::{Store, io_handle, transient};
use crate::alloc::PageBuf;
use crate::error::{Error, Result};

/// The size of one part of a multipart upload (S3 wants at least 5 MiB but the last).
pub const PART_BYTES: usize = 8 << 20;
/// Parts of one object held at the same time by default (`SCFM_STORE_PARTS_IN_FLIGHT`):
/// one uploading while the next is read.
pub const PARTS_IN_FLIGHT: usize = 2;
/// The largest block [`ObjectReader::next`] returns.
pub const READ_BLOCK: usize = 1 << 20;
/// Blocks read ahead of the consumer.
pub const BLOCKS_AHEAD: usize = 4;
/// How often one read resumes after failing mid-way before it gives up.
const MAX_RESUMES: u32 = 20;

/// What a streamed transfer saw: the object's size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    /// Bytes transferred.
    pub size: u64,
    /// Hex SHA-256 of those bytes.
    pub sha256: String,
}

/// Reads up to [`PART_BYTES`] from `reader` on a blocking thread.
async fn read_part<R: Read + Send + 'static>(mut reader: R) -> object_store::Result<(R, PageBuf)> {
    tokio::task::spawn_blocking(move || {
        let mut buf = PageBuf::with_capacity(PART_BYTES)?;
        buf.fill_from(&mut reader).map(|_| (reader, buf))
    })
    .await
    .map_err(|source| object_store::Error::JoinError { source })?
    .map_err(local_read)
}

fn local_read(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "scfm (reading the object to upload)",
        source: Box::new(e),
    }
}

/// One attempt of [`Store::put_streamed`].
async fn put_once<F, R>(
    s: Arc<dyn object_store::ObjectStore>,
    p: object_store::path::Path,
    open: Arc<F>,
    in_flight: usize,
) -> object_store::Result<Streamed>
where
    F: Fn() -> std::io::Result<R> + Send + Sync + 'static,
    R: Read + Send + 'static,
{
    let reader = tokio::task::spawn_blocking(move || open())
        .await
        .map_err(|source| object_store::Error::JoinError { source })?
        .map_err(local_read)?;
    let mut hasher = Sha256::new();
    let (mut reader, mut part) = read_part(reader).await?;
    let mut size = part.len() as u64;
    hasher.update(part.as_ref());
    if part.len() < PART_BYTES {
        // It fits one part: one plain put.
        s.put(&p, Bytes::from_owner(part).into()).await?;
        return Ok(Streamed {
            size,
            sha256: hex::encode(hasher.finalize()),
        });
    }
    let upload = s.put_multipart(&p).await?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    loop {
        w.put(Bytes::from_owner(part));
        // The next part is read only once at most `in_flight - 1` are uploading.
        if let Err(e) = w.wait_for_capacity(in_flight - 1).await {
            let _ = w.abort().await;
            return Err(e);
        }
        (reader, part) = match read_part(reader).await {
            Ok(r) => r,
            Err(e) => {
                let _ = w.abort().await;
                return Err(e);
            }
        };
        if part.is_empty() {
            break;
        }
        size += part.len() as u64;
        hasher.update(part.as_ref());
    }
    // `finish` aborts the upload itself when a part or the completion fails.
    w.finish().await?;
    Ok(Streamed {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

impl Store {
    /// The size of `key` in bytes (a HEAD request), or `None` when it does not exist.
    pub async fn size_opt(&self, key: &str) -> Result<Option<u64>> {
        match self
            .retry(key, "head", |s, p| async move { s.head(&p).await })
            .await
        {
            Ok(meta) => Ok(Some(meta.size)),
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the bytes that `open()`'s reader yields at `key`, atomically (readers see the
    /// old object or the new one), in bounded memory: a multipart upload of
    /// [`PART_BYTES`] parts, holding at most [`Store::parts_in_flight`] parts at a time (one
    /// put when the object fits one part). Returns the size and SHA-256 of what was written, hashed while streaming.
    ///
    /// An attempt that fails aborts its multipart upload; a transient failure starts the
    /// whole object again with a new reader from `open`, within the store's retry window,
    /// so `open` must yield the same bytes every time.
    pub async fn put_streamed<F, R>(&self, key: &str, open: F) -> Result<Streamed>
    where
        F: Fn() -> std::io::Result<R> + Send + Sync + 'static,
        R: Read + Send + 'static,
    {
        let open = Arc::new(open);
        let in_flight = self.parts_in_flight();
        self.retry(key, "put", move |s, p| {
            put_once(s, p, open.clone(), in_flight)
        })
        .await
    }

    /// Reads `key` as a stream of blocks (see [`ObjectReader`]). A missing object is an
    /// [`Error::Store`] with `NotFound`, from the first [`ObjectReader::next`].
    pub fn get_streamed(&self, key: &str) -> ObjectReader {
        let (tx, rx) = tokio::sync::mpsc::channel(BLOCKS_AHEAD);
        let store = self.clone();
        let key_owned = key.to_string();
        io_handle().spawn(async move { produce(store, key_owned, tx).await });
        ObjectReader {
            rx,
            hasher: Sha256::new(),
            size: 0,
            url: self.url_of(key),
        }
    }
}

type Sender = tokio::sync::mpsc::Sender<Result<Bytes>>;

/// Reads the object from `offset` on, sending blocks; `Ok(None)` when it is done (or the
/// reader went away), `Ok(Some(offset))` to resume after a transient failure at `offset`.
async fn produce_from(store: &Store, key: &str, offset: u64, tx: &Sender) -> Result<Option<u64>> {
    let got = store
        .retry(key, "get", move |s, p| async move {
            let range = (offset > 0).then_some(GetRange::Offset(offset));
            s.get_opts(&p, GetOptions::new().with_range(range)).await
        })
        .await?;
    let mut offset = offset;
    match got.payload {
        GetResultPayload::File(file, path) => {
            let mut file = Some(file);
            loop {
                let mut f = file.take().expect("kept");
                let block = tokio::task::spawn_blocking(move || {
                    use std::io::{Seek, SeekFrom};
                    f.seek(SeekFrom::Start(offset))?;
                    // A mapping of its own: the consumer's thread frees it to the kernel.
                    let mut buf = PageBuf::with_capacity(READ_BLOCK)?;
                    buf.fill_from(&mut f)?;
                    Ok::<_, std::io::Error>((f, buf))
                })
                .await;
                let (f, buf) = match block {
                    Ok(Ok(r)) => r,
                    Ok(Err(source)) => return Err(Error::Io { path, source }),
                    Err(source) => {
                        return Err(store.err(key, object_store::Error::JoinError { source }));
                    }
                };
                if buf.is_empty() {
                    return Ok(None);
                }
                offset += buf.len() as u64;
                if tx.send(Ok(Bytes::from_owner(buf))).await.is_err() {
                    return Ok(None);
                }
                file = Some(f);
            }
        }
        GetResultPayload::Stream(mut stream) => {
            // Blocks in mappings of their own, as for a local file (see `PageBuf`).
            let new_block = || {
                PageBuf::with_capacity(READ_BLOCK).map_err(|source| Error::Io {
                    path: key.into(),
                    source,
                })
            };
            let mut block = new_block()?;
            loop {
                match stream.next().await {
                    Some(Ok(b)) => {
                        offset += b.len() as u64;
                        let mut rest: &[u8] = &b;
                        while !rest.is_empty() {
                            rest = &rest[block.push(rest)..];
                            if block.is_full() {
                                let full = std::mem::replace(&mut block, new_block()?);
                                if tx.send(Ok(Bytes::from_owner(full))).await.is_err() {
                                    return Ok(None);
                                }
                            }
                        }
                    }
                    None => {
                        if !block.is_empty() {
                            let _ = tx.send(Ok(Bytes::from_owner(block))).await;
                        }
                        return Ok(None);
                    }
                    Some(Err(e)) if transient(&e) => {
                        tracing::warn!(url = %store.url_of(key), offset, error = %e, "read failed mid-way; resuming where it stopped");
                        if !block.is_empty() && tx.send(Ok(Bytes::from_owner(block))).await.is_err()
                        {
                            return Ok(None);
                        }
                        return Ok(Some(offset));
                    }
                    Some(Err(e)) => return Err(store.err(key, e)),
                }
            }
        }
    }
}

/// The task behind an [`ObjectReader`].
async fn produce(store: Store, key: String, tx: Sender) {
    let mut offset = 0;
    for _ in 0..=MAX_RESUMES {
        match produce_from(&store, &key, offset, &tx).await {
            Ok(None) => return,
            Ok(Some(at)) => offset = at,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
    let _ = tx
        .send(Err(Error::Corrupt {
            url: store.url_of(&key),
            message: format!("the read failed mid-way {MAX_RESUMES} times; giving up"),
        }))
        .await;
}

/// An object being read in blocks, hashed as they pass ([`Store::get_streamed`]).
#[derive(Debug)]
pub struct ObjectReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes>>,
    hasher: Sha256,
    size: u64,
    url: String,
}

impl ObjectReader {
    /// The next block, or `None` at the end of the object.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        match self.rx.recv().await {
            None => Ok(None),
            Some(Err(e)) => Err(e),
            Some(Ok(b)) => {
                self.hasher.update(&b);
                self.size += b.len() as u64;
                Ok(Some(b))
            }
        }
    }

    /// The object's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Reads what is left (discarding it) and returns the size and SHA-256 of the whole.
    pub async fn finish(&mut self) -> Result<Streamed> {
        while self.next().await?.is_some() {}
        Ok(Streamed {
            size: self.size,
            sha256: hex::encode(self.hasher.clone().finalize()),
        })
    }
}
