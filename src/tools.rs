//! The subcommands: [`serve`] (config → pools and listeners, and the built-in demo),
//! [`check`] (`check-config`), [`sidecar`] (the P/D hand-off beside a decode endpoint, behind
//! Envoy), [`sim`] (the vLLM simulator) and [`bench`] (the load generator); [`cli`] parses a
//! subcommand's flags from strings for in-process starts. The simulator borrows only the HTTP
//! accept loop (`front::listen`), the task owner (`gateway::tasks`) and the tokenizer loader
//! (`gateway::config::load_tokenizer`) of the gateway; the load generator only the task owner,
//! and the simulator's tokenizer (`tests/layers.rs` checks both).

pub mod bench;
pub mod check;
pub mod cli;
pub mod serve;
pub mod sidecar;
pub mod sim;
