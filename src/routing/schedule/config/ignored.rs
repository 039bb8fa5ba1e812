//! Settings a scheduler section accepts but that change nothing. They stay accepted, so that
//! configs written for other routers load; they are reported, so that nobody tunes them in vain.

use super::{PLUGIN_TYPES, SchedulerSpec, describe};

/// A setting accepted without effect: where (a path within the scheduler section, such as
/// `plugins[2].parameters.lruSize`) and why it does nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// Path within the scheduler section.
    pub at: String,
    /// Why it has no effect, and what to set instead if anything.
    pub message: String,
}

/// Plugin parameters accepted for compatibility and unused: plugin type, key, why.
const IGNORED_PARAMETERS: &[(&str, &str, &str)] = &[
    (
        "prefix-cache-affinity-filter",
        "peakPrefillThroughput",
        "each endpoint's prefill rate is learned from its responses (its TTFT model); \
         `maxTTFTPenaltyMs` tunes the rule that uses it",
    ),
    (
        "no-hit-lru-scorer",
        "lruSize",
        "kvgate remembers the last cold request of every endpoint of the pool, so it never forgets one early",
    ),
    (
        "approx-prefix-cache-producer",
        "autoTune",
        "the index is always sized from `vllm:cache_config_info` when endpoints expose it; \
         `lruCapacityPerServer` sets the size otherwise",
    ),
];

impl SchedulerSpec {
    /// Every setting of this section that is accepted but has no effect.
    pub fn ignored(&self) -> Vec<Ignored> {
        let mut out = Vec::new();
        let mut note = |at: String, message: String| out.push(Ignored { at, message });
        if self.api_version.is_some() {
            note(
                "apiVersion".into(),
                "accepted for compatibility with standalone EndpointPickerConfig files and ignored: \
                 kvgate reads this section in one shape whatever the version"
                    .into(),
            );
        }
        for (i, p) in self.plugins.iter().enumerate() {
            let Some(serde_json::Value::Object(m)) = &p.parameters else { continue };
            for (kind, key, why) in IGNORED_PARAMETERS {
                if p.kind == *kind && m.contains_key(*key) {
                    note(
                        format!("plugins[{i}].parameters.{key}"),
                        format!("accepted for compatibility and ignored: {why}"),
                    );
                }
            }
        }
        self.unused_plugins(&mut note);
        out
    }

    /// Filters, scorers and pickers no profile refers to, and a `maxNumOfEndpoints` only the
    /// `prefill` profile of a disaggregating scheduler sees (it picks one prefill endpoint).
    fn unused_plugins(&self, note: &mut impl FnMut(String, String)) {
        if self.scheduling_profiles.is_empty() {
            return; // The implicit profile runs every plugin.
        }
        let category = |kind: &str| PLUGIN_TYPES.iter().find(|(t, _)| *t == kind).map(|(_, c)| *c);
        let disagg = self.plugins.iter().any(|p| p.kind == "disagg-profile-handler");
        for (i, p) in self.plugins.iter().enumerate() {
            let cat = category(&p.kind);
            if !matches!(cat, Some("filter" | "scorer" | "picker")) {
                continue;
            }
            let name = p.name.as_deref().unwrap_or(&p.kind);
            let users: Vec<&str> = self
                .scheduling_profiles
                .iter()
                .filter(|pr| pr.plugins.iter().any(|r| r.plugin_ref == name))
                .map(|pr| pr.name.as_str())
                .collect();
            if users.is_empty() {
                note(
                    format!("plugins[{i}]"),
                    format!(
                        "`{}` is defined but no profile in `schedulingProfiles` refers to it: it takes part in no decision",
                        describe(name, &p.kind)
                    ),
                );
                continue;
            }
            let sets_count =
                matches!(&p.parameters, Some(serde_json::Value::Object(m)) if m.contains_key("maxNumOfEndpoints"));
            if cat == Some("picker") && disagg && sets_count && users.iter().all(|u| *u == "prefill") {
                note(
                    format!("plugins[{i}].parameters.maxNumOfEndpoints"),
                    "ignored: the `prefill` profile picks one prefill endpoint; set it on the `decode` profile's picker"
                        .into(),
                );
            }
        }
    }
}
