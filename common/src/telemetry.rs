//! Logging setup shared by the `scfm` and `scfm-worker` binaries: `tracing` to stderr,
//! level from `RUST_LOG` (default `info`), text (colours only on a terminal) or JSON.

use std::io::IsTerminal;

/// Installs the global subscriber; `format` is `"text"` or `"json"`.
pub fn init_logging(format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // A failed write (stderr is a closed pipe: the reader died) is dropped; reporting
        // it would `eprintln!`, which panics on that pipe, in whatever task was logging
        // (a signal handler, the coordinator's service), and the process would not stop.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// CPU time of the calling thread in seconds (`CLOCK_THREAD_CPUTIME_ID`; wall time since
/// the first call where that clock is not known): the per-core cost that benchmarks and
/// timings report, which a busy machine disturbs less than wall time.
#[cfg(target_os = "linux")]
pub fn thread_cpu_s() -> f64 {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec (64-bit `time_t` and `long` on the 64-bit
    // Linux targets scfm builds for).
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Wall time since the first call (no per-thread CPU clock known here).
#[cfg(not(target_os = "linux"))]
pub fn thread_cpu_s() -> f64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}
