//! The `InferenceObjective` objects (`inference.networking.x-k8s.io/v1alpha2`) that reference
//! a pool's InferencePool: each names an objective (its `metadata.name`, what requests put in
//! `x-llm-d-inference-objective`) and gives it `spec.priority` (0 when unset). They override
//! the config's `objectives:` for that pool.
//!
//! A third watch beside the InferencePool's and the pods', in the same namespace. A relist
//! replaces the set only once complete; a malformed object is reported once and skipped,
//! never affecting the others. The CRD is optional: while it is not installed (a 404), the
//! watch retries with its backoff, objectives come from the config only, and nothing about
//! the pool's endpoints or readiness depends on it.

use std::collections::{BTreeMap, HashMap};

use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use serde_json::Value;

use super::super::Pool;
use super::Target;

/// The default `spec.poolRef.group`.
const POOL_GROUP: &str = "inference.networking.k8s.io";
/// The only `spec.poolRef.kind` kvgate follows (and the default).
const POOL_KIND: &str = "InferencePool";

/// The `InferenceObjective` resource.
pub(super) fn resource() -> ApiResource {
    ApiResource {
        group: "inference.networking.x-k8s.io".into(),
        version: "v1alpha2".into(),
        api_version: "inference.networking.x-k8s.io/v1alpha2".into(),
        kind: "InferenceObjective".into(),
        plural: "inferenceobjectives".into(),
    }
}

/// What an `InferenceObjective` says for the pool `target`: `Ok(Some(priority))` when it
/// references it, `Ok(None)` when it references another pool, else why it is malformed.
fn parse(data: &Value, target: &Target) -> Result<Option<i64>, String> {
    let spec = data.get("spec").filter(|s| s.is_object()).ok_or("no `spec` object")?;
    let pool_ref = spec.get("poolRef").ok_or("no `spec.poolRef`")?;
    if !pool_ref.is_object() {
        return Err("`spec.poolRef` is not an object".into());
    }
    let field = |key: &str, default: &'static str| -> Result<String, String> {
        match pool_ref.get(key) {
            None | Some(Value::Null) => Ok(default.to_owned()),
            Some(Value::String(s)) if s.is_empty() => Ok(default.to_owned()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("`spec.poolRef.{key}` is not a string")),
        }
    };
    let name = field("name", "")?;
    if name.is_empty() {
        return Err("no `spec.poolRef.name`".into());
    }
    let (group, kind) = (field("group", POOL_GROUP)?, field("kind", POOL_KIND)?);
    if name != target.name || group != target.group || kind != POOL_KIND {
        return Ok(None);
    }
    match spec.get("priority") {
        None | Some(Value::Null) => Ok(Some(0)),
        Some(p) => p
            .as_i64()
            .filter(|p| i32::try_from(*p).is_ok())
            .map(Some)
            .ok_or_else(|| format!("`spec.priority` {p} is not an integer (int32)")),
    }
}

/// The watch's state for one pool.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// The objectives referencing the pool, by name, as of the last complete list plus the
    /// changes since.
    objectives: BTreeMap<String, i64>,
    /// Every object seen so far during a relist, with its priority when it references the
    /// pool.
    relist: Option<BTreeMap<String, Option<i64>>>,
    /// Objects reported as malformed (name → why), so each is logged once per problem.
    skipped: BTreeMap<String, String>,
    /// The last watch error logged (a repeat is not logged again until the watch delivers).
    logged_error: Option<String>,
    /// The map last handed to the pool (empty at first, as the pool's is).
    published: HashMap<String, i64>,
}

impl Watch {
    /// Applies one watch event.
    pub(super) fn on_event(&mut self, ev: Event<DynamicObject>, target: &Target, what: &str) {
        self.logged_error = None;
        match ev {
            Event::Init => self.relist = Some(BTreeMap::new()),
            Event::InitApply(obj) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                let p = self.check(&name, &obj, target, what);
                self.relist.get_or_insert_default().insert(name, p);
            }
            Event::InitDone => {
                let seen = self.relist.take().unwrap_or_default();
                // A malformed object that is gone is no longer reported.
                self.skipped.retain(|n, _| seen.contains_key(n));
                self.objectives = seen.into_iter().filter_map(|(n, p)| Some((n, p?))).collect();
            }
            Event::Apply(obj) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                match self.check(&name, &obj, target, what) {
                    Some(p) => self.objectives.insert(name, p),
                    None => self.objectives.remove(&name),
                };
            }
            Event::Delete(obj) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                self.skipped.remove(&name);
                self.objectives.remove(&name);
            }
        }
    }

    /// The object's priority when it references the pool and is well-formed; reports it (once
    /// per problem) when malformed.
    fn check(&mut self, name: &str, obj: &DynamicObject, target: &Target, what: &str) -> Option<i64> {
        match parse(&obj.data, target) {
            Ok(p) => {
                self.skipped.remove(name);
                p
            }
            Err(why) => {
                if self.skipped.get(name) != Some(&why) {
                    tracing::warn!(inference_pool = what, objective = name, error = %why, "InferenceObjective skipped");
                    self.skipped.insert(name.to_owned(), why);
                }
                None
            }
        }
    }

    /// Logs a watch error once (until the watch delivers again); a missing CRD is expected and
    /// said plainly. The objectives known so far stay in force.
    pub(super) fn watch_failed(&mut self, e: &watcher::Error, what: &str) {
        let missing = match e {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
            _ => false,
        };
        let message = if missing {
            "not installed".to_owned()
        } else {
            format!("watching InferenceObjectives: {}", crate::gateway::error::error_chain(e))
        };
        if self.logged_error.as_ref() == Some(&message) {
            return;
        }
        let text = message.to_ascii_lowercase();
        if missing {
            tracing::info!(
                inference_pool = what,
                "InferenceObjective CRD not installed: objectives come from the config only"
            );
        } else if text.contains("410") || text.contains("expired") {
            tracing::debug!(inference_pool = what, error = %message, "InferenceObjective watch expired; listing again");
        } else {
            tracing::warn!(inference_pool = what, error = %message, "InferenceObjective watch failed; retrying with backoff, objectives kept");
        }
        self.logged_error = Some(message);
    }

    /// Malformed objects, as `/debug/endpoints` lists them.
    pub(super) fn skipped(&self) -> impl Iterator<Item = String> + '_ {
        self.skipped.iter().map(|(n, why)| format!("InferenceObjective {n}: {why}"))
    }

    /// Hands the pool the objectives when they changed (never during a relist).
    pub(super) fn publish(&mut self, pool: &Pool) {
        if self.relist.is_some() {
            return;
        }
        let next: HashMap<String, i64> = self.objectives.iter().map(|(k, v)| (k.clone(), *v)).collect();
        if self.published != next {
            tracing::info!(pool = pool.name(), objectives = ?self.objectives, "InferenceObjectives updated");
            pool.flow().objectives().set_watched(next.clone());
            self.published = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(data: Value, want: Result<Option<i64>, &str>) {
        let target = Target { name: "vllm".into(), namespace: "ns".into(), group: POOL_GROUP.into() };
        match (parse(&data, &target), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{data}"),
            (Err(e), Err(why)) => assert!(e.contains(why), "{data}: {e}"),
            (got, want) => panic!("{data}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn specs_are_read_and_pool_refs_matched() {
        let cases = [
            (json!({"spec": {"priority": 10, "poolRef": {"name": "vllm"}}}), Ok(Some(10))),
            (json!({"spec": {"priority": -1, "poolRef": {"name": "vllm"}}}), Ok(Some(-1))),
            (json!({"spec": {"poolRef": {"name": "vllm"}}}), Ok(Some(0))),
            (json!({"spec": {"priority": null, "poolRef": {"name": "vllm"}}}), Ok(Some(0))),
            (
                json!({"spec": {"priority": 3, "poolRef": {"name": "vllm", "group": POOL_GROUP, "kind": "InferencePool"}}}),
                Ok(Some(3)),
            ),
            (json!({"spec": {"priority": 3, "poolRef": {"name": "vllm", "group": "", "kind": ""}}}), Ok(Some(3))),
            // Another pool: by name, group or kind (its priority is not even read).
            (json!({"spec": {"priority": 3, "poolRef": {"name": "other"}}}), Ok(None)),
            (json!({"spec": {"priority": "x", "poolRef": {"name": "other"}}}), Ok(None)),
            (json!({"spec": {"poolRef": {"name": "vllm", "group": "inference.networking.x-k8s.io"}}}), Ok(None)),
            (json!({"spec": {"poolRef": {"name": "vllm", "kind": "Service"}}}), Ok(None)),
            // Malformed.
            (json!({}), Err("no `spec`")),
            (json!({"spec": "x"}), Err("no `spec`")),
            (json!({"spec": {"priority": 1}}), Err("no `spec.poolRef`")),
            (json!({"spec": {"poolRef": "vllm"}}), Err("not an object")),
            (json!({"spec": {"poolRef": {}}}), Err("no `spec.poolRef.name`")),
            (json!({"spec": {"poolRef": {"name": 7}}}), Err("`spec.poolRef.name` is not a string")),
            (json!({"spec": {"poolRef": {"name": "vllm", "group": 1}}}), Err("`spec.poolRef.group`")),
            (json!({"spec": {"priority": "high", "poolRef": {"name": "vllm"}}}), Err("not an integer")),
            (json!({"spec": {"priority": 1.5, "poolRef": {"name": "vllm"}}}), Err("not an integer")),
            (json!({"spec": {"priority": 3000000000u64, "poolRef": {"name": "vllm"}}}), Err("not an integer")),
        ];
        for (data, want) in cases {
            check(data, want);
        }
    }

    fn object(name: &str, version: &str, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
            "metadata": {"name": name, "resourceVersion": version}, "spec": spec,
        }))
        .expect("object")
    }

    #[test]
    fn a_relist_replaces_the_set_once_complete_and_bad_objects_are_skipped() {
        let target = Target { name: "vllm".into(), namespace: "ns".into(), group: POOL_GROUP.into() };
        let mut w = Watch::default();
        let on = |w: &mut Watch, ev| w.on_event(ev, &target, "ns/vllm");
        on(&mut w, Event::Apply(object("a", "1", json!({"priority": 1, "poolRef": {"name": "vllm"}}))));
        on(&mut w, Event::Apply(object("b", "2", json!({"priority": "x", "poolRef": {"name": "vllm"}}))));
        assert_eq!(w.objectives, BTreeMap::from([("a".to_owned(), 1)]));
        assert_eq!(w.skipped().count(), 1);
        on(&mut w, Event::Init);
        on(&mut w, Event::InitApply(object("c", "3", json!({"priority": 2, "poolRef": {"name": "vllm"}}))));
        assert_eq!(w.objectives, BTreeMap::from([("a".to_owned(), 1)]), "unchanged until the relist is done");
        on(&mut w, Event::InitDone);
        assert_eq!(w.objectives, BTreeMap::from([("c".to_owned(), 2)]));
        assert_eq!(w.skipped().count(), 0, "the malformed object is gone");
        // A good object turned bad is dropped; fixed, it is back.
        on(&mut w, Event::Apply(object("c", "4", json!({"priority": [], "poolRef": {"name": "vllm"}}))));
        assert!(w.objectives.is_empty());
        on(&mut w, Event::Apply(object("c", "5", json!({"priority": 4, "poolRef": {"name": "vllm"}}))));
        assert_eq!((w.objectives.get("c"), w.skipped().count()), (Some(&4), 0));
        on(&mut w, Event::Delete(object("c", "6", json!({}))));
        assert!(w.objectives.is_empty());
    }
}
