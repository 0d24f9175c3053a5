//! gRPC: the service implementations, wire conversions and the one error-to-status map.

pub mod convert;
pub mod service;
pub mod status;
