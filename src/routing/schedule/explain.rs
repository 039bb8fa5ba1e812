//! Dry-run explanations: why each endpoint of a snapshot scored what it did, stage by stage
//! (the filter that removed it, each scorer's term, its rank), for `/debug/explain`.

use std::net::SocketAddr;

use super::{Ctx, Input};
use crate::routing::endpoint::PrefixSource;
use crate::routing::ttft::TtftParams;

/// Why each endpoint scored what it did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Explanation {
    /// Profile that ran.
    pub profile: String,
    /// Every endpoint of the snapshot, in snapshot order.
    pub endpoints: Vec<EndpointExplanation>,
    /// The prefill profile's run, when the decider asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill: Option<Box<Explanation>>,
}

/// One endpoint's part of an [`Explanation`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EndpointExplanation {
    /// Endpoint address.
    pub address: SocketAddr,
    /// Prompt blocks it holds (tokens, in a precise pool).
    pub matched_blocks: u32,
    /// Prompt tokens it holds (estimated from bytes where the match is approximate).
    pub matched_tokens: u64,
    /// Where the match came from (precise pools only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_source: Option<PrefixSource>,
    /// Its TTFT model's prediction for this request, ms.
    pub predicted_ttft_ms: f64,
    /// The model's coefficients.
    pub ttft_model: TtftParams,
    /// The stage that removed it (`subset`, `model`, `health`, or a filter name).
    pub filtered_by: Option<String>,
    /// Each scorer's raw score, weight and weighted score.
    pub scores: Vec<ScoreTerm>,
    /// Sum of weighted scores.
    pub total: f64,
    /// Position in the picker's order (0 = target), if it was ranked and returned.
    pub rank: Option<usize>,
}

impl Explanation {
    /// Marks each endpoint (snapshot order) with the index its match came from.
    pub fn set_sources(&mut self, sources: &[PrefixSource]) {
        for (e, s) in self.endpoints.iter_mut().zip(sources) {
            e.prefix_source = Some(*s);
        }
        if let Some(p) = &mut self.prefill {
            p.set_sources(sources);
        }
    }

    pub(super) fn new(profile: &str, input: &Input<'_>) -> Self {
        Self {
            profile: profile.to_owned(),
            prefill: None,
            endpoints: input
                .endpoints
                .iter()
                .zip(input.prefix_blocks)
                .enumerate()
                .map(|(i, (e, &m))| EndpointExplanation {
                    address: e.address,
                    matched_blocks: m,
                    matched_tokens: u64::from(m) * input.request.block_tokens,
                    prefix_source: None,
                    predicted_ttft_ms: Ctx { input }.predicted_ttft_ms(i),
                    ttft_model: e.ttft.params(),
                    filtered_by: None,
                    scores: Vec::new(),
                    total: 0.0,
                    rank: None,
                })
                .collect(),
        }
    }
}

/// One scorer's contribution.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScoreTerm {
    /// Scorer name.
    pub scorer: String,
    /// Score in [0, 1].
    pub raw: f64,
    /// Weight.
    pub weight: f64,
    /// `raw × weight`.
    pub weighted: f64,
}
