//! slotd: a gRPC daemon that leases scarce LLM-provider capacity to many agent processes.

pub mod scheduler;
