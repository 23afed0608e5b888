fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let agent = root.join("xfer/v1/agent.proto");
    let runc = root.join("containerd/runc_options.proto");
    let chunks = root.join("xfer/v1/chunks.proto");
    let kb = root.join("xfer/v1/kb.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &[agent, chunks, kb, runc], &[root])?;
    Ok(())
}
