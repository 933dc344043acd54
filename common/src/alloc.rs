//! Process-wide tuning of glibc's allocator for scfm's binaries and benchmarks.
//!
//! Readers and the loader allocate and free blocks of a few MB over and over (the column
//! indices and values of a 1,000-cell block are 8 MB each). glibc serves such blocks with
//! `mmap` until its adaptive threshold has grown past them, and returns freed heap tops
//! above its trim threshold to the kernel, so the same memory is faulted in and zeroed by
//! the kernel again and again (~10% of a sequential h5ad read). [`tune`] raises both
//! thresholds once at start-up; the price is up to [`TRIM_THRESHOLD`] bytes of freed heap
//! kept by the process.

/// Blocks below this size come from the heap instead of `mmap` (glibc's adaptive
/// threshold stops at the same 32 MiB).
pub const MMAP_THRESHOLD: i32 = 32 << 20;

/// Free memory at the top of the heap kept by the process rather than returned at once.
pub const TRIM_THRESHOLD: i32 = 64 << 20;

/// Sets glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` (no-op elsewhere). Call it once
/// at the start of `main`, before other threads allocate; a library never calls it.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        // glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        unsafe extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        // A failure (returns 0) leaves glibc's defaults, which are correct, only slower.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Returns the free memory inside glibc's heaps to the kernel (`malloc_trim(0)`; no-op
/// elsewhere) and says whether any went back.
///
/// A training step allocates and frees tensors of many sizes (they follow each batch's
/// longest cell), and with [`tune`]'s thresholds (which glibc's adaptive ones reach on
/// their own after the first large free) blocks of up to 32 MiB come from the heap. Freed
/// blocks in the middle of the heap are kept resident, and the holes between live blocks
/// grow with the steps: a 700-step CPU run of `minimal` at batch 64 held 4.5 GB of free
/// heap against 0.5 GB in use. The trainer calls this about once a minute; the pages a
/// step then touches again are faulted in once.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only walks glibc's own free lists and advises the kernel
        // about pages no allocation uses.
        unsafe { malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A memory figure of this process from `/proc/self/status` in KiB (`field` without its
/// colon: `VmRSS` the resident size, `VmHWM` its high-water mark), if the system says.
pub fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// This process's resident memory in bytes (`VmRSS`), if the system says.
pub fn resident_bytes() -> Option<u64> {
    proc_status_kib("VmRSS").map(|kib| kib << 10)
}

/// A fixed-size byte buffer in an anonymous memory mapping of its own, for the large
/// transfer buffers of checkpoint uploads and reads. Its pages go back to the kernel when
/// it is dropped, whichever thread drops it: a few MB buffers from glibc's heap stay
/// resident in the arena of the thread that freed them (above all with [`tune`]'s raised
/// thresholds), so a stream of them would leave tens of MB per thread behind.
pub struct PageBuf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: a PageBuf owns its mapping exclusively (like a Vec<u8>); nothing in it is tied
// to a thread.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only reads the bytes (`as_ref`); mutation needs `&mut self`.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    /// An empty buffer with room for `cap` bytes (its pages are mapped, and zeroed, as
    /// they are first written).
    pub fn with_capacity(cap: usize) -> std::io::Result<PageBuf> {
        if cap == 0 {
            return Ok(PageBuf {
                ptr: std::ptr::NonNull::dangling(),
                cap: 0,
                len: 0,
            });
        }
        // SAFETY: a fresh private anonymous mapping (no address hint, no file); the result
        // is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null mapping"))?;
        Ok(PageBuf { ptr, cap, len: 0 })
    }

    /// Reads from `r` until the buffer is full or `r` ends; returns the bytes added.
    pub fn fill_from(&mut self, r: &mut impl std::io::Read) -> std::io::Result<usize> {
        let start = self.len;
        while self.len < self.cap {
            // SAFETY: `len..cap` lies inside the mapping, which is readable and writable
            // and (anonymous) always initialised to zero, so a `&mut [u8]` over it is
            // valid; no other reference to those bytes exists while `&mut self` is held.
            let spare = unsafe {
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.len), self.cap - self.len)
            };
            match r.read(spare) {
                Ok(0) => break,
                Ok(n) => self.len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.len - start)
    }

    /// Copies as much of `bytes` as fits; returns how many were copied.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.cap - self.len);
        if n > 0 {
            // SAFETY: `len..len + n` lies inside the mapping (n <= cap - len), which is
            // writable; `bytes` cannot overlap it (the mapping is only reachable through
            // `&mut self`).
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr().add(self.len), n);
            }
            self.len += n;
        }
        n
    }

    /// Whether the buffer is full.
    pub fn is_full(&self) -> bool {
        self.len == self.cap
    }

    /// The bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for PageBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the mapping were written by `fill_from` (for an
        // empty buffer the pointer is dangling but aligned and the length zero).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if self.cap > 0 {
            // SAFETY: the mapping was made by `with_capacity` with exactly this address and
            // length, and no reference to it outlives `self`.
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.cap);
            }
        }
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::{PageBuf, proc_status_kib, resident_bytes};

    #[cfg(target_os = "linux")]
    #[test]
    fn memory_figures_come_from_proc_status() {
        let rss = proc_status_kib("VmRSS").expect("VmRSS");
        let hwm = proc_status_kib("VmHWM").expect("VmHWM");
        assert!(rss > 0 && hwm > 0, "{rss} {hwm}");
        assert!(resident_bytes().unwrap() >= 1 << 20);
        assert_eq!(proc_status_kib("VmNoSuchField"), None);
        assert_eq!(
            proc_status_kib("VmRS"),
            None,
            "a prefix of a field is not the field"
        );
    }

    #[test]
    fn a_page_buffer_fills_up_to_its_capacity_and_reads_back() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut r = std::io::Cursor::new(&data);
        let mut b = PageBuf::with_capacity(4096).unwrap();
        assert_eq!(b.fill_from(&mut r).unwrap(), 4096);
        assert_eq!(b.as_ref(), &data[..4096]);
        assert_eq!(b.fill_from(&mut r).unwrap(), 0, "full");
        let mut rest = PageBuf::with_capacity(8192).unwrap();
        assert_eq!(rest.fill_from(&mut r).unwrap(), 10_000 - 4096);
        assert_eq!(rest.as_ref(), &data[4096..]);
        let empty = PageBuf::with_capacity(0).unwrap();
        assert!(empty.is_empty() && empty.as_ref().is_empty() && empty.is_full());
        let mut p = PageBuf::with_capacity(5).unwrap();
        assert_eq!(p.push(b"abc"), 3);
        assert_eq!(p.push(b"defg"), 2);
        assert!(p.is_full());
        assert_eq!(p.push(b"h"), 0);
        assert_eq!(p.as_ref(), b"abcde");
    }
}
