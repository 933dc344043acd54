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
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}
