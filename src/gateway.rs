//! Gateway state: the config tree ([`config`]), the pools kept fresh by discovery, scraping and
//! health judgement ([`pool`]), kvgate's metrics ([`telemetry`]), and the facade every
//! front-end calls ([`facade::Gateway`]: place, route, explain, ready) with its one outcome API
//! ([`outcome::Routed`], fed the [`events`] of a request's lifecycle; [`usage`] reads token usage
//! from responses as they pass). [`answer`] is what kvgate answers itself, one value for every
//! wire; [`decisions`] holds decisions whose callers report on them; [`error`] holds the
//! refusals and their one status mapping; [`budget`] bounds the request bytes held in memory;
//! [`paths`] is the path policy every front-end applies; [`tasks`] owns every task kvgate spawns and
//! stops them on shutdown.

pub mod answer;
pub mod budget;
pub mod config;
pub mod decisions;
pub mod error;
pub mod events;
pub mod facade;
pub mod outcome;
pub mod paths;
pub mod pool;
pub mod tasks;
pub mod telemetry;
pub mod usage;
