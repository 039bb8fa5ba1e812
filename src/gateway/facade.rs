//! The one decision path every front-end calls: request → pool by model → admission → per-pool
//! planning → a [`Routed`] request counted in flight on its target. [`Gateway`] also gives the
//! answers kvgate gives itself ([`Answer`]: model list, model info, health, refused paths,
//! refused requests, each refusal counted here), and answers the questions the front-ends ask
//! of the whole gateway (readiness, the metrics page, a dry-run explanation).

use std::sync::Arc;

use serde_json::json;

use crate::gateway::answer::Answer;
use crate::gateway::budget::BodyBudget;
use crate::gateway::config::cluster::ClusterConfig;
use crate::gateway::config::{Admission, PickerApiConfig};
use crate::gateway::decisions::Decisions;
use crate::gateway::error::RouteError;
use crate::gateway::outcome::Routed;
use crate::gateway::paths::{self, Ask, PathPolicy, PathRefusal, Place};
use crate::gateway::pool::cluster::Cluster;
use crate::gateway::pool::flow::{Class, Probe};
use crate::gateway::pool::{Pool, Snapshot, now_ms};
use crate::gateway::telemetry::{PoolView, Telemetry};
use crate::routing::endpoint::{Endpoint, Health};
use crate::routing::plan::{PlanOptions, candidates_for};
use crate::routing::request::{self, ApiKind, ParsedRequest, PromptFields, RequestError};
use crate::routing::schedule::{Decision, Explanation, NoDecision, Subset};

/// A request to place: how its path places it, what it carries, the subset it may go to, and
/// how many distinct endpoints to keep (fallback list entries, retry attempts).
#[derive(Debug)]
pub struct RouteRequest<'a> {
    /// What the path policy said of its path ([`Gateway::place`]).
    pub place: Place,
    /// Its body, or its prompt as fields.
    pub input: Input<'a>,
    /// Where it may go.
    pub subset: SubsetHint,
    /// Distinct endpoints to keep.
    pub places: usize,
    /// Its objective, flow and TTFT objective, for flow control.
    pub class: Class<'a>,
}

/// What a request carries.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// Its body as the client sent it (empty when it has none).
    Body(&'a [u8]),
    /// A completions prompt as fields (kvgate's picker API).
    Prompt(PromptFields<'a>),
}

/// The endpoints a gateway in front allows (Envoy's subset hint, a `Pick`'s `subset`).
#[derive(Debug, Clone, Default)]
pub enum SubsetHint {
    /// Any endpoint of the pool.
    #[default]
    Any,
    /// Only these.
    Within(Subset),
    /// A hint that names nothing readable: no endpoint matches.
    Unreadable,
}

/// Every pool, and the choice among them by `model` (body-based routing).
#[derive(Debug)]
pub struct Gateway {
    pools: Vec<Pool>,
    max_body_bytes: usize,
    body_budget: BodyBudget,
    paths: PathPolicy,
    telemetry: Arc<Telemetry>,
    /// Decisions held for their reports (the picker API, P/D sidecars behind Envoy).
    decisions: Arc<Decisions>,
    /// When the gateway started (the `created` of its model list), Unix seconds.
    created: u64,
    /// What it shares with peer replicas, if it has any.
    cluster: Option<Arc<Cluster>>,
}

impl Gateway {
    /// A gateway over `pools`, holding request bodies of at most `max_body_bytes` each and
    /// `max_buffered_bytes` in all.
    pub fn new(pools: Vec<Pool>, max_body_bytes: usize, max_buffered_bytes: usize, telemetry: Arc<Telemetry>) -> Self {
        let body_budget = BodyBudget::new(max_buffered_bytes);
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let decisions = Arc::new(Decisions::new(&PickerApiConfig::default(), telemetry.clone()));
        Self {
            pools,
            max_body_bytes,
            body_budget,
            paths: PathPolicy::default(),
            telemetry,
            decisions,
            created,
            cluster: None,
        }
    }

    /// The gateway holding picked decisions for their reports as `cfg` says.
    #[must_use]
    pub fn with_picker_api(mut self, cfg: &PickerApiConfig) -> Self {
        self.decisions = Arc::new(Decisions::new(cfg, self.telemetry.clone()));
        self
    }

    /// The gateway letting one client hold at most `percent` of its request-bytes bound.
    #[must_use]
    pub fn with_body_share(mut self, percent: u32) -> Self {
        let limit = self.body_budget.limit();
        self.body_budget = BodyBudget::with_share(limit, BodyBudget::share_of(limit, percent));
        self
    }

    /// The gateway sharing what it learns with the peers `cfg` names (after
    /// [`Gateway::with_picker_api`]: the replica's id is its decision ids' nonce).
    #[must_use]
    pub fn with_cluster(mut self, cfg: Option<&ClusterConfig>) -> Self {
        self.cluster = cfg.map(|c| {
            let id = self.decisions.replica_id();
            let cluster = Arc::new(Cluster::new(id, c.clone(), self.pools.clone(), self.telemetry.clone()));
            for p in &self.pools {
                p.share_with(&cluster);
            }
            cluster
        });
        self
    }

    /// What it shares with peer replicas, if it has any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The decisions held for their reports.
    pub fn decisions(&self) -> &Arc<Decisions> {
        &self.decisions
    }

    /// The gateway with `paths` as its path policy.
    #[must_use]
    pub fn with_paths(mut self, paths: PathPolicy) -> Self {
        self.paths = paths;
        self
    }

    /// The bound on request bytes held at once, over every request.
    pub fn body_budget(&self) -> &BodyBudget {
        &self.body_budget
    }

    /// The pools.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Largest body accepted.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// Ready once every pool has completed its first discovery.
    pub fn ready(&self) -> bool {
        self.pools.iter().all(Pool::ready) && self.cluster.as_ref().is_none_or(|c| c.ready())
    }

    /// The Prometheus exposition, with pool and endpoint gauges refreshed.
    pub fn metrics_text(&self) -> String {
        let views: Vec<PoolView<'_>> = self
            .pools
            .iter()
            .map(|p| PoolView {
                name: p.name(),
                prefix_blocks: p.planner().index().stats().resident_blocks,
                endpoints: p.status(),
            })
            .collect();
        self.telemetry.buffered_bytes.set(self.body_budget.held() as i64);
        self.telemetry.buffered_clients.set(self.body_budget.clients() as i64);
        for p in self.pools.iter().filter(|p| p.flow().enabled()) {
            self.telemetry.flow_saturation.with_label_values(&[p.name()]).set(p.flow().saturation());
        }
        self.telemetry.render(&views)
    }

    /// Every name a request may ask for: each pool's models, then the adapters its endpoints
    /// serve.
    pub fn served_models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for name in self.pools.iter().flat_map(Pool::served_names) {
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }

    /// The `/v1/models` list: every pool's models, then the adapters its endpoints serve (with
    /// the pool's first model as their parent), as OpenAI's model objects with vLLM's `root`,
    /// `parent` and (when the endpoints report it) `max_model_len`.
    pub fn models_list(&self) -> serde_json::Value {
        let mut data = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for pool in &self.pools {
            let models = pool.served_models();
            let snapshot = pool.snapshot();
            for m in &models {
                if seen.insert(m.clone()) {
                    data.push(self.model_object(&snapshot, m, None));
                }
            }
            let parent = models.first().map(String::as_str);
            for a in &snapshot.adapters {
                if seen.insert(a.clone()) {
                    data.push(self.model_object(&snapshot, a, parent));
                }
            }
        }
        json!({"object": "list", "data": data})
    }

    /// The `/v1/models/{id}` object of `id`, if it is served.
    pub fn model_info(&self, id: &str) -> Option<serde_json::Value> {
        self.models_list()["data"].as_array()?.iter().find(|m| m["id"] == id).cloned()
    }

    /// One entry of the model list.
    fn model_object(&self, snapshot: &Snapshot, id: &str, parent: Option<&str>) -> serde_json::Value {
        let mut m = json!({
            "id": id, "object": "model", "created": self.created, "owned_by": "kvgate",
            "root": id, "parent": parent,
        });
        if let Some(len) = snapshot.max_model_len.get(id) {
            m["max_model_len"] = json!(len);
        }
        m
    }

    /// Where `method` on `path` goes: placed as the returned [`Place`] says, or answered by kvgate
    /// itself — the model list, a model's info, health, or the 404/405 of a path the policy
    /// refuses — the same answer on every wire.
    pub fn place(&self, method: &str, path: &str) -> Result<Place, Answer> {
        match self.paths.ask(method, path) {
            Ask::Route(place) => Ok(place),
            Ask::Models => Err(Answer::ok(&self.models_list())),
            Ask::ModelInfo => {
                let id = paths::model_id(path).unwrap_or_default();
                Err(match self.model_info(&id) {
                    Some(m) => Answer::ok(&m),
                    None => {
                        Answer::error(404, format!("The model `{id}` does not exist"), "model_not_found", Some("model"))
                    }
                })
            }
            // 200 with an empty body (as vLLM answers) while some pool has an endpoint in
            // rotation.
            Ask::Health if self.healthy() => Err(Answer::json(200, String::new())),
            Ask::Health => Err(Answer::error(503, "no pool has an endpoint in rotation", "no_healthy_endpoints", None)),
            Ask::NotFound => Err(Answer::from(&PathRefusal::not_found(method, path))),
            Ask::MethodNotAllowed(allow) => {
                Err(Answer::from(&PathRefusal::method_not_allowed(method, path, Some(allow))))
            }
        }
    }

    /// The longest a request may wait in a pool's flow-control queue (`None`: no pool queues).
    pub fn longest_queue_wait(&self) -> Option<std::time::Duration> {
        self.pools.iter().filter(|p| p.flow().enabled()).map(|p| p.flow().settings().ttl).max()
    }

    /// Whether some pool has an endpoint in rotation (`GET /health`).
    pub fn healthy(&self) -> bool {
        self.pools.iter().any(|p| p.snapshot().endpoints.iter().any(|e| e.health == Health::Healthy))
    }

    /// The pool serving `model`: the one configured with it, else one configured without
    /// models whose endpoints list it (or listed it), else one whose endpoints serve it as an
    /// adapter (routing an adapter to the pool of its base model), else the one pool still
    /// waiting to learn its models.
    pub fn pool_for(&self, model: &str) -> Result<&Pool, RouteError> {
        self.pools
            .iter()
            .find(|p| p.models().iter().any(|m| m == model))
            .or_else(|| {
                self.pools.iter().find(|p| p.models().is_empty() && p.snapshot().models.iter().any(|m| m == model))
            })
            .or_else(|| self.pools.iter().find(|p| p.snapshot().adapters.iter().any(|a| a == model)))
            // One pool that learns its models and knows none yet (no endpoint has answered):
            // its requests wait for its endpoints (a 503 now), not a 404.
            .or_else(|| {
                let mut learning =
                    self.pools.iter().filter(|p| p.models().is_empty() && p.snapshot().models.is_empty());
                match (learning.next(), learning.next()) {
                    (Some(p), None) => Some(p),
                    _ => None,
                }
            })
            .ok_or_else(|| RouteError::UnknownModel { model: model.to_owned(), served: self.served_models() })
    }

    /// Counts an ext_proc message ignored because its phase was over (`kind`, a fixed name).
    pub fn ignored_message(&self, kind: &'static str) {
        self.telemetry.extproc_ignored.with_label_values(&[kind]).inc();
    }

    /// The answer to a request refused before it could be routed (an unreadable or too large
    /// body, a full body budget), counted.
    pub fn refuse(&self, e: &RouteError) -> Answer {
        self.count_refusal(e, None);
        Answer::from(e)
    }

    /// Counts a refusal of a request for `model` (when it named one).
    fn count_refusal(&self, e: &RouteError, model: Option<&str>) {
        let model = match e {
            RouteError::UnknownModel { model, .. } => self.telemetry.unknown_model_label(model),
            _ => model.unwrap_or("unknown"),
        };
        self.telemetry.count_request("unknown", model, None, e.status(), e.code());
    }

    /// Decides where a request goes and counts it in flight there; a refusal is counted and
    /// answered. In a pool with flow control, the request first waits for room when every
    /// endpoint that could take it is saturated (dropping the future leaves the queue). The
    /// routed request holds the body to send when it is not the client's own
    /// ([`Routed::take_body`]).
    pub async fn route(&self, req: RouteRequest<'_>) -> Result<Routed, Answer> {
        self.route_as(req, false).await
    }

    /// [`Gateway::route`] for a decision to hold for the picker API's reports: refused as a
    /// saturated pool is while the picker API's decisions take their share of the pool's
    /// admission (`picker_api.admission_share`).
    pub async fn route_to_hold(&self, req: RouteRequest<'_>) -> Result<Routed, Answer> {
        self.route_as(req, true).await
    }

    async fn route_as(&self, req: RouteRequest<'_>, held: bool) -> Result<Routed, Answer> {
        let mut routed = self.decide(&req, held).await.map_err(|(e, model)| {
            self.count_refusal(&e, model.as_deref());
            Answer::from(&e)
        })?;
        if let Input::Body(b) = req.input {
            routed.sanitize(b);
        }
        Ok(routed)
    }

    /// [`Gateway::route`]'s decision; a refusal comes with the model the request named, if known.
    async fn decide(&self, req: &RouteRequest<'_>, held: bool) -> Result<Routed, (RouteError, Option<String>)> {
        let subset = match &req.subset {
            SubsetHint::Any => None,
            SubsetHint::Within(s) if !s.is_empty() => Some(s),
            _ => return Err((RouteError::Unavailable(NoDecision::SubsetUnmatched), None)),
        };
        let fail = |e: RouteError| (e, None);
        let max = self.max_body_bytes;
        let model_only;
        let parsed = match (req.place, req.input) {
            (Place::Prompt(api), Input::Body(b)) => request::parse(api, b, max).map_err(|e| fail(e.into()))?,
            (Place::Prompt(_), Input::Prompt(p)) => ParsedRequest::from_fields(p, max).map_err(|e| fail(e.into()))?,
            (Place::Model, input) => {
                model_only = match input {
                    Input::Body(b) => request::model_of(b),
                    Input::Prompt(p) => Some(p.model.to_owned()).filter(|m| !m.is_empty()),
                }
                .ok_or_else(|| fail(RouteError::BadRequest(RequestError::MissingModel)))?;
                if model_only.is_empty() {
                    let detail = "must not be empty".to_owned();
                    return Err(fail(RequestError::InvalidField { field: "model".into(), detail }.into()));
                }
                ParsedRequest::model_only(&model_only)
            }
            (Place::AnyEndpoint, _) => {
                model_only = self.any_model().ok_or_else(|| fail(RouteError::Unavailable(NoDecision::NoEndpoints)))?;
                ParsedRequest::model_only(&model_only)
            }
        };
        // The request's size: its body's, or its prompt's when given as fields.
        let bytes = match req.input {
            Input::Body(b) => b.len(),
            Input::Prompt(_) => parsed.body_len(),
        };
        let routed = self
            .plan(&parsed, subset, req.places, held, req.class, bytes)
            .await
            .map_err(|e| (e, Some(parsed.model.to_string())))?;
        routed.request_bytes(bytes);
        Ok(routed)
    }

    /// A model of the first pool with an endpoint in rotation (else of the first with any
    /// endpoint): where a request for no model in particular goes.
    fn any_model(&self) -> Option<String> {
        let first = |healthy: bool| {
            self.pools.iter().find_map(|p| {
                let snap = p.snapshot();
                let up = snap.endpoints.iter().any(|e| !healthy || e.health == Health::Healthy);
                up.then(|| p.served_models().into_iter().next()).flatten()
            })
        };
        first(true).or_else(|| first(false))
    }

    /// Picks the pool, admits (a decision to be `held` for the picker API's reports within
    /// that API's share), waits for room when the pool's flow control says so, decides for
    /// `places` distinct endpoints, and counts the request in flight on its target.
    async fn plan(
        &self,
        req: &ParsedRequest<'_>,
        subset: Option<&Subset>,
        places: usize,
        held: bool,
        class: Class<'_>,
        bytes: usize,
    ) -> Result<Routed, RouteError> {
        let pool = self.pool_for(&req.model)?;
        if held {
            self.decisions.share_left(pool.name(), pool.admission())?;
        }
        let flow = pool.flow();
        // An objective's priority, when the request names one (else the body's `priority`
        // for admission, and 0 for flow control).
        let objective = class.objective.map(|o| flow.objectives().priority(Some(o)));
        let planner = pool.planner();
        let stale_ms = planner.stale_after_ms();
        let snapshot = pool.snapshot();
        admit(
            pool.admission(),
            pool.name(),
            &snapshot.endpoints,
            objective.unwrap_or(req.priority),
            now_ms(),
            stale_ms,
        )?;
        let admitted = if flow.enabled() {
            let probe = Probe { model: req.model.to_string(), subset: subset.cloned() };
            let entered = flow.enter(probe, objective.unwrap_or(0), class, bytes as u64).await;
            Some(entered.map_err(|why| RouteError::Queue { pool: pool.name().to_owned(), why })?)
        } else {
            None
        };
        let started = std::time::Instant::now();
        // The gate's mask is by index of the snapshot it was made on.
        let snapshot = admitted.as_ref().map_or(snapshot, |a| a.snapshot.clone());
        let now = now_ms();
        // The pool's `maxNumOfEndpoints` may ask for more places than the caller.
        let want = candidates_for(places.max(planner.scheduler().max_endpoints().unwrap_or(1)));
        let lora = snapshot.lora(&req.model);
        let open = admitted.as_ref().map(|a| a.open.as_slice());
        let opts = PlanOptions { subset, want, now_ms: now, disaggregate: req.api.disaggregates(), lora, open };
        let planned =
            planner.plan(req, &snapshot.endpoints, opts, &mut fastrand::Rng::new(), None).map_err(|e| match e {
                NoDecision::Saturated => RouteError::Saturated {
                    pool: pool.name().to_owned(),
                    reason: e.to_string(),
                    shed: objective.unwrap_or(req.priority) < 0,
                },
                e => e.into(),
            })?;
        // Telling the peers is part of the decision's cost.
        if let Some(c) = &self.cluster {
            c.placed(pool.name(), &snapshot.endpoints[planned.decision.primary().index], &planned.prompt.hashes);
        }
        self.telemetry.decision_seconds.with_label_values(&[pool.name()]).observe(started.elapsed().as_secs_f64());
        if planner.disaggregates() && opts.disaggregate {
            self.telemetry.disagg_decisions.with_label_values(&[pool.name(), planned.decision.kind.as_str()]).inc();
        }
        // Counted in flight before the turn (if it waited for one) lets the next waiter look.
        let routed = Routed::new(pool.clone(), snapshot, planned, req.model.to_string(), req.stream);
        drop(admitted);
        Ok(routed)
    }

    /// The decision kvgate would make for a request placed as `api` (a body) or given as
    /// fields, with every endpoint's scores; sends nothing and records nothing. Returns the pool,
    /// the model and the decision.
    pub fn explain(
        &self,
        api: ApiKind,
        input: Input<'_>,
    ) -> Result<(String, String, Decision, Explanation), RouteError> {
        let req = match input {
            Input::Body(b) => request::parse(api, b, self.max_body_bytes)?,
            Input::Prompt(p) => ParsedRequest::from_fields(p, self.max_body_bytes)?,
        };
        let pool = self.pool_for(&req.model)?;
        let snapshot = pool.snapshot();
        let lora = snapshot.lora(&req.model);
        let disaggregate = req.api.disaggregates();
        let opts = PlanOptions { subset: None, want: 1, now_ms: now_ms(), disaggregate, lora, open: None };
        let mut x = Explanation::default();
        let planned = pool.planner().plan(&req, &snapshot.endpoints, opts, &mut fastrand::Rng::new(), Some(&mut x))?;
        Ok((pool.name().to_owned(), req.model.to_string(), planned.decision, x))
    }
}

/// Whether a request of `priority` may enter a pool in the state `snapshot` shows.
fn admit(
    limits: &Admission,
    pool: &str,
    snapshot: &[Endpoint],
    priority: i64,
    now: u64,
    stale_ms: u64,
) -> Result<(), RouteError> {
    let shed = priority < 0;
    let factor = if shed { 1.0 - limits.sheddable_headroom.unwrap_or(0.2).clamp(0.0, 1.0) } else { 1.0 };
    let over = |value: u64, limit: u64| value as f64 >= limit as f64 * factor;
    if let Some(max) = limits.max_in_flight {
        let n: u64 = snapshot.iter().map(|e| e.in_flight.requests()).sum();
        if over(n, max) {
            let reason = format!("{n} requests in flight, limit {max}");
            return Err(RouteError::Saturated { pool: pool.to_owned(), reason, shed });
        }
    }
    if let Some(max) = limits.max_queued {
        let n: u64 = snapshot.iter().filter_map(|e| e.fresh_metrics(now, stale_ms)).map(|m| u64::from(m.waiting)).sum();
        if over(n, max) {
            let reason = format!("{n} requests queued at endpoints, limit {max}");
            return Err(RouteError::Saturated { pool: pool.to_owned(), reason, shed });
        }
    }
    Ok(())
}
