//! Protocol decoders: each turns a byte stream into typed messages and back,
//! knowing nothing of policy or sockets.
pub mod llm;
pub mod postgres;
