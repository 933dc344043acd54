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
