//! With the `cuda` feature, keep libtorch_cuda linked: nothing in the binary references its
//! symbols, so `--as-needed` would drop it and `tch::Cuda::is_available()` would stay false.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
