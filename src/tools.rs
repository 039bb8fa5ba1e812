//! The subcommands beyond the gateway's own front-ends: [`serve`] (config → pools and
//! listeners, and the built-in demo), [`sim`] (the vLLM simulator) and [`bench`] (the load
//! generator); [`cli`] parses a subcommand's flags from strings for in-process starts. The
//! simulator and the load generator do not depend on the gateway.

pub mod bench;
pub mod cli;
pub mod serve;
pub mod sim;
