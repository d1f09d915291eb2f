//! Generates the tonic client and server code from `proto/hindsight.proto` with the vendored
//! protoc, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/hindsight.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Weight chunks are slices of the learner's payload and of the receive buffer
        // (`bytes::Bytes`), not copies.
        .bytes(".hindsight.v1.WeightChunk.data")
        .compile_protos(&["proto/hindsight.proto"], &["proto"])?;
    Ok(())
}
