//! Checkpoint parts streamed in bounded memory: safetensors written from ranges of the
//! flat tensors in blocks (into a spill file that the upload then streams to the store),
//! and safetensors read from the store in blocks straight into the flat tensors.
//!
//! The bytes are those `safetensors::serialize` writes for the same tensors (the header
//! is made by it), so checkpoints stay byte-for-byte deterministic and readable by any
//! safetensors reader.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use safetensors::tensor::{Dtype, View};
use scfm_common::checkpoint::PartReader;
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::error::{Result, WorkerError};

// The values are copied between the tensors' memory and the files as raw bytes, which
// are the little-endian fp32 that safetensors stores only on a little-endian machine.
#[cfg(target_endian = "big")]
compile_error!("checkpoint streaming assumes a little-endian machine");

/// Values copied out of (or into) a tensor at a time: 1 MiB of fp32.
pub const BLOCK_ELEMS: i64 = 1 << 18;

/// One tensor of a part: `numel` values of the flat buffer `flat` from `offset`, of shape
/// `shape`.
pub struct Range {
    /// Its name in the part.
    pub name: String,
    /// The flat buffer (a shallow handle).
    pub flat: Tensor,
    /// Its first value in `flat`.
    pub offset: i64,
    /// Its number of values.
    pub numel: i64,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// A tensor's header entry only: `serialize` with these writes the header, no data.
struct HeaderOnly {
    shape: Vec<usize>,
    len: usize,
}

impl View for HeaderOnly {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An encoded part's bytes: small ones in memory, tensors in an anonymous spill file
/// (deleted when the last handle goes).
#[derive(Debug, Clone)]
pub enum Body {
    /// In memory.
    Memory(Bytes),
    /// In a spill file, from its start.
    Spill(Arc<File>),
}

/// A part of an encoded checkpoint: its bytes, size and SHA-256.
#[derive(Debug, Clone)]
pub struct Part {
    /// File name in the checkpoint directory.
    pub name: String,
    /// The bytes.
    pub body: Body,
    /// Their number.
    pub size: u64,
    /// Their hex SHA-256.
    pub sha256: String,
}

/// Reads a spill file from its start without moving a shared file offset.
struct SpillReader {
    file: Arc<File>,
    pos: u64,
}

impl Read for SpillReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Part {
    /// A part held in memory.
    pub fn memory(name: &str, bytes: Bytes) -> Part {
        Part {
            name: name.into(),
            size: bytes.len() as u64,
            sha256: scfm_common::storage::sha256_hex(&bytes),
            body: Body::Memory(bytes),
        }
    }

    /// Opens a reader of the bytes, from the start, as often as asked (an upload that is
    /// tried again reads them again).
    pub fn opener(
        &self,
    ) -> impl Fn() -> std::io::Result<Box<dyn Read + Send>> + Send + Sync + use<> {
        let body = self.body.clone();
        move || -> std::io::Result<Box<dyn Read + Send>> {
            Ok(match &body {
                Body::Memory(b) => Box::new(std::io::Cursor::new(b.clone())),
                Body::Spill(f) => Box::new(SpillReader {
                    file: f.clone(),
                    pos: 0,
                }),
            })
        }
    }
}

/// Writes `ranges` as a safetensors file named `name` into a spill file, in blocks of
/// [`BLOCK_ELEMS`] values (the tensors are never copied whole), hashing as it writes.
pub fn encode_part(
    name: &str,
    ranges: &[Range],
    metadata: Option<HashMap<String, String>>,
) -> Result<Part> {
    let spill_err = |e: std::io::Error| {
        WorkerError::Internal(format!(
            "cannot write the checkpoint's {name} to a spill file in {} (TMPDIR): {e}",
            std::env::temp_dir().display()
        ))
    };
    let header = safetensors::serialize(
        ranges.iter().map(|r| {
            (
                r.name.clone(),
                HeaderOnly {
                    shape: r.shape.clone(),
                    len: 4 * r.numel as usize,
                },
            )
        }),
        metadata,
    )
    .map_err(|e| WorkerError::Internal(format!("safetensors: {e}")))?;
    // The order `serialize` lays the data out in: by dtype (all F32 here), then by name.
    let mut order: Vec<&Range> = ranges.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let file = tempfile::tempfile().map_err(spill_err)?;
    // Blocks are written whole; the buffer only gathers the header's small writes.
    let mut w = BufWriter::with_capacity(
        64 << 10,
        Hashing {
            inner: file,
            hasher: Sha256::new(),
            size: 0,
        },
    );
    w.write_all(&header).map_err(spill_err)?;
    let mut bytes = vec![0u8; 4 * BLOCK_ELEMS as usize];
    tch::no_grad(|| -> Result<()> {
        for r in order {
            let mut done = 0;
            while done < r.numel {
                let n = BLOCK_ELEMS.min(r.numel - done);
                let block = r.flat.narrow(0, r.offset + done, n).to_device(Device::Cpu);
                block.f_copy_data_u8(&mut bytes[..4 * n as usize], n as usize)?;
                w.write_all(&bytes[..4 * n as usize]).map_err(spill_err)?;
                done += n;
            }
        }
        Ok(())
    })?;
    let h = w.into_inner().map_err(|e| spill_err(e.into_error()))?;
    Ok(Part {
        name: name.into(),
        body: Body::Spill(Arc::new(h.inner)),
        size: h.size,
        sha256: hex::encode(h.hasher.finalize()),
    })
}

/// Where the values of one tensor of a part go: `flat` from `offset`, with the shape the
/// model expects.
pub struct Target {
    /// The flat buffer (a shallow handle).
    pub flat: Tensor,
    /// The tensor's first value in it.
    pub offset: i64,
    /// The shape the model has.
    pub shape: Vec<usize>,
}

/// A tensor's bytes in the data section of a part.
struct Span {
    name: String,
    start: u64,
    end: u64,
}

/// The parsed header: its metadata and the tensors in data order, checked to tile the
/// data section and to hold every target with its shape.
fn parse_header(
    url: &str,
    json: &[u8],
    targets: &HashMap<String, Target>,
) -> Result<(HashMap<String, String>, Vec<Span>)> {
    let err = |message: String| WorkerError::Checkpoint {
        url: url.into(),
        message,
    };
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| err(format!("not valid safetensors: header: {e}")))?;
    let mut metadata = HashMap::new();
    let mut spans = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(info)
                .map_err(|e| err(format!("not valid safetensors: metadata: {e}")))?;
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap_or("?");
        if dtype != "F32" {
            return Err(err(format!("tensor `{name}` is {dtype}, expected F32")));
        }
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone())
            .map_err(|e| err(format!("tensor `{name}`: shape: {e}")))?;
        let (start, end): (u64, u64) = serde_json::from_value(info["data_offsets"].clone())
            .map_err(|e| err(format!("tensor `{name}`: data_offsets: {e}")))?;
        if end.checked_sub(start) != Some(4 * shape.iter().product::<usize>() as u64) {
            return Err(err(format!(
                "tensor `{name}`: data_offsets {start}..{end} do not fit its shape {shape:?}"
            )));
        }
        if let Some(t) = targets.get(&name)
            && t.shape != shape
        {
            return Err(WorkerError::Checkpoint {
                url: name,
                message: format!("shape {shape:?} but model has {:?}", t.shape),
            });
        }
        spans.push(Span { name, start, end });
    }
    spans.sort_by_key(|s| (s.start, s.end));
    let mut at = 0;
    for s in &spans {
        if s.start != at {
            return Err(err(format!(
                "not valid safetensors: tensor `{}` starts at {} instead of {at}",
                s.name, s.start
            )));
        }
        at = s.end;
    }
    let mut missing: Vec<&String> = targets
        .keys()
        .filter(|k| !spans.iter().any(|s| &s.name == *k))
        .collect();
    missing.sort();
    if let Some(first) = missing.first() {
        return Err(WorkerError::Checkpoint {
            url: (*first).clone(),
            message: format!(
                "missing from checkpoint {url} ({} tensor(s) missing)",
                missing.len()
            ),
        });
    }
    Ok((metadata, spans))
}

/// Reads a safetensors part once, in blocks, writing the values of each tensor in
/// `targets` into its range of the flat buffers as they arrive (tensors not in `targets`
/// are passed over); returns the part's metadata. The part's size and SHA-256 are checked
/// against `state.json` at its end: an error naming the part when they differ (the
/// targets then hold a mix and must not be used).
pub async fn read_part_into(
    part: &mut PartReader,
    targets: &HashMap<String, Target>,
) -> Result<HashMap<String, String>> {
    let url = part.url().to_string();
    let err = |message: &str| WorkerError::Checkpoint {
        url: url.clone(),
        message: message.into(),
    };
    // The header.
    let mut buf: Vec<u8> = Vec::new();
    let header_len = loop {
        if buf.len() >= 8 {
            let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            if n > 100 << 20 {
                return Err(err("not valid safetensors: header too large"));
            }
            if buf.len() as u64 >= 8 + n {
                break n as usize;
            }
        }
        match part.next().await? {
            Some(b) => buf.extend_from_slice(&b),
            None => return Err(err("not valid safetensors: shorter than its header")),
        }
    };
    let (metadata, spans) = parse_header(&url, &buf[8..8 + header_len], targets)?;
    // The data, in order.
    let mut feed = Feed {
        spans: &spans,
        targets,
        idx: 0,
        pos: 0,
        carry: Vec::new(),
        written: 0,
    };
    let rest = buf.split_off(8 + header_len);
    drop(buf);
    tch::no_grad(|| feed.push(&rest)).map_err(|m| err(&m))?;
    while let Some(b) = part.next().await? {
        tch::no_grad(|| feed.push(&b)).map_err(|m| err(&m))?;
    }
    if feed.pos != spans.last().map_or(0, |s| s.end) {
        return Err(err("not valid safetensors: its data ends early"));
    }
    Ok(metadata)
}

/// The state of a part's data section being read.
struct Feed<'a> {
    spans: &'a [Span],
    targets: &'a HashMap<String, Target>,
    /// The tensor being read.
    idx: usize,
    /// Bytes of the data section read.
    pos: u64,
    /// The bytes of a value split between two blocks.
    carry: Vec<u8>,
    /// Values of the current tensor written.
    written: i64,
}

impl Feed<'_> {
    /// Writes whole little-endian fp32 values into `t` after those already written.
    fn write(&mut self, t: &Target, raw: &[u8]) {
        let n = (raw.len() / 4) as i64;
        let src = Tensor::from_data_size(raw, &[n], tch::Kind::Float).to_device(t.flat.device());
        t.flat.narrow(0, t.offset + self.written, n).copy_(&src);
        self.written += n;
    }

    fn push(&mut self, mut bytes: &[u8]) -> std::result::Result<(), String> {
        while !bytes.is_empty() {
            while self.idx < self.spans.len() && self.pos == self.spans[self.idx].end {
                self.idx += 1;
                self.written = 0;
            }
            let Some(span) = self.spans.get(self.idx) else {
                return Err("not valid safetensors: longer than its header says".into());
            };
            let k = ((span.end - self.pos) as usize).min(bytes.len());
            if let Some(t) = self.targets.get(&span.name) {
                let mut chunk = &bytes[..k];
                if !self.carry.is_empty() {
                    let need = (4 - self.carry.len()).min(chunk.len());
                    self.carry.extend_from_slice(&chunk[..need]);
                    chunk = &chunk[need..];
                    if self.carry.len() == 4 {
                        let value = std::mem::take(&mut self.carry);
                        self.write(t, &value);
                    }
                }
                let whole = chunk.len() / 4 * 4;
                if whole > 0 {
                    self.write(t, &chunk[..whole]);
                }
                self.carry.extend_from_slice(&chunk[whole..]);
            }
            self.pos += k as u64;
            bytes = &bytes[k..];
        }
        Ok(())
    }
}
