//! Which priority a request's objective (`x-llm-d-inference-objective`) gives it: the
//! config's `objectives` (global, then the pool's own), overridden by the `InferenceObjective`
//! objects that reference the pool in Kubernetes mode. An unknown or absent objective is
//! priority 0; a negative priority is sheddable.

use std::collections::HashMap;

use parking_lot::RwLock;

/// A pool's objectives, by name.
#[derive(Debug, Default)]
pub struct Objectives {
    /// From the config.
    configured: RwLock<HashMap<String, i64>>,
    /// From the `InferenceObjective` objects watched in Kubernetes (replaced whole by each sync).
    watched: RwLock<HashMap<String, i64>>,
}

impl Objectives {
    /// Objectives as the config names them (later entries win).
    pub fn new(configured: impl IntoIterator<Item = (String, i64)>) -> Self {
        Self { configured: RwLock::new(configured.into_iter().collect()), watched: RwLock::default() }
    }

    /// The priority of a request naming `objective` (0 for none, or one that is not known).
    pub fn priority(&self, objective: Option<&str>) -> i64 {
        let Some(name) = objective.filter(|n| !n.is_empty()) else { return 0 };
        if let Some(p) = self.watched.read().get(name) {
            return *p;
        }
        self.configured.read().get(name).copied().unwrap_or(0)
    }

    /// Replaces the configured objectives.
    pub fn set_configured(&self, objectives: impl IntoIterator<Item = (String, i64)>) {
        *self.configured.write() = objectives.into_iter().collect();
    }

    /// Replaces what Kubernetes says: every `InferenceObjective` referencing the pool, by name,
    /// with its `spec.priority` (0 when unset).
    pub fn set_watched(&self, objectives: HashMap<String, i64>) {
        *self.watched.write() = objectives;
    }

    /// Every known objective and its priority (the watched ones over the configured ones), by
    /// name.
    pub fn all(&self) -> std::collections::BTreeMap<String, i64> {
        let mut out: std::collections::BTreeMap<String, i64> =
            self.configured.read().iter().map(|(k, v)| (k.clone(), *v)).collect();
        out.extend(self.watched.read().iter().map(|(k, v)| (k.clone(), *v)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_objectives_override_configured_ones_and_unknown_is_zero() {
        let o = Objectives::new([("batch".to_owned(), -1), ("chat".to_owned(), 10)]);
        assert_eq!((o.priority(Some("batch")), o.priority(Some("chat"))), (-1, 10));
        assert_eq!((o.priority(None), o.priority(Some("")), o.priority(Some("nope"))), (0, 0, 0));
        o.set_watched(HashMap::from([("chat".to_owned(), 5), ("new".to_owned(), 7)]));
        assert_eq!((o.priority(Some("chat")), o.priority(Some("new")), o.priority(Some("batch"))), (5, 7, -1));
        assert_eq!(o.all().len(), 3);
    }
}
