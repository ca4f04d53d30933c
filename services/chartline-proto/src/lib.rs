//! Generated code for the `chartline.v1` gRPC contracts. Nothing hand-written lives here.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `chartline.v1`: the versioned contract every Chartline service speaks.
pub mod v1 {
    tonic::include_proto!("chartline.v1");
}

/// The encoded `FileDescriptorSet` of every chartline proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("chartline_descriptor");
