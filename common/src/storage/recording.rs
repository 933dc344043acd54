//! A store that records the requests it passes on to a real backend (for tests and
//! benchmarks): reads per object, the largest single upload, multipart parts.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

/// What a [`Recording`] store saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requests {
    /// Reads (GET, HEAD excluded) by object path (the backend's path, prefix included).
    pub gets: HashMap<String, usize>,
    /// HEAD requests by object path.
    pub heads: HashMap<String, usize>,
    /// Single-request uploads.
    pub puts: usize,
    /// The largest single-request upload, in bytes.
    pub largest_put: usize,
    /// Multipart uploads started.
    pub multipart_uploads: usize,
    /// Multipart parts sent.
    pub parts: usize,
    /// The largest multipart part, in bytes.
    pub largest_part: usize,
    /// Multipart parts being uploaded now.
    pub parts_uploading: usize,
    /// The most multipart parts uploading at the same time.
    pub most_parts_uploading: usize,
}

impl Requests {
    /// The largest payload of any one request (a put or a part).
    pub fn largest_payload(&self) -> usize {
        self.largest_put.max(self.largest_part)
    }

    /// Reads of the objects whose path ends with `suffix`.
    pub fn gets_of(&self, suffix: &str) -> usize {
        self.gets
            .iter()
            .filter(|(k, _)| k.ends_with(suffix))
            .map(|(_, n)| n)
            .sum()
    }
}

/// A backend wrapper that counts the requests passed to `inner`.
#[derive(Debug)]
pub struct Recording {
    inner: Arc<dyn ObjectStore>,
    seen: Arc<Mutex<Requests>>,
}

impl Recording {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Recording {
            inner,
            seen: Arc::default(),
        }
    }

    /// What was seen so far.
    pub fn requests(&self) -> Requests {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets what was seen.
    pub fn reset(&self) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Requests::default();
    }

    fn with<T>(&self, f: impl FnOnce(&mut Requests) -> T) -> T {
        f(&mut self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl fmt::Display for Recording {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recording({})", self.inner)
    }
}

#[derive(Debug)]
struct RecordingUpload {
    inner: Box<dyn MultipartUpload>,
    seen: Arc<Mutex<Requests>>,
}

#[async_trait]
impl MultipartUpload for RecordingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        {
            let mut s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            s.parts += 1;
            s.largest_part = s.largest_part.max(data.content_length());
            s.parts_uploading += 1;
            s.most_parts_uploading = s.most_parts_uploading.max(s.parts_uploading);
        }
        let upload = self.inner.put_part(data);
        let seen = self.seen.clone();
        Box::pin(async move {
            let r = upload.await;
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .parts_uploading -= 1;
            r
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl ObjectStore for Recording {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.with(|s| {
            s.puts += 1;
            s.largest_put = s.largest_put.max(payload.content_length());
        });
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.with(|s| s.multipart_uploads += 1);
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(RecordingUpload {
            inner,
            seen: self.seen.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let key = location.to_string();
        self.with(|s| {
            let map = if options.head {
                &mut s.heads
            } else {
                &mut s.gets
            };
            *map.entry(key).or_default() += 1;
        });
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
