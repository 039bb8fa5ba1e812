//! Gateway state: the config tree ([`config`]), the pools kept fresh by discovery, scraping and
//! health judgement ([`pool`]), kvgate's metrics ([`telemetry`]), and the facade every
//! front-end calls ([`facade::Gateway`]: decide, explain, ready) with its one outcome API
//! ([`outcome::Routed`]). [`decisions`] holds decisions whose callers report on them; [`error`] holds the refusals and their one status mapping; [`budget`] bounds the request
//! bytes held in memory; [`paths`] is the path policy both front-ends apply; [`tasks`] owns every task kvgate spawns and stops them on shutdown.

pub mod budget;
pub mod config;
pub mod decisions;
pub mod error;
pub mod facade;
pub mod outcome;
pub mod paths;
pub mod pool;
pub mod tasks;
pub mod telemetry;
