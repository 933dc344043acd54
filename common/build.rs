fn main() -> Result<(), Box<dyn std::error::Error>> {
    // hdf5-metno-sys (links = "hdf5") publishes the HDF5 version it found as
    // `version_X_Y_Z` metadata; HDF5 2.x replaced `H5Dread_chunk` (data/h5ad/chunks.rs).
    println!("cargo::rustc-check-cfg=cfg(hdf5_2)");
    if std::env::var_os("DEP_HDF5_VERSION_2_0_0").is_some() {
        println!("cargo::rustc-cfg=hdf5_2");
    }
    println!("cargo:rerun-if-changed=proto/scfm/v1/coordinator.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/scfm/v1/coordinator.proto"], &["proto"])?;
    Ok(())
}
