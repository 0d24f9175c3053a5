//! Wire types for slotd, generated from `proto/slotd/v1/slotd.proto`, plus the descriptor set for reflection.
//!
//! This crate holds no logic: the daemon lives in `slotd`, the client in `slotd-client`. Besides the
//! wire types it holds the small vocabulary both share ([`report`]).

/// `slotd.v1`: the agent-facing API (the `Acquire` stream, `ReportRateLimit`, `Status`).
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("slotd.v1");
}

/// The encoded `FileDescriptorSet` of every proto file (including well-known types), for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/slotd_descriptor.bin"));

pub use prost_types;

pub mod report;

/// The metadata key a client sets to keep its leases across a reconnect, e.g. `slotd-resume-grace: 5s`
/// on the `Acquire` stream (the daemon caps it at its `max_resume_grace`).
pub const RESUME_GRACE_HEADER: &str = "slotd-resume-grace";

/// The metadata key naming the leader's address (`http://host:port`) on a standby's UNAVAILABLE, when
/// slotd runs with high availability (`[ha]`): clients reconnect there.
pub const LEADER_HEADER: &str = "slotd-leader";

/// Response metadata of `Status` with high availability: this member's role (`leader`).
pub const ROLE_HEADER: &str = "slotd-role";

/// Response metadata of `Status` with high availability: the leader's epoch (its etcd leader key's
/// create revision; the high bits of its fencing tokens).
pub const EPOCH_HEADER: &str = "slotd-epoch";

/// The metadata key of the bearer token, sent as `authorization: Bearer <token>` when the daemon
/// requires one (each service checks its own token).
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// The protobuf codec of every slotd service and client: prost, with small per-stream buffers.
///
/// tonic's default codec reserves 8 KiB to encode and 8 KiB to decode on every stream. slotd's messages
/// are a few hundred bytes and a daemon holds one long-lived stream per agent process, so that reserve
/// was most of the memory of an idle session. 256-byte buffers hold every stream message slotd sends or
/// receives (the largest, a full request, is about 200 bytes) and grow on demand for a larger one,
/// such as a big `Status` response.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// Initial encode/decode buffer per stream, in bytes.
    pub const BUFFER_SIZE: usize = 256;
    /// Encoded bytes after which a busy stream yields to let others run (tonic's default).
    pub const YIELD_THRESHOLD: usize = 32 * 1024;

    /// [`tonic_prost::ProstCodec`] with [`BUFFER_SIZE`] buffers.
    #[derive(Debug)]
    pub struct SlotdCodec<T, U>(PhantomData<fn() -> (T, U)>);

    impl<T, U> Default for SlotdCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Clone for SlotdCodec<T, U> {
        fn clone(&self) -> Self {
            Self::default()
        }
    }

    impl<T, U> Codec for SlotdCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
        }
    }
}
