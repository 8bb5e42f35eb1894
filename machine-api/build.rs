//! Compiles the gRPC API with protox (a pure-Rust protobuf compiler), so no
//! system `protoc` is needed to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/machine.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("machine_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // osctl prints responses as JSON and YAML.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
