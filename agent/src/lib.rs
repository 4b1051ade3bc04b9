//! Warden's agent, as a library: `warden run` and `warden daemon` are two
//! entry points onto the same [`agent::Agent`].
//!
//! The modules follow a connection from the kernel to the audit row:
//! - [`cgroup`]: find cgroup v2, make and remove the cgroups of managed workloads;
//! - [`capture`]: load the eBPF programs, attach them to cgroups, read their records;
//! - [`netns`]: listen and connect in each network namespace managed processes are in;
//! - [`identity`]: turn a kernel record into a process, user, unit or container;
//! - [`proxy`]: accept redirected connections, detect the protocol, relay;
//! - [`tls`]: the agent's CA and its TLS towards servers, for interception;
//! - [`protocols`]: decoders that turn a protocol's bytes into typed messages
//!   (crate `warden-protocols`, with [`masking`]);
//! - [`policy`]: decide per connection and per request;
//! - [`lineage`]: link statements to the LLM answers that proposed them;
//! - [`approvals`]: hold requests until OIDC-authenticated reviewers decide;
//! - [`audit`]: write every connection and decision to Parquet;
//! - [`budget`]: count each workload's LLM tokens per day, for `budgets:`;
//! - [`metrics`]: count them for Prometheus, on a loopback port;
//! - [`agent`]: wire the stages together;
//! - [`run`]: `warden run`, one program in a fresh cgroup.
pub mod agent;
pub mod approvals;
pub mod audit;
pub mod budget;
pub mod capture;
pub mod cgroup;
pub mod daemon;
pub mod identity;
pub mod kubernetes;
pub mod lineage;
pub mod loopback;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod preflight;
pub mod proxy;
pub mod run;
pub mod tls;

// The decoders and masking live in their own crate; these names keep their
// paths inside the agent.
pub use warden_protocols::{masking, protocols};
