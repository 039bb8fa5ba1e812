//! The checks of one pool's entry: its name, endpoint source, models (each served by one pool),
//! admission, flow control and objectives.

use std::collections::{BTreeMap, HashSet};

use super::{ConfigError, Invalid, PoolConfig, flow};

/// Checks a pool's name, endpoint source, models (each served by one pool) and admission.
pub(super) fn check_pool<'c>(
    pool: &'c PoolConfig,
    at: &dyn Fn(&str) -> String,
    names: &mut HashSet<&'c str>,
    model_owner: &mut BTreeMap<&'c str, &'c str>,
    invalid: &Invalid<'_>,
) -> Result<(), ConfigError> {
    if pool.name.trim().is_empty() {
        return Err(invalid(at("name"), "a pool needs a name".into()));
    }
    if !names.insert(pool.name.as_str()) {
        return Err(invalid(at("name"), format!("two pools are named `{}`", pool.name)));
    }
    if let Some(r) = &pool.inference_pool {
        if !pool.endpoints.is_empty() || pool.endpoints_file.is_some() {
            return Err(invalid(
                at("inference_pool"),
                "a pool's endpoints come from `inference_pool` or from `endpoints`/`endpoints_file`, not both".into(),
            ));
        }
        if let Some((field, message)) = r.problem() {
            return Err(invalid(at(&format!("inference_pool.{field}")), message));
        }
    } else if pool.models.is_empty() {
        return Err(invalid(
            at("models"),
            "a pool must serve at least one model (only an `inference_pool` pool may learn them from its endpoints)"
                .into(),
        ));
    }
    for (m, model) in pool.models.iter().enumerate() {
        if model.is_empty() {
            return Err(invalid(at(&format!("models[{m}]")), "empty model name".into()));
        }
        if let Some(other) = model_owner.insert(model, &pool.name) {
            return Err(invalid(
                at(&format!("models[{m}]")),
                format!("model `{model}` is also served by pool `{other}`; each model routes to one pool"),
            ));
        }
    }
    if let Some(message) = pool.admission.problem() {
        return Err(invalid(at("admission"), message));
    }
    if let Some((key, message)) = pool.flow_control.as_ref().and_then(flow::FlowControlConfig::problem) {
        return Err(invalid(at(&format!("flow_control.{key}")), message));
    }
    if let Some(message) = flow::objectives_problem(&pool.objectives) {
        return Err(invalid(at("objectives"), message));
    }
    Ok(())
}
