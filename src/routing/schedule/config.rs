//! EndpointPickerConfig (the Gateway API Inference Extension's scheduler config shape) →
//! a compiled [`Scheduler`].
//!
//! Plugin `type` names are the llm-d router's where kvgate implements the same thing; the rest
//! are kvgate's own. An unknown type, parameter or reference is an error that names the valid
//! ones and says where it is.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

mod ignored;

use parking_lot::Mutex;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{
    AffinityParams, Disagg, Filter, PdDecider, Picker, PickerParams, Plugin, PrefixParams, Profile, Scheduler, Scorer,
    Subset, UtilizationParams,
};
use crate::routing::prefix::precise::DEFAULT_BLOCK_SIZE;
use crate::routing::prefix::{BYTES_PER_TOKEN, PrefixConfig};

pub use ignored::Ignored;

/// The scheduler section of a pool, in EndpointPickerConfig shape.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SchedulerSpec {
    /// Accepted for compatibility with standalone EndpointPickerConfig files; has no effect
    /// (reported by [`SchedulerSpec::ignored`]).
    #[serde(default)]
    pub api_version: Option<String>,
    /// Accepted for compatibility; must be `EndpointPickerConfig` if given.
    #[serde(default)]
    pub kind: Option<String>,
    /// Plugin instances.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Profiles referring to the plugins.
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileSpec>,
}

/// One plugin instance.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// Plugin type, e.g. `prefix-cache-scorer`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Name profiles refer to it by (default: the type).
    #[serde(default)]
    pub name: Option<String>,
    /// Type-specific parameters.
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

/// One scheduling profile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    /// Profile name.
    pub name: String,
    /// The plugins it runs.
    #[serde(default)]
    pub plugins: Vec<PluginRef>,
}

/// A profile's reference to a plugin.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PluginRef {
    /// Name of a plugin in `plugins`.
    pub plugin_ref: String,
    /// Scorer weight (default 1).
    #[serde(default)]
    pub weight: Option<f64>,
}

/// A scheduler config error: where (a path such as `plugins[2].parameters`) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {message}")]
pub struct SpecError {
    /// Path of the offending entry within the scheduler section.
    pub at: String,
    /// What is wrong.
    pub message: String,
}

fn err(at: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError { at: at.into(), message: message.into() }
}

/// Every plugin type kvgate implements, and its category.
pub const PLUGIN_TYPES: &[(&str, &str)] = &[
    ("model-serving-filter", "filter"),
    ("health-filter", "filter"),
    ("decode-filter", "filter"),
    ("prefill-filter", "filter"),
    ("subset-filter", "filter"),
    ("utilization-filter", "filter"),
    ("prefix-cache-affinity-filter", "filter"),
    ("prefix-cache-scorer", "scorer"),
    ("queue-scorer", "scorer"),
    ("kv-cache-utilization-scorer", "scorer"),
    ("active-request-scorer", "scorer"),
    ("token-load-scorer", "scorer"),
    ("predicted-ttft-scorer", "scorer"),
    ("load-aware-scorer", "scorer"),
    ("lora-affinity-scorer", "scorer"),
    ("no-hit-lru-scorer", "scorer"),
    ("max-score-picker", "picker"),
    ("weighted-random-picker", "picker"),
    ("random-picker", "picker"),
    ("round-robin-picker", "picker"),
    ("approx-prefix-cache-producer", "producer"),
    ("precise-prefix-cache-producer", "producer"),
    ("single-profile-handler", "profile handler"),
    ("disagg-profile-handler", "profile handler"),
    ("prefix-based-pd-decider", "decider"),
];

fn valid_types() -> String {
    PLUGIN_TYPES.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
}

/// `name (type)` or just `type` when they are the same.
pub(super) fn describe(name: &str, kind: &str) -> String {
    if name == kind { kind.to_owned() } else { format!("{name} ({kind})") }
}

/// Parameters of `approx-prefix-cache-producer`: how prompts are hashed and indexed.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct ProducerParams {
    /// Block size in estimated tokens (4 bytes each).
    block_size_tokens: Option<usize>,
    /// Block size in bytes (kvgate's native unit; wins over `blockSizeTokens`).
    block_size_bytes: Option<usize>,
    /// Cap on matched prompt length, in estimated tokens.
    max_prefix_tokens_to_match: Option<usize>,
    /// Cap on matched prompt length, in blocks.
    max_prefix_blocks_to_match: Option<usize>,
    /// Index capacity per endpoint, in blocks.
    lru_capacity_per_server: Option<usize>,
    /// Size the index from the endpoints' `vllm:cache_config_info` (kvgate always does when
    /// the metric is scraped; accepted for compatibility).
    auto_tune: Option<bool>,
}

impl ProducerParams {
    fn apply(&self, cfg: &mut PrefixConfig) -> Result<(), String> {
        if let Some(t) = self.block_size_tokens {
            cfg.block_bytes = t * BYTES_PER_TOKEN;
        }
        if let Some(b) = self.block_size_bytes {
            cfg.block_bytes = b;
        }
        if cfg.block_bytes == 0 || cfg.block_bytes > 1 << 20 {
            return Err("the block size must be between 1 byte and 1 MiB".into());
        }
        if let Some(t) = self.max_prefix_tokens_to_match {
            cfg.max_blocks = (t * BYTES_PER_TOKEN).div_ceil(cfg.block_bytes);
        } else if let Some(b) = self.max_prefix_blocks_to_match {
            cfg.max_blocks = b;
        }
        if let Some(c) = self.lru_capacity_per_server {
            if c == 0 {
                return Err("lruCapacityPerServer must be at least 1".into());
            }
            cfg.index_capacity = c;
        }
        Ok(())
    }
}

/// Parameters of `precise-prefix-cache-producer`: the pool matches on its endpoints' KV events
/// (the pool's `tokenizer` and `kv_events` say how).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct PreciseParams {
    /// Tokens per block until an endpoint's events say (default 16, vLLM's on GPUs).
    block_size: Option<u32>,
}

/// Parameters of `subset-filter`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct SubsetParams {
    /// Allowed `ip:port` entries, or bare IPs for every port of an IP.
    endpoints: Vec<String>,
}

fn params<T: DeserializeOwned + Default>(value: Option<&serde_json::Value>) -> Result<T, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| e.to_string()),
    }
}

fn picker_params(value: Option<&serde_json::Value>) -> Result<PickerParams, String> {
    let p: PickerParams = params(value)?;
    if p.max_num_of_endpoints == Some(0) {
        return Err("maxNumOfEndpoints must be at least 1".into());
    }
    Ok(p)
}

fn no_params(value: Option<&serde_json::Value>) -> Result<(), String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::Object(m)) if m.is_empty() => Ok(()),
        Some(_) => Err("this plugin takes no parameters".into()),
    }
}

/// Parameters of `disagg-profile-handler`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DisaggParams {
    /// Decider plugin names by stage; kvgate has a `prefill` stage.
    #[serde(default)]
    deciders: DisaggDeciders,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DisaggDeciders {
    /// Name of the plugin deciding whether to disaggregate prefill.
    #[serde(default)]
    prefill: Option<String>,
}

enum Instance {
    Filter(Arc<Filter>),
    Scorer(Arc<Scorer>),
    Picker(Arc<Picker>),
    Producer(ProducerParams),
    PreciseProducer(PreciseParams),
    SingleHandler,
    DisaggHandler(DisaggParams),
    Decider(PdDecider),
}

fn instantiate(kind: &str, p: Option<&serde_json::Value>) -> Result<Instance, String> {
    use Instance as I;
    let filter = |f| Ok(I::Filter(Arc::new(f)));
    let scorer = |s| Ok(I::Scorer(Arc::new(s)));
    let picker = |p| Ok(I::Picker(Arc::new(p)));
    match kind {
        "model-serving-filter" => no_params(p).and_then(|()| filter(Filter::ServesModel)),
        "health-filter" => no_params(p).and_then(|()| filter(Filter::Healthy)),
        "decode-filter" => no_params(p).and_then(|()| filter(Filter::Decode)),
        "prefill-filter" => no_params(p).and_then(|()| filter(Filter::Prefill)),
        "subset-filter" => {
            let sp: SubsetParams = params(p)?;
            let s = Subset::parse(sp.endpoints.iter().map(String::as_str))?;
            filter(Filter::Subset(s))
        }
        "utilization-filter" => filter(Filter::Utilization(params::<UtilizationParams>(p)?)),
        "prefix-cache-affinity-filter" => {
            let a: AffinityParams = params(p)?;
            if !(0.0..=1.0).contains(&a.affinity_threshold) {
                return Err("affinityThreshold must be in [0, 1]".into());
            }
            if !(a.max_in_flight_ratio.is_finite() && a.max_in_flight_ratio >= 0.0) {
                return Err("maxInFlightRatio must be a non-negative number".into());
            }
            filter(Filter::PrefixAffinity(a))
        }
        "prefix-cache-scorer" => {
            let s: PrefixParams = params(p)?;
            if !(0.0..=1.0).contains(&s.match_length_weight) {
                return Err("matchLengthWeight must be in [0, 1]".into());
            }
            scorer(Scorer::PrefixCache(s))
        }
        "queue-scorer" => no_params(p).and_then(|()| scorer(Scorer::Queue)),
        "kv-cache-utilization-scorer" => no_params(p).and_then(|()| scorer(Scorer::KvCacheUtilization)),
        "active-request-scorer" => scorer(Scorer::ActiveRequest(params(p)?)),
        "token-load-scorer" => scorer(Scorer::TokenLoad(params(p)?)),
        "predicted-ttft-scorer" => scorer(Scorer::PredictedTtft(params(p)?)),
        "load-aware-scorer" => scorer(Scorer::LoadAware(params(p)?)),
        "lora-affinity-scorer" => no_params(p).and_then(|()| scorer(Scorer::LoraAffinity)),
        "no-hit-lru-scorer" => scorer(Scorer::NoHitLru(params(p)?, Mutex::default())),
        "max-score-picker" => picker(Picker::MaxScore(picker_params(p)?)),
        "weighted-random-picker" => picker(Picker::WeightedRandom(picker_params(p)?)),
        "random-picker" => picker(Picker::Random(picker_params(p)?)),
        "round-robin-picker" => picker(Picker::RoundRobin(picker_params(p)?, AtomicUsize::new(0))),
        "approx-prefix-cache-producer" => Ok(I::Producer(params(p)?)),
        "precise-prefix-cache-producer" => {
            let pp: PreciseParams = params(p)?;
            if pp.block_size.is_some_and(|b| b == 0 || b > 1 << 16) {
                return Err("blockSize must be between 1 and 65536 tokens".into());
            }
            Ok(I::PreciseProducer(pp))
        }
        "single-profile-handler" => no_params(p).map(|()| I::SingleHandler),
        "disagg-profile-handler" => Ok(I::DisaggHandler(params(p)?)),
        "prefix-based-pd-decider" => Ok(I::Decider(params(p)?)),
        other => Err(format!("unknown plugin type `{other}`; valid types: {}", valid_types())),
    }
}

fn type_name(kind: &str) -> &'static str {
    PLUGIN_TYPES.iter().find(|(t, _)| *t == kind).map_or("?", |(t, _)| t)
}

impl Scheduler {
    /// Compiles a scheduler spec, checking every type, parameter and reference.
    pub fn from_spec(spec: &SchedulerSpec) -> Result<Self, SpecError> {
        if let Some(k) = spec.kind.as_deref().filter(|k| *k != "EndpointPickerConfig") {
            return Err(err("kind", format!("expected `EndpointPickerConfig`, got `{k}`")));
        }
        let mut defined: Vec<(String, &'static str, Instance)> = Vec::new();
        let mut prefix = PrefixConfig::default();
        let mut precise = None;
        for (i, p) in spec.plugins.iter().enumerate() {
            let inst = instantiate(&p.kind, p.parameters.as_ref()).map_err(|m| {
                let field = if type_name(&p.kind) == "?" { "type" } else { "parameters" };
                err(format!("plugins[{i}].{field}"), m)
            })?;
            if let Instance::Producer(pp) = &inst {
                pp.apply(&mut prefix).map_err(|m| err(format!("plugins[{i}].parameters"), m))?;
            }
            if let Instance::PreciseProducer(pp) = &inst {
                precise = Some(pp.block_size.unwrap_or(DEFAULT_BLOCK_SIZE));
            }
            let name = p.name.clone().unwrap_or_else(|| p.kind.clone());
            if defined.iter().any(|(n, ..)| *n == name) {
                return Err(err(
                    format!("plugins[{i}].name"),
                    format!("two plugins are named `{name}`; give one a distinct `name`"),
                ));
            }
            defined.push((name, type_name(&p.kind), inst));
        }
        let profiles: Vec<ProfileSpec> = if spec.scheduling_profiles.is_empty() {
            // No profiles: one `default` profile running every plugin, as the reference does.
            vec![ProfileSpec {
                name: "default".into(),
                plugins: defined.iter().map(|(n, ..)| PluginRef { plugin_ref: n.clone(), weight: None }).collect(),
            }]
        } else {
            spec.scheduling_profiles.clone()
        };
        if let Some(k) = profiles.iter().enumerate().position(|(k, p)| profiles[..k].iter().any(|q| q.name == p.name)) {
            return Err(err(
                format!("schedulingProfiles[{k}].name"),
                format!("two profiles are named `{}`", profiles[k].name),
            ));
        }
        let handlers: Vec<usize> = spec
            .plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| PLUGIN_TYPES.iter().any(|(t, c)| *t == p.kind && *c == "profile handler"))
            .map(|(i, _)| i)
            .collect();
        if let [_, second, ..] = handlers[..] {
            return Err(err(format!("plugins[{second}]"), "a scheduler has one profile handler; this is a second one"));
        }
        let handler = defined.iter().find_map(|(n, _, inst)| match inst {
            Instance::DisaggHandler(p) => Some((n.clone(), p.clone())),
            _ => None,
        });
        let Some((handler_name, hp)) = handler else {
            if profiles.len() > 1 {
                return Err(err(
                    "schedulingProfiles",
                    format!(
                        "{} profiles given, but `single-profile-handler` runs one; for prefill/decode \
                         disaggregation add a `disagg-profile-handler` and name the profiles `decode` and `prefill`",
                        profiles.len()
                    ),
                ));
            }
            let profile = compile_profile(0, &profiles[0], &defined)?;
            return Ok(Self { profile, disagg: None, prefix, precise });
        };
        // Decode-first disaggregation: exactly the profiles `decode` and `prefill`.
        let find = |name: &str| profiles.iter().position(|p| p.name == name);
        let (Some(d), Some(p)) = (find("decode"), find("prefill")) else {
            return Err(err(
                "schedulingProfiles",
                format!("`{handler_name}` (disagg-profile-handler) needs profiles named `decode` and `prefill`"),
            ));
        };
        if let Some((k, extra)) = profiles.iter().enumerate().find(|(_, x)| x.name != "decode" && x.name != "prefill") {
            return Err(err(
                format!("schedulingProfiles[{k}].name"),
                format!("profile `{}`: with `{handler_name}` the profiles are `decode` and `prefill` only", extra.name),
            ));
        }
        let decider = disagg_decider(&handler_name, &hp, &defined)?;
        Ok(Self {
            profile: compile_profile(d, &profiles[d], &defined)?,
            disagg: Some(Disagg { profile: compile_profile(p, &profiles[p], &defined)?, decider }),
            prefix,
            precise,
        })
    }
}

/// The decider a `disagg-profile-handler` uses: the one it names, or the only one defined; it
/// must disaggregate some requests.
fn disagg_decider(
    handler_name: &str,
    hp: &DisaggParams,
    defined: &[(String, &'static str, Instance)],
) -> Result<PdDecider, SpecError> {
    let deciders: Vec<(&String, &PdDecider)> = defined
        .iter()
        .filter_map(|(n, _, inst)| match inst {
            Instance::Decider(x) => Some((n, x)),
            _ => None,
        })
        .collect();
    let decider = match &hp.deciders.prefill {
        Some(name) => match deciders.iter().find(|(n, _)| *n == name) {
            Some((_, x)) => **x,
            None => {
                return Err(err(
                    "plugins",
                    format!("`{handler_name}` names decider `{name}`, but no prefix-based-pd-decider has that name"),
                ));
            }
        },
        None => match deciders.as_slice() {
            [(_, x)] => **x,
            _ => {
                return Err(err(
                    "plugins",
                    format!(
                        "`{handler_name}` needs one prefix-based-pd-decider (or `deciders: {{prefill: NAME}}`) \
                         to say when prefill is worth a separate endpoint"
                    ),
                ));
            }
        },
    };
    if decider.non_cached_tokens == 0 {
        return Err(err(
            "plugins",
            format!(
                "`{handler_name}` uses a prefix-based-pd-decider with nonCachedTokens 0, which never \
                 disaggregates; set it to the uncached prompt tokens worth a separate prefill (e.g. 512)"
            ),
        ));
    }
    Ok(decider)
}

/// Compiles profile number `idx` against the defined plugins.
fn compile_profile(
    idx: usize,
    ps: &ProfileSpec,
    defined: &[(String, &'static str, Instance)],
) -> Result<Profile, SpecError> {
    let mut profile = Profile {
        name: ps.name.clone(),
        filters: Vec::new(),
        scorers: Vec::new(),
        picker: Plugin {
            name: "max-score-picker".into(),
            kind: "max-score-picker",
            plugin: Arc::new(Picker::MaxScore(PickerParams::default())),
        },
    };
    let mut picker_set = false;
    for (k, r) in ps.plugins.iter().enumerate() {
        let at = format!("schedulingProfiles[{idx}].plugins[{k}]");
        let Some((name, kind, inst)) = defined.iter().find(|(n, ..)| *n == r.plugin_ref) else {
            let names: Vec<&str> = defined.iter().map(|(n, ..)| n.as_str()).collect();
            return Err(err(
                format!("{at}.pluginRef"),
                format!("no plugin named `{}`; defined plugins: {}", r.plugin_ref, names.join(", ")),
            ));
        };
        if r.weight.is_some() && !matches!(inst, Instance::Scorer(_)) {
            return Err(err(format!("{at}.weight"), format!("`{name}` is not a scorer; only scorers take a weight")));
        }
        match inst {
            Instance::Filter(f) => profile.filters.push(Plugin { name: name.clone(), kind, plugin: f.clone() }),
            Instance::Scorer(s) => {
                let w = r.weight.unwrap_or(1.0);
                if !w.is_finite() || w < 0.0 {
                    return Err(err(format!("{at}.weight"), "a weight must be a non-negative number"));
                }
                profile.scorers.push((Plugin { name: name.clone(), kind, plugin: s.clone() }, w));
            }
            Instance::Picker(p) => {
                if picker_set {
                    return Err(err(at, format!("a profile has one picker; `{name}` is a second one")));
                }
                picker_set = true;
                profile.picker = Plugin { name: name.clone(), kind, plugin: p.clone() };
            }
            Instance::Producer(_)
            | Instance::PreciseProducer(_)
            | Instance::SingleHandler
            | Instance::DisaggHandler(_)
            | Instance::Decider(_) => {}
        }
    }
    Ok(profile)
}

/// Compiles the embedded default scheduler.
pub(super) fn default_scheduler() -> Scheduler {
    let spec: SchedulerSpec =
        serde_saphyr::from_str(super::DEFAULT_SCHEDULER_YAML).expect("the embedded default scheduler is valid YAML");
    Scheduler::from_spec(&spec).expect("the embedded default scheduler compiles")
}

impl fmt::Display for SchedulerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.plugins.iter().map(|p| p.kind.as_str()).collect();
        write!(f, "plugins [{}]", names.join(", "))
    }
}
