//! Kubernetes discovery: a pool's endpoints are the Ready pods its `InferencePool` selects.
//!
//! Three watches, no polling: one on the InferencePool (by name), one on the pods its
//! `spec.selector.matchLabels` selects, restarted whenever the selector changes, and one on the
//! `InferenceObjective`s of the namespace, for the pool's flow control ([`objectives`]). Each
//! pod that is Ready, has a `podIP` and is not terminating gives one endpoint per
//! `spec.targetPorts[]` entry (port i = data-parallel rank i when there are several); its labels
//! are the endpoint's labels. Kubernetes is authoritative: the set follows the watch events at
//! once and may become empty.
//!
//! The watches list first, then follow changes; a watch that breaks (an API server restart, a
//! network cut) is resumed with backoff from where it was, and a full relist replaces the set
//! only once it is complete, so known endpoints stay in rotation meanwhile. The pool is ready
//! once the InferencePool and its pods have been listed, and stops being ready if the
//! InferencePool is deleted. A malformed InferencePool or pod is reported (log and
//! `/debug/endpoints`) and skipped: the last good spec stays in force.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use serde_json::Value;

mod objectives;

use super::{Pool, SourceStatus};
use crate::gateway::config::endpoints::{Host, MAX_RANK_PORTS, ResolvedEndpoint};
use crate::gateway::config::{InferencePoolRef, SourceKind, is_label_key, is_label_value};
use crate::routing::endpoint::{ROLE_LABEL, Role};

/// The InferencePool a pool follows, its namespace settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The InferencePool's name.
    pub(crate) name: String,
    /// Its namespace.
    pub(crate) namespace: String,
    /// Its API group (version `v1`).
    pub(crate) group: String,
}

impl Target {
    /// The target `r` names, in `default_namespace` unless it says otherwise.
    pub(crate) fn new(r: &InferencePoolRef, default_namespace: &str) -> Self {
        Self {
            name: r.name.clone(),
            namespace: r.namespace.clone().unwrap_or_else(|| default_namespace.to_owned()),
            group: r.group().to_owned(),
        }
    }

    /// `namespace/name (group/v1)`, as `/debug/endpoints` and logs show it.
    pub(crate) fn describe(&self) -> String {
        format!("{}/{} ({}/v1)", self.namespace, self.name, self.group)
    }

    fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.clone(),
            version: "v1".into(),
            api_version: format!("{}/v1", self.group),
            kind: "InferencePool".into(),
            plural: "inferencepools".into(),
        }
    }
}

/// A client for the API server: from `kubeconfig` when given, else `KUBECONFIG` (or
/// `~/.kube/config`), else the in-cluster service account. Also returns the namespace to use
/// when none is named: the kubeconfig context's, or the pod's own (the service-account mount).
/// Contacts no server: an unreachable one is retried by the watches.
pub(crate) async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<(kube::Client, String)> {
    use anyhow::Context as _;
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes credentials: pass --kubeconfig, set KUBECONFIG, or run in a pod with a service account",
        )?,
    };
    let namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    Ok((client, namespace))
}

/// What an InferencePool's spec says, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    selector: BTreeMap<String, String>,
    ports: Vec<u16>,
}

impl Spec {
    /// The label selector, as the API's `labelSelector` parameter.
    fn selector_string(&self) -> String {
        self.selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }
}

/// Reads the spec of an InferencePool object; the error says what is wrong.
fn parse_spec(data: &Value) -> Result<Spec, String> {
    let spec = data.get("spec").filter(|s| s.is_object()).ok_or("no `spec` object")?;
    let labels = spec
        .pointer("/selector/matchLabels")
        .ok_or("no `spec.selector.matchLabels`")?
        .as_object()
        .ok_or("`spec.selector.matchLabels` is not a map")?;
    if labels.is_empty() {
        return Err("`spec.selector.matchLabels` is empty (it would select every pod)".into());
    }
    let mut selector = BTreeMap::new();
    for (k, v) in labels {
        let v = v.as_str().ok_or_else(|| format!("`spec.selector.matchLabels.{k}` is not a string"))?;
        if !is_label_key(k) || !is_label_value(v) {
            return Err(format!("`{k}: {v}` in `spec.selector.matchLabels` is not a valid label"));
        }
        selector.insert(k.clone(), v.to_owned());
    }
    let entries =
        spec.get("targetPorts").ok_or("no `spec.targetPorts`")?.as_array().ok_or("`spec.targetPorts` is not a list")?;
    if entries.is_empty() || entries.len() > MAX_RANK_PORTS {
        return Err(format!("`spec.targetPorts` needs 1 to {MAX_RANK_PORTS} entries, has {}", entries.len()));
    }
    let mut ports = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let port = e
            .get("number")
            .and_then(Value::as_u64)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("`spec.targetPorts[{i}].number` is not a port number (1-65535)"))?;
        if ports.contains(&port) {
            return Err(format!("port {port} appears twice in `spec.targetPorts`"));
        }
        ports.push(port);
    }
    Ok(Spec { selector, ports })
}

/// What discovery keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodView {
    labels: BTreeMap<String, String>,
    /// The pod's IP while it is Ready and not terminating.
    serving: Option<IpAddr>,
    /// Why the pod cannot be an endpoint although it looks Ready.
    problem: Option<String>,
}

impl PodView {
    fn of(pod: &Pod) -> Self {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let finished = status.and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
        let live = ready && !finished && pod.metadata.deletion_timestamp.is_none();
        let ip = status.and_then(|s| s.pod_ip.as_deref()).filter(|ip| !ip.is_empty());
        let mut problem = None;
        let serving = match (live, ip) {
            (true, Some(ip)) => match ip.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    problem = Some(format!("`status.podIP` {ip:?} is not an IP address"));
                    None
                }
            },
            _ => None,
        };
        if let Some(v) = labels.get(ROLE_LABEL).filter(|v| Role::from_label(v).is_none()) {
            problem = Some(format!("label `{ROLE_LABEL}: {v}` is not a role (prefill, decode or both)"));
        }
        let serving = if problem.is_some() { None } else { serving };
        Self { labels, serving, problem }
    }
}

type Events<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

/// The discovery state of one pool.
#[derive(Debug, Default)]
struct State {
    /// The InferencePool's first list is done.
    pool_listed: bool,
    /// The object seen during a relist of the InferencePool.
    pool_relist: Option<Option<DynamicObject>>,
    /// The last good spec, while the InferencePool exists.
    spec: Option<Spec>,
    /// The pods, by name (as of the last complete list plus the changes since).
    pods: BTreeMap<String, PodView>,
    /// The pods seen so far during a relist.
    pods_relist: Option<BTreeMap<String, PodView>>,
    /// The pod watch's first list for the current selector is done.
    pods_listed: bool,
    /// The problem of the InferencePool itself, if any.
    pool_error: Option<String>,
    /// The last error of each watch (InferencePool, pods) and when it happened; shown for a
    /// minute after its last repeat, since a watch that resumes quietly sends no event.
    watch_errors: [Option<(String, std::time::Instant)>; 2],
    /// Pods reported as malformed (name → why), so each is logged once.
    skipped: BTreeMap<String, String>,
    /// The endpoint set last handed to the pool.
    published: Option<(Vec<ResolvedEndpoint>, bool)>,
    /// The InferenceObjectives referencing the pool.
    objectives: objectives::Watch,
}

impl State {
    /// The endpoints the current spec and pods give, in pod-name order.
    fn endpoints(&self) -> Vec<ResolvedEndpoint> {
        let Some(spec) = &self.spec else { return Vec::new() };
        let mut out = Vec::new();
        for (name, pod) in &self.pods {
            let Some(ip) = pod.serving else { continue };
            if !spec.selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)) {
                continue;
            }
            let ranked = spec.ports.len() > 1;
            for (rank, &port) in spec.ports.iter().enumerate() {
                out.push(ResolvedEndpoint {
                    name: if ranked { format!("{name}-rank-{rank}") } else { name.clone() },
                    host: Host::Ip(ip),
                    port,
                    rank: ranked.then_some(rank as u32),
                    rank_header: false,
                    labels: pod.labels.clone(),
                });
            }
        }
        out
    }

    /// Whether everything has been listed.
    fn synced(&self) -> bool {
        self.pool_listed && self.spec.is_some() && self.pods_listed
    }
}

/// Keeps `pool`'s endpoints in line with the InferencePool `target` and its pods until the
/// pool is dropped.
pub(crate) async fn run(pool: Pool, client: kube::Client, target: Target) {
    let what = target.describe();
    pool.set_source(SourceStatus { kind: SourceKind::Kubernetes, from: Some(what.clone()), ..SourceStatus::default() });
    let pools: Api<DynamicObject> = Api::namespaced_with(client.clone(), &target.namespace, &target.resource());
    let objective_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &target.namespace, &objectives::resource());
    let pods: Api<Pod> = Api::namespaced(client, &target.namespace);
    let by_name = watcher::Config::default().fields(&format!("metadata.name={}", target.name));
    let mut pool_events: Events<DynamicObject> = Box::pin(watcher(pools, by_name).default_backoff());
    let mut objective_events: Events<DynamicObject> =
        Box::pin(watcher(objective_api, watcher::Config::default()).default_backoff());
    let mut pod_events: Option<Events<Pod>> = None;
    let mut st = State::default();
    loop {
        let next_pod = async {
            match pod_events.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = pool_events.next() => match ev {
                None => return,
                Some(Ok(ev)) => {
                    st.watch_errors[POOL_WATCH] = None;
                    if let Some(restart) = on_pool_event(&mut st, ev, &what) {
                        pod_events = restart.map(|selector| {
                            let cfg = watcher::Config::default().labels(&selector);
                            Box::pin(watcher(pods.clone(), cfg).default_backoff()) as Events<Pod>
                        });
                    }
                }
                Some(Err(e)) => watch_failed(&mut st, &what, POOL_WATCH, &e),
            },
            Some(ev) = next_pod => match ev {
                Ok(ev) => {
                    st.watch_errors[POD_WATCH] = None;
                    on_pod_event(&mut st, ev, &what);
                }
                Err(e) => watch_failed(&mut st, &what, POD_WATCH, &e),
            },
            ev = objective_events.next() => match ev {
                None => return,
                Some(Ok(ev)) => st.objectives.on_event(ev, &target, &what),
                Some(Err(e)) => st.objectives.watch_failed(&e, &what),
            },
        }
        st.objectives.publish(&pool);
        publish(&pool, &mut st);
    }
}

const POOL_WATCH: usize = 0;
const POD_WATCH: usize = 1;
/// How long a watch error stays in `/debug/endpoints` after its last repeat.
const ERROR_SHOWN: std::time::Duration = std::time::Duration::from_secs(60);

fn watch_failed(st: &mut State, what: &str, watch: usize, e: &watcher::Error) {
    let object = if watch == POOL_WATCH { "the InferencePool" } else { "its pods" };
    let mut message = format!("watching {object}: {}", crate::gateway::error::error_chain(e));
    let text = message.to_ascii_lowercase();
    if watch == POOL_WATCH && (text.contains("404") || text.contains("not found")) {
        message.push_str(" (is the InferencePool CRD, version v1 of this group, installed?)");
    }
    let repeat = st.watch_errors[watch].as_ref().is_some_and(|(m, _)| *m == message);
    // An expired resource version (410) is routine: the watch lists again.
    let routine = text.contains("410") || text.contains("expired");
    if routine {
        tracing::debug!(inference_pool = what, error = %message, "Kubernetes watch expired; listing again");
    } else if !repeat {
        tracing::warn!(inference_pool = what, error = %message, "Kubernetes watch failed; retrying with backoff, endpoints kept");
    }
    if !routine {
        st.watch_errors[watch] = Some((message, std::time::Instant::now()));
    }
}

/// Applies an InferencePool event. Returns `Some(new pod selector)` when the pod watch must
/// restart (`Some(None)`: stop it).
fn on_pool_event(st: &mut State, ev: Event<DynamicObject>, what: &str) -> Option<Option<String>> {
    let seen = match ev {
        Event::Init => {
            st.pool_relist = Some(None);
            return None;
        }
        Event::InitApply(obj) => {
            st.pool_relist = Some(Some(obj));
            return None;
        }
        Event::InitDone => {
            st.pool_listed = true;
            st.pool_relist.take().flatten()
        }
        Event::Apply(obj) => Some(obj),
        Event::Delete(_) => None,
    };
    let Some(obj) = seen else {
        if st.spec.is_some() || st.pool_error.is_none() {
            tracing::warn!(inference_pool = what, "InferencePool not found; the pool has no endpoints until it exists");
        }
        st.spec = None;
        st.pods.clear();
        st.pods_relist = None;
        st.skipped.clear();
        st.pods_listed = false;
        st.watch_errors[POD_WATCH] = None;
        st.pool_error = Some("the InferencePool does not exist".into());
        return Some(None);
    };
    match parse_spec(&obj.data) {
        Ok(spec) => {
            st.pool_error = None;
            let restart = st.spec.as_ref().is_none_or(|old| old.selector != spec.selector);
            if st.spec.as_ref() != Some(&spec) {
                tracing::info!(inference_pool = what, selector = %spec.selector_string(), ports = ?spec.ports, "InferencePool spec in force");
            }
            let selector = spec.selector_string();
            st.spec = Some(spec);
            if restart {
                st.pods.clear();
                st.pods_relist = None;
                st.skipped.clear();
                st.pods_listed = false;
                st.watch_errors[POD_WATCH] = None;
                return Some(Some(selector));
            }
            None
        }
        Err(why) => {
            let message = format!("malformed InferencePool: {why}");
            if st.pool_error.as_deref() != Some(message.as_str()) {
                tracing::error!(inference_pool = what, error = %message, keeps = st.spec.is_some(), "InferencePool skipped; the last good spec (if any) stays in force");
            }
            st.pool_error = Some(message);
            None
        }
    }
}

fn on_pod_event(st: &mut State, ev: Event<Pod>, what: &str) {
    let note = |st: &mut State, name: &str, view: &PodView| match &view.problem {
        Some(p) if st.skipped.get(name) != Some(p) => {
            tracing::error!(inference_pool = what, pod = name, error = %p, "pod skipped");
            st.skipped.insert(name.to_owned(), p.clone());
        }
        Some(_) => {}
        None => {
            st.skipped.remove(name);
        }
    };
    match ev {
        Event::Init => st.pods_relist = Some(BTreeMap::new()),
        Event::InitApply(pod) => {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let view = PodView::of(&pod);
            note(st, &name, &view);
            st.pods_relist.get_or_insert_default().insert(name, view);
        }
        Event::InitDone => {
            st.pods = st.pods_relist.take().unwrap_or_default();
            let names: HashSet<&String> = st.pods.keys().collect();
            st.skipped.retain(|n, _| names.contains(n));
            st.pods_listed = true;
        }
        Event::Apply(pod) => {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let view = PodView::of(&pod);
            note(st, &name, &view);
            st.pods.insert(name, view);
        }
        Event::Delete(pod) => {
            let name = pod.metadata.name.clone().unwrap_or_default();
            st.skipped.remove(&name);
            st.pods.remove(&name);
        }
    }
}

/// Hands the pool its endpoints when they (or readiness) changed, and refreshes the status.
fn publish(pool: &Pool, st: &mut State) {
    let synced = st.synced();
    let recent = |e: &Option<(String, std::time::Instant)>| {
        e.as_ref().filter(|(_, at)| at.elapsed() < ERROR_SHOWN).map(|(m, _)| m.clone())
    };
    let last_error = st
        .pool_error
        .clone()
        .or_else(|| recent(&st.watch_errors[POOL_WATCH]))
        .or_else(|| recent(&st.watch_errors[POD_WATCH]));
    pool.update_source(|s| {
        s.synced = synced;
        s.last_error = last_error;
        s.skipped =
            st.skipped.iter().map(|(n, why)| format!("pod {n}: {why}")).chain(st.objectives.skipped()).collect();
    });
    // Until the pods are listed, the last set stands (no flap to empty on a selector change);
    // during a relist, nothing is recomputed until it is complete.
    let settled = synced || (st.pool_listed && st.spec.is_none());
    if !settled || st.pods_relist.is_some() || st.pool_relist.is_some() {
        return;
    }
    let endpoints = st.endpoints();
    let next = (endpoints, synced);
    if st.published.as_ref() != Some(&next) {
        tracing::info!(pool = pool.name(), endpoints = next.0.len(), ready = synced, "Kubernetes endpoints updated");
        pool.set_endpoints_synced(next.0.clone(), synced);
        st.published = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn specs_are_checked() {
        let ok = json!({"spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 8000}, {"number": 8001}]}});
        assert_eq!(
            parse_spec(&ok),
            Ok(Spec { selector: [("app".into(), "vllm".into())].into(), ports: vec![8000, 8001] })
        );
        let bad = [
            (json!({}), "no `spec`"),
            (json!({"spec": {"targetPorts": [{"number": 1}]}}), "matchLabels"),
            (json!({"spec": {"selector": {"matchLabels": []}, "targetPorts": [{"number": 1}]}}), "not a map"),
            (json!({"spec": {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 1}]}}), "empty"),
            (
                json!({"spec": {"selector": {"matchLabels": {"app": 3}}, "targetPorts": [{"number": 1}]}}),
                "not a string",
            ),
            (
                json!({"spec": {"selector": {"matchLabels": {"a,b": "c"}}, "targetPorts": [{"number": 1}]}}),
                "not a valid label",
            ),
            (json!({"spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": "8000"}}), "not a list"),
            (json!({"spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": []}}), "1 to 8"),
            (
                json!({"spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": "80"}]}}),
                "not a port",
            ),
            (
                json!({"spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 70000}]}}),
                "not a port",
            ),
            (
                json!({"spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 1}, {"number": 1}]}}),
                "twice",
            ),
        ];
        for (data, why) in bad {
            let e = parse_spec(&data).expect_err(&data.to_string());
            assert!(e.contains(why), "{data}: {e}");
        }
        let nine: Vec<Value> = (1..=9).map(|n| json!({"number": 8000 + n})).collect();
        let e = parse_spec(&json!({"spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": nine}}));
        assert!(e.expect_err("nine ports").contains("has 9"));
    }
}
