fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/scfm/v1/coordinator.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/scfm/v1/coordinator.proto"], &["proto"])?;
    Ok(())
}
