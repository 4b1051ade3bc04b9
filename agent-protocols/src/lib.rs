//! What Warden understands of the bytes it relays, apart from the agent so
//! that it builds (and is fuzzed) without the kernel programs, the audit's
//! SQL engine or any socket:
//! - [`protocols`]: decoders that turn a protocol's bytes into typed messages,
//!   and encoders for the messages the agent writes itself;
//! - [`masking`]: detectors of sensitive values and the masks put over them.
pub mod masking;
pub mod protocols;
