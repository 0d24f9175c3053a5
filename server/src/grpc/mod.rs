//! gRPC: the service implementations, wire conversions and the one error-to-status map.

pub mod admin;
pub mod auth;
pub mod convert;
pub mod limits;
pub mod service;
pub mod session;
pub mod status;
