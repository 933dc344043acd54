//! Object storage behind one type: a local directory or an object-store URL.
//!
//! [`Store`] wraps an `object_store` backend plus a key prefix; keys are `/`-separated
//! paths below the store's URL. Local paths and `file://` URLs use
//! `object_store::local::LocalFileSystem` (writes go to a temporary file and are renamed
//! into place, so a reader never sees a half-written object).

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A place to put and get objects.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    /// The directory behind a local store.
    local: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
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
            Self::check_url(url)?;
            unreachable!("check_url refuses every non-local URL");
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
        })
    }

    /// Checks that this build can open `url` (without opening it): local paths and
    /// `file://` URLs; other schemes are refused with a message naming them.
    pub fn check_url(url: &str) -> Result<()> {
        if url.starts_with("file://") || !url.contains("://") {
            return Ok(());
        }
        let scheme = url.split("://").next().unwrap_or("");
        Err(Error::config(
            "url",
            format!(
                "`{url}`: object-store scheme `{scheme}://` is not supported by this build (local paths and file:// are)"
            ),
        ))
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
        }
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

    /// Writes `bytes` at `key` (atomically for the local store).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.inner
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map_err(|e| self.err(key, e))?;
        Ok(())
    }

    /// Reads `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let r = self
            .inner
            .get(&self.path(key))
            .await
            .map_err(|e| self.err(key, e))?;
        r.bytes().await.map_err(|e| self.err(key, e))
    }

    /// Reads `key`, or `None` when it does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.inner.get(&self.path(key)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.err(key, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(key, e)),
        }
    }

    /// Keys (relative to the store) below `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let base = self.path(prefix);
        let metas: Vec<_> = self
            .inner
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(|e| self.err(prefix, e))?;
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
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(key, e)),
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
        s.delete("ckpt/a.json").await.unwrap();
        s.delete("ckpt/a.json").await.unwrap();
        assert_eq!(s.list("").await.unwrap(), vec!["ckpt/b.bin"]);
        assert!(dir.path().join("run/ckpt/b.bin").exists());
        let e = s.get("missing.json").await.unwrap_err().to_string();
        assert!(e.contains("missing.json"), "{e}");
    }

    #[test]
    fn unsupported_scheme_is_named() {
        let e = Store::open("s3://bucket/run").unwrap_err().to_string();
        assert!(e.contains("s3://"), "{e}");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
