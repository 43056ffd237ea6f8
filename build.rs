//! Compiles the protobuf files of `proto/` with tonic-prost-build. Uses the
//! `protoc` named by `PROTOC` when set, else the vendored one, so that a
//! fresh machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let protos = [
        "proto/relayrate/v1/limiter.proto",
        "proto/relayrate/v1/raft.proto",
        "proto/relayrate/v1/admin.proto",
    ];
    // The descriptor set serves gRPC reflection (grpcurl needs no .proto).
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("relayrate.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
