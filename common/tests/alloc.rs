//! Freed heap blocks go back to the kernel on `alloc::release_free_heap`. A test binary of
//! its own, so that no other test's allocations move this process's resident size.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn released_heap_holes_leave_the_resident_set() {
    use scfm_common::alloc::{release_free_heap, resident_bytes, tune};
    // As the binaries do: 1 MiB blocks then come from the heap, not from mmap.
    tune();
    const BLOCK: usize = 1 << 20;
    let fill = |i: usize| (i as u8) | 1;
    let mut blocks: Vec<Option<Vec<u8>>> = (0..256).map(|i| Some(vec![fill(i); BLOCK])).collect();
    let full = resident_bytes().expect("/proc/self/statm");
    // Every other block freed: 128 MiB of holes between live blocks, which free() keeps.
    for b in blocks.iter_mut().step_by(2) {
        *b = None;
    }
    let holes = resident_bytes().unwrap();
    assert!(
        holes + (32 << 20) > full,
        "free() alone returned the holes ({full} -> {holes} bytes): the test shows nothing"
    );
    assert!(release_free_heap(), "malloc_trim returned nothing");
    let released = resident_bytes().unwrap();
    assert!(
        released + (100 << 20) < holes,
        "resident {holes} -> {released} bytes: the 128 MiB of holes stayed"
    );
    for (i, b) in blocks.iter().enumerate() {
        if let Some(b) = b {
            assert!(b.iter().all(|&x| x == fill(i)), "live block {i} changed");
        }
    }
}
