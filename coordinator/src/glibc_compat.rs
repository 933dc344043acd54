//! `hypotf` defined in the `scfm` binary itself. glibc 2.35 gave `hypotf` a new symbol
//! version, so a build on a newer glibc (the dashed lines of `scfm report`, through
//! plotters) would need glibc 2.35 to start at all. The GPU bundle's binaries must start
//! on glibc 2.34 (`scripts/gpu-bundle.sh` checks the highest version they need), so the
//! linker resolves `hypotf` here instead. It computes in f64, where squares of f32 values
//! neither overflow nor lose bits, and rounds once, as glibc's own `hypotf` does.

/// `hypotf(x, y)` = sqrt(x² + y²) for f32, with glibc's handling of infinities and NaN
/// (an infinite argument gives +inf even when the other is NaN).
// SAFETY: no other item of this program defines `hypotf`; the definition has the C
// signature of libm's `float hypotf(float, float)`, which is what callers expect.
#[unsafe(no_mangle)]
pub extern "C" fn hypotf(x: f32, y: f32) -> f32 {
    if x.is_infinite() || y.is_infinite() {
        return f32::INFINITY;
    }
    let (x, y) = (x as f64, y as f64);
    (x * x + y * y).sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::hypotf;

    #[test]
    fn hypotf_matches_the_f64_result_and_glibc_special_cases() {
        assert_eq!(hypotf(3.0, 4.0), 5.0);
        assert_eq!(hypotf(-3.0, 4.0), 5.0);
        assert_eq!(hypotf(0.0, 0.0), 0.0);
        assert_eq!(hypotf(f32::MAX, f32::MAX), f32::INFINITY);
        assert_eq!(hypotf(f32::INFINITY, f32::NAN), f32::INFINITY);
        assert_eq!(hypotf(f32::NAN, f32::NEG_INFINITY), f32::INFINITY);
        assert!(hypotf(f32::NAN, 1.0).is_nan());
        for (x, y) in [
            (1.5f32, 2.25f32),
            (1e20, 3e19),
            (7e-3, 1e-2),
            (1e-30, 1e-30),
        ] {
            assert_eq!(hypotf(x, y), (x as f64).hypot(y as f64) as f32, "{x} {y}");
        }
    }
}
