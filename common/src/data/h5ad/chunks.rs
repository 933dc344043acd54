//! Fast reading of compressed 1-D datasets (a CSR matrix's `indices` and `data`): the
//! stored chunks are fetched as they are in the file (`H5Dread_chunk`) and decoded here
//! with libdeflate, byte unshuffling and an LZF decoder (`chunks_codec.rs`), on two
//! threads, keeping a few decoded chunks for random access. libhdf5 inflates with zlib on
//! the calling thread only, which bounds reading anndata's gzip files at 11–18k cells/s
//! (2k values per cell) here; this path uses ~1.7× less CPU per cell and, with two idle
//! cores, reads ~3× faster (`cargo bench -p scfm-common --bench reader`).
//!
//! The path applies to chunked little-endian numeric datasets whose filter pipeline is made
//! of deflate, shuffle and LZF only; anything else (contiguous or unfiltered datasets,
//! other filters, unallocated chunks) is read by libhdf5 as before. Setting the environment
//! variable `SCFM_H5AD_RAW_CHUNKS=0` turns the path off.

use std::collections::VecDeque;
use std::ffi::{c_int, c_uint, c_void};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use hdf5::Dataset;
use hdf5::datatype::ByteOrder;
use hdf5::filters::Filter;
use libdeflater::{DecompressionError, Decompressor};

use super::typed::{At, E, R, bad, display_name};

#[path = "chunks_codec.rs"]
mod codec;
#[cfg(test)]
#[path = "chunks_tests.rs"]
mod tests;

pub use self::codec::lzf_decompress;
use self::codec::{Kind, to_f32, to_u32, unshuffle};

// libhdf5 (≥ 1.10.3) functions that hdf5-metno does not wrap; libhdf5 is linked through
// hdf5-metno-sys. `hid_t` is `int64_t`, `hsize_t` `uint64_t`, `herr_t` `int`.
// (`H5Dget_chunk_info_by_coord` would tell an unallocated chunk apart, but 1.10 walks the
// whole chunk index for it: ~40% of the reading time of a 8k-chunk dataset.)
// HDF5 2.x made `H5Dread_chunk` a macro over `H5Dread_chunk2` (which also takes the
// buffer's size); `build.rs` sets `hdf5_2` from the version hdf5-metno-sys found.
unsafe extern "C" {
    fn H5Dget_chunk_storage_size(dset_id: i64, offset: *const u64, chunk_bytes: *mut u64) -> c_int;
    #[cfg(not(hdf5_2))]
    fn H5Dread_chunk(
        dset_id: i64,
        dxpl_id: i64,
        offset: *const u64,
        filters: *mut u32,
        buf: *mut c_void,
    ) -> c_int;
    #[cfg(hdf5_2)]
    fn H5Dread_chunk2(
        dset_id: i64,
        dxpl_id: i64,
        offset: *const u64,
        filters: *mut u32,
        buf: *mut c_void,
        buf_size: *mut usize,
    ) -> c_int;
    fn H5Pget_chunk_opts(plist_id: i64, opts: *mut c_uint) -> c_int;
}

/// Reads the stored bytes of the chunk at `offset` of dataset `ds` into `buf` (which holds
/// the chunk's stored size) and its filter mask into `mask`: `H5Dread_chunk` of HDF5 1.10
/// to 1.14, `H5Dread_chunk2` of HDF5 2.x.
fn read_chunk_raw(ds: i64, offset: &[u64], mask: &mut u32, buf: &mut [u8]) -> c_int {
    #[cfg(not(hdf5_2))]
    // SAFETY: `buf` holds the chunk's stored size, which is what H5Dread_chunk writes.
    let r = unsafe {
        H5Dread_chunk(
            ds,
            H5P_DEFAULT,
            offset.as_ptr(),
            mask,
            buf.as_mut_ptr().cast(),
        )
    };
    #[cfg(hdf5_2)]
    let r = {
        let mut size = buf.len();
        // SAFETY: `buf` holds `size` bytes; H5Dread_chunk2 writes at most that many.
        unsafe {
            H5Dread_chunk2(
                ds,
                H5P_DEFAULT,
                offset.as_ptr(),
                mask,
                buf.as_mut_ptr().cast(),
                &mut size,
            )
        }
    };
    r
}

#[cfg(test)]
/// Whether this build calls HDF5 2.x's `H5Dread_chunk2` (else 1.x's `H5Dread_chunk`).
pub(crate) const HDF5_2: bool = cfg!(hdf5_2);

/// `H5P_DEFAULT`.
const H5P_DEFAULT: i64 = 0;

/// Threads that decode the chunks of one read by default (the caller's and one more).
pub(crate) const THREADS: usize = 2;

/// Reads that decode fewer bytes than this run on the calling thread alone: starting a
/// thread would cost more than it saves (much more on a busy machine). Small in tests so
/// that their small files take both ways.
const PARALLEL_BYTES: usize = if cfg!(test) { 16 << 10 } else { 1 << 20 };

/// Elements read at a time by a long read (small in tests, to cover batch boundaries).
const BATCH: usize = if cfg!(test) { 3000 } else { 1 << 23 };

/// Decoded chunks kept per dataset for reads that start or end in the same chunk (random
/// rows, consecutive blocks), at most this many bytes in all.
const CACHE_BYTES: usize = 32 << 20;
const CACHE_CHUNKS: usize = 8;

/// One step of a filter pipeline this module undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Deflate,
    Shuffle,
    Lzf,
}

/// A chunked 1-D dataset read chunk by chunk.
struct Chunked {
    ds: Dataset,
    /// Name for messages, e.g. `` `X/data` ``.
    name: String,
    /// Number of elements.
    len: usize,
    /// Elements per chunk.
    chunk_len: usize,
    kind: Kind,
    /// The filter pipeline in the order it was applied when writing.
    stages: Vec<Stage>,
    cache: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
}

impl Chunked {
    /// `ds` read by chunks, or `None` when the fast path does not apply to it.
    fn probe(ds: &Dataset, want_int: bool) -> Option<Chunked> {
        if ds.ndim() != 1 || !ds.is_chunked() {
            return None;
        }
        let chunk_len = match ds.chunk()?[..] {
            [n] if n > 0 => n,
            _ => return None,
        };
        let dtype = ds.dtype().ok()?;
        let kind = Kind::of(&dtype.to_descriptor().ok()?)?;
        if (want_int && !kind.is_int())
            || !(dtype.byte_order() == ByteOrder::LittleEndian || kind.size() == 1)
        {
            return None;
        }
        let stages = ds
            .filters()
            .into_iter()
            .map(|f| match f {
                Filter::Deflate(_) => Some(Stage::Deflate),
                Filter::Shuffle => Some(Stage::Shuffle),
                Filter::LZF => Some(Stage::Lzf),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        if stages.is_empty() || stages.len() > 32 {
            return None;
        }
        // Partial edge chunks may be stored unfiltered (`H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS`).
        let dcpl = ds.dcpl().ok()?;
        let mut opts: c_uint = 0;
        // SAFETY: `dcpl` is an open dataset creation property list; `opts` outlives the call.
        let r = hdf5::sync::sync(|| unsafe { H5Pget_chunk_opts(dcpl.id(), &mut opts) });
        if r < 0 || opts != 0 {
            return None;
        }
        Some(Chunked {
            ds: ds.clone(),
            name: format!("`{}`", display_name(ds)),
            len: ds.size(),
            chunk_len,
            kind,
            stages,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// Bytes of a decoded chunk.
    fn chunk_bytes(&self) -> usize {
        self.chunk_len * self.kind.size()
    }

    /// The stored bytes and filter mask of chunk `k`, or `None` if libhdf5 cannot tell its
    /// stored size (an unallocated chunk: libhdf5 reads it as the fill value). Must run
    /// under hdf5-metno's library lock ([`hdf5::sync::sync`]).
    fn fetch(&self, k: usize) -> R<Option<(Vec<u8>, u32)>> {
        let offset = [(k * self.chunk_len) as u64];
        let mut size = 0u64;
        // SAFETY: the dataset is open and 1-D, so `offset` has its rank's one entry; `size`
        // outlives the call.
        let r = unsafe { H5Dget_chunk_storage_size(self.ds.id(), offset.as_ptr(), &mut size) };
        if r < 0 || size == 0 {
            // libhdf5 1.10 fails here for an unallocated chunk; the caller lets libhdf5 read
            // the range, which gives the fill value or reports a real error.
            return Ok(None);
        }
        let mut buf = vec![0u8; size as usize];
        let mut mask = 0u32;
        let r = read_chunk_raw(self.ds.id(), &offset, &mut mask, &mut buf);
        hdf5::h5check(r).at(&self.name)?;
        Ok(Some((buf, mask)))
    }

    /// Undoes the filters not skipped in `mask` on the stored bytes `raw` of chunk `k`;
    /// returns where the decoded chunk is: `s.bufs[i]` for `Some(i)`, `raw` for `None`
    /// (no filter applied).
    fn decode(&self, k: usize, raw: &[u8], mask: u32, s: &mut Scratch) -> R<Option<usize>> {
        let n = self.chunk_bytes();
        let corrupt = |what: &str| {
            bad(format!(
                "cannot decode chunk {k} of {} ({what}); the file may be damaged",
                self.name
            ))
        };
        let Scratch { z, bufs: [b0, b1] } = s;
        // Where the bytes are now: `raw` (None), `b0` (Some(false)) or `b1` (Some(true)).
        let mut cur: Option<bool> = None;
        for (i, stage) in self.stages.iter().enumerate().rev() {
            if mask & (1 << i) != 0 {
                continue;
            }
            let (src, dst): (&[u8], &mut Vec<u8>) = match cur {
                None => (raw, b0),
                Some(false) => (b0, b1),
                Some(true) => (b1, b0),
            };
            cur = Some(cur == Some(false));
            match stage {
                Stage::Deflate => {
                    dst.resize(n, 0);
                    match z.zlib_decompress(src, dst) {
                        Ok(m) if m == n => {}
                        Ok(m) => return corrupt(&format!("deflate gave {m} bytes, expected {n}")),
                        Err(DecompressionError::BadData) => return corrupt("invalid deflate data"),
                        Err(DecompressionError::InsufficientSpace) => {
                            return corrupt(&format!("deflate gave more than {n} bytes"));
                        }
                    }
                }
                Stage::Lzf => {
                    if !lzf_decompress(src, n, dst) {
                        return corrupt("invalid LZF data");
                    }
                }
                Stage::Shuffle => unshuffle(src, self.kind.size(), dst),
            }
        }
        let (out, at): (&[u8], _) = match cur {
            None => (raw, None),
            Some(false) => (b0, Some(0)),
            Some(true) => (b1, Some(1)),
        };
        if out.len() != n {
            return corrupt(&format!("{} bytes, expected {n}", out.len()));
        }
        Ok(at)
    }
}

/// What a decoding thread reuses from chunk to chunk.
struct Scratch {
    z: Decompressor,
    /// The stages of a filter pipeline write into these in turn.
    bufs: [Vec<u8>; 2],
}

/// Scratch space returned by finished reads, so the next ones neither allocate (and fault
/// in) fresh buffers nor set up a decompressor again.
static SCRATCH_POOL: Mutex<Vec<Scratch>> = Mutex::new(Vec::new());

impl Scratch {
    /// Scratch space from the pool, or new.
    fn take() -> Scratch {
        let pooled = SCRATCH_POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.unwrap_or_else(|| Scratch {
            z: Decompressor::new(),
            bufs: [Vec::new(), Vec::new()],
        })
    }

    /// Returns this to the pool (which keeps a few, each buffer at most 4 MiB).
    fn give_back(self) {
        if self.bufs.iter().any(|b| b.capacity() > 4 << 20) {
            return;
        }
        let mut pool = SCRATCH_POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 2 * THREADS {
            pool.push(self);
        }
    }
}

/// Raw-chunk readers of a CSR matrix's `indices` and `data`, each `None` where libhdf5
/// reads it instead.
pub(crate) struct RawCsr {
    // Boxed: `H5adRows` stays small.
    indices: Option<Box<Chunked>>,
    data: Option<Box<Chunked>>,
    /// Threads that decode the chunks of one read (the caller's included).
    threads: usize,
}

/// Column indices and values read by [`RawCsr::read`] (`None`: not read here).
pub(crate) type Columns = (Option<Vec<u32>>, Option<Vec<f32>>);

impl RawCsr {
    /// Readers for the datasets the fast path applies to (none with `SCFM_H5AD_RAW_CHUNKS=0`).
    pub fn open(indices: &Dataset, data: &Dataset) -> RawCsr {
        if std::env::var("SCFM_H5AD_RAW_CHUNKS").is_ok_and(|v| v == "0") {
            return RawCsr::none();
        }
        RawCsr {
            indices: Chunked::probe(indices, true).map(Box::new),
            data: Chunked::probe(data, false).map(Box::new),
            threads: THREADS,
        }
    }

    /// No fast path: everything is read by libhdf5.
    pub fn none() -> RawCsr {
        RawCsr {
            indices: None,
            data: None,
            threads: THREADS,
        }
    }

    /// Sets the threads that decode the chunks of one read (at least 1: the caller's).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Whether `indices` and `data` are read by chunks.
    #[cfg(test)]
    pub fn active(&self) -> (bool, bool) {
        (self.indices.is_some(), self.data.is_some())
    }

    /// Elements `lo..hi` of `indices` (as `u32`, checked to be below `cols`) and of `data`
    /// (as `f32`); `None` for a dataset this path does not read (the caller reads it
    /// through libhdf5).
    pub fn read(&self, lo: usize, hi: usize, cols: usize) -> R<Columns> {
        for c in [&self.indices, &self.data].into_iter().flatten() {
            if lo > hi || hi > c.len {
                return bad(format!(
                    "cannot read elements {lo}..{hi} of {} ({} values)",
                    c.name, c.len
                ));
            }
        }
        let n = hi - lo;
        // Not zeroed first: the slots of the jobs cover `0..n` exactly, and each job that
        // succeeds writes all of its slot.
        let mut indices = self.indices.as_ref().map(|_| Vec::<u32>::with_capacity(n));
        let mut data = self.data.as_ref().map(|_| Vec::<f32>::with_capacity(n));
        let (mut ok_i, mut ok_d) = (indices.is_some(), data.is_some());
        // In batches, so that few stored chunks are in memory at once in long reads.
        for a in (lo..hi).step_by(BATCH) {
            let b = (a + BATCH).min(hi);
            let mut groups = Vec::new();
            if let (true, Some(c), Some(v)) = (ok_i, &self.indices, indices.as_mut()) {
                let out = Out::U32(&mut v.spare_capacity_mut()[a - lo..b - lo], cols as u64);
                groups.push(slots(c, a, b, out));
            }
            if let (true, Some(c), Some(v)) = (ok_d, &self.data, data.as_mut()) {
                let out = Out::F32(&mut v.spare_capacity_mut()[a - lo..b - lo]);
                groups.push(slots(c, a, b, out));
            }
            let mut complete = read_chunks(groups, self.threads)?.into_iter();
            // One entry per group, in the order above.
            ok_i = ok_i && complete.next() == Some(true);
            ok_d = ok_d && complete.next() == Some(true);
        }
        if let (true, Some(v)) = (ok_i, indices.as_mut()) {
            // SAFETY: the dataset's group was complete in every batch and `read_chunks`
            // succeeded, so every job ran and wrote its slot; the batches' slots cover
            // `0..n` (see `slots`), which is within the capacity.
            unsafe { v.set_len(n) };
        }
        if let (true, Some(v)) = (ok_d, data.as_mut()) {
            // SAFETY: as for `indices`.
            unsafe { v.set_len(n) };
        }
        Ok((indices.filter(|_| ok_i), data.filter(|_| ok_d)))
    }
}

/// Where a chunk's values go: column indices (checked to be below the number of columns)
/// or values.
enum Out<'o> {
    U32(&'o mut [MaybeUninit<u32>], u64),
    F32(&'o mut [MaybeUninit<f32>]),
}

impl Out<'_> {
    fn len(&self) -> usize {
        match self {
            Out::U32(o, _) => o.len(),
            Out::F32(o) => o.len(),
        }
    }
}

/// One chunk of a read: where its wanted elements go.
struct Slot<'a, 'o> {
    c: &'a Chunked,
    k: usize,
    /// Index of the first wanted element within the chunk.
    skip: usize,
    out: Out<'o>,
    /// Whether to keep the decoded chunk in the cache (first and last chunk of a read).
    keep: bool,
}

/// The chunks of `c` holding elements `lo..hi`, with `out` split among them.
fn slots<'a, 'o>(c: &'a Chunked, lo: usize, hi: usize, out: Out<'o>) -> Vec<Slot<'a, 'o>> {
    let cl = c.chunk_len;
    if lo == hi {
        return Vec::new();
    }
    let (k0, k1) = (lo / cl, (hi - 1) / cl);
    let mut rest = Some(out);
    (k0..=k1)
        .map(|k| {
            let (a, b) = (lo.max(k * cl), hi.min((k + 1) * cl));
            let (head, tail) = match rest.take().expect("one output per chunk") {
                Out::U32(o, cols) => {
                    let (h, t) = o.split_at_mut(b - a);
                    (Out::U32(h, cols), Out::U32(t, cols))
                }
                Out::F32(o) => {
                    let (h, t) = o.split_at_mut(b - a);
                    (Out::F32(h), Out::F32(t))
                }
            };
            rest = Some(tail);
            Slot {
                c,
                k,
                skip: a - k * cl,
                out: head,
                keep: k == k0 || k == k1,
            }
        })
        .collect()
}

/// What is at hand for one chunk.
enum Have {
    /// Decoded bytes from the cache.
    Decoded(Arc<Vec<u8>>),
    /// Stored bytes and filter mask.
    Stored(Vec<u8>, u32),
}

/// A chunk to decode (unless cached) and convert into its slot.
struct Job<'a, 'o> {
    slot: Slot<'a, 'o>,
    have: Have,
}

/// Numbered jobs, passed from the fetching thread to the decoding ones.
type Queue<'a, 'o> = Mutex<mpsc::Receiver<(usize, Job<'a, 'o>)>>;

/// A decoded chunk to put in its dataset's cache.
type Kept<'a> = (&'a Chunked, usize, Arc<Vec<u8>>);

/// Fills the slots of each group (the chunks of one dataset); returns for each group
/// whether all its chunks were allocated (if not, its output is incomplete).
///
/// The calling thread fetches the stored chunks under hdf5-metno's library lock while a
/// helper thread decodes them; then both decode what is left, taking jobs in turn (so a
/// helper that starts late on a busy machine delays nothing). Small reads run on the
/// calling thread alone. Chunks that start or end the read are cached.
fn read_chunks(groups: Vec<Vec<Slot>>, threads: usize) -> R<Vec<bool>> {
    let to_decode: usize = groups.iter().flatten().map(|s| s.c.chunk_bytes()).sum();
    let (tx, rx) = mpsc::channel();
    let queue = Mutex::new(rx);
    let failed = AtomicBool::new(false);
    let work = || run_queue(&queue, &failed);
    let (fetched, parts) = if threads < 2 || to_decode < PARALLEL_BYTES {
        let fetched = fetch_all(groups, tx, &failed);
        (fetched, vec![work()])
    } else {
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
            let fetched = fetch_all(groups, tx, &failed);
            let mut parts = vec![work()];
            for h in helpers {
                parts.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            (fetched, parts)
        })
    };
    let complete = fetched?;
    let mut kept = Vec::new();
    let mut first_err: Option<(usize, E)> = None;
    for (k, err) in parts {
        kept.extend(k);
        if let Some((i, e)) = err
            && first_err.as_ref().is_none_or(|f| i < f.0)
        {
            first_err = Some((i, e));
        }
    }
    if let Some((_, e)) = first_err {
        return Err(e);
    }
    for (c, k, bytes) in kept {
        let mut cache = c.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.iter().any(|e| e.0 == k) {
            continue;
        }
        let limit = (CACHE_BYTES / c.chunk_bytes().max(1)).clamp(2, CACHE_CHUNKS);
        while cache.len() >= limit {
            cache.pop_front();
        }
        cache.push_back((k, bytes));
    }
    Ok(complete)
}

/// Sends a job for each slot to `tx`, with the chunk from the cache or the file; a group
/// stops at its first unallocated chunk. Stops early when decoding has failed; on an
/// error, sets `failed` so that decoding stops too.
fn fetch_all<'a, 'o>(
    groups: Vec<Vec<Slot<'a, 'o>>>,
    tx: mpsc::Sender<(usize, Job<'a, 'o>)>,
    failed: &AtomicBool,
) -> R<Vec<bool>> {
    let mut complete = vec![true; groups.len()];
    let r = hdf5::sync::sync(|| -> R<()> {
        let mut i = 0;
        for (g, group) in groups.into_iter().enumerate() {
            for slot in group {
                if failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let c = slot.c;
                let hit = {
                    let cache = c.cache.lock().unwrap_or_else(|e| e.into_inner());
                    cache.iter().find(|e| e.0 == slot.k).map(|e| e.1.clone())
                };
                let have = match hit {
                    Some(bytes) => Have::Decoded(bytes),
                    None => match c.fetch(slot.k)? {
                        Some((raw, mask)) => Have::Stored(raw, mask),
                        None => {
                            complete[g] = false;
                            break;
                        }
                    },
                };
                // The receiver lives until all decoding threads are done.
                let _ = tx.send((i, Job { slot, have }));
                i += 1;
            }
        }
        Ok(())
    });
    if r.is_err() {
        failed.store(true, Ordering::Relaxed);
    }
    r.map(|()| complete)
}

/// Runs jobs from `queue` until it is closed and empty, or a job fails (here or on another
/// thread); returns the chunks to cache and the failure with its job number.
fn run_queue<'a>(
    queue: &Queue<'a, '_>,
    failed: &AtomicBool,
) -> (Vec<Kept<'a>>, Option<(usize, E)>) {
    let mut s = Scratch::take();
    let mut kept = Vec::new();
    while !failed.load(Ordering::Relaxed) {
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((i, j)) = next else { break };
        match run_job(j, &mut s) {
            Ok(Some(k)) => kept.push(k),
            Ok(None) => {}
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                return (kept, Some((i, e)));
            }
        }
    }
    s.give_back();
    (kept, None)
}

/// Decodes (unless cached) and converts one chunk; returns it if it is to be cached.
fn run_job<'a>(j: Job<'a, '_>, s: &mut Scratch) -> R<Option<Kept<'a>>> {
    let Slot {
        c,
        k,
        skip,
        out,
        keep,
    } = j.slot;
    let size = c.kind.size();
    let convert = |decoded: &[u8], out: Out| {
        let bytes = &decoded[skip * size..(skip + out.len()) * size];
        match out {
            Out::U32(o, cols) => to_u32(&c.name, c.kind, cols, bytes, o),
            Out::F32(o) => {
                to_f32(c.kind, bytes, o);
                Ok(())
            }
        }
    };
    let decoded = match j.have {
        Have::Decoded(bytes) => {
            convert(&bytes, out)?;
            bytes
        }
        Have::Stored(raw, mask) => {
            let at = c.decode(k, &raw, mask, s)?;
            convert(at.map_or(&raw, |i| &s.bufs[i]), out)?;
            if !keep {
                return Ok(None);
            }
            // The buffer goes to the cache; the next chunk gets a new one.
            Arc::new(at.map_or(raw, |i| std::mem::take(&mut s.bufs[i])))
        }
    };
    Ok(keep.then_some((c, k, decoded)))
}
