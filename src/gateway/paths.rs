//! The path policy: which request paths the gateway routes, and how, in every front-end. An API
//! path kvgate parses is placed by its prompt; a path listed as `model` is sent to an endpoint
//! of its body's `model` by load alone; everything else — a model server's admin surface
//! included — is refused, so it is not reachable through the gateway unless opened on purpose.

pub use crate::gateway::config::PathsConfig;
use crate::gateway::config::pattern_parts;
use crate::routing::request::ApiKind;

/// How a routed request is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// By its prompt, parsed as this API.
    Prompt(ApiKind),
    /// By its body's `model`, on load alone.
    Model,
    /// `GET /version`: to an endpoint of the first pool with a healthy one, by load alone (the
    /// answer is a model server's own).
    AnyEndpoint,
}

/// What a request's method and path ask of the gateway — the same answer in every front-end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Route it, placed so.
    Route(Place),
    /// `GET /v1/models`: the gateway answers with every servable model itself.
    Models,
    /// `GET /v1/models/{id}`: the gateway answers with that model's entry, or a 404.
    ModelInfo,
    /// `GET /health`: the gateway answers 200 while some pool has a healthy endpoint.
    Health,
    /// A routed path with a method it does not take: a 405 naming the one it does.
    MethodNotAllowed(&'static str),
    /// Nothing here: a 404.
    NotFound,
}

/// The answer to a path the policy refuses, the same from every front-end: 404, or 405 naming
/// the method the path takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRefusal {
    /// 404 or 405.
    pub status: u16,
    /// `not_found` or `method_not_allowed`.
    pub code: &'static str,
    /// What the client is told.
    pub message: String,
    /// For a 405, the `Allow` header.
    pub allow: Option<&'static str>,
}

impl PathRefusal {
    /// The 404 of `method` on `path` (its query string left out).
    pub fn not_found(method: &str, path: &str) -> Self {
        let message = format!("no route for {method} {}", without_query(path));
        Self { status: 404, code: "not_found", message, allow: None }
    }

    /// The 405 of `method` on `path`, naming the method it takes when known.
    pub fn method_not_allowed(method: &str, path: &str, allow: Option<&'static str>) -> Self {
        let mut message = format!("{method} is not allowed on {}", without_query(path));
        if let Some(a) = allow {
            message.push_str(&format!("; use {a}"));
        }
        Self { status: 405, code: "method_not_allowed", message, allow }
    }
}

#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, String> {
        let (body, prefix) = pattern_parts(text)?;
        Ok(if prefix { Self::Prefix(body.to_owned()) } else { Self::Exact(normal(body).to_owned()) })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => p == path,
            // `/p/*` covers `/p` itself too.
            Self::Prefix(p) => path.starts_with(p.as_str()) || p.strip_suffix('/') == Some(path),
        }
    }
}

/// `path` without its query string.
fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// `path` without its query string and trailing `/`s (`/` itself stays).
fn normal(path: &str) -> &str {
    let path = without_query(path);
    match path.trim_end_matches('/') {
        "" if path.starts_with('/') => "/",
        p => p,
    }
}

/// A path that a model server could read as another one than it spells: percent-encoding,
/// empty, `.` or `..` segments, `;` parameters, a backslash. Such a path is refused rather
/// than matched, so no spelling of a refused path gets through.
fn ambiguous(path: &str) -> bool {
    !path.starts_with('/')
        || path.contains(['%', ';', '\\'])
        || path.split('/').skip(1).any(|seg| seg.is_empty() || seg == "." || seg == "..")
}

/// The compiled policy.
#[derive(Debug, Clone)]
pub struct PathPolicy {
    prompt: Vec<ApiKind>,
    model: Vec<Pattern>,
    refuse: Vec<Pattern>,
}

impl Default for PathPolicy {
    fn default() -> Self {
        Self::new(&PathsConfig::default()).expect("the default path policy is valid")
    }
}

impl PathPolicy {
    /// Compiles `cfg`, or says (as `(field, message)`) what is wrong with it.
    pub fn new(cfg: &PathsConfig) -> Result<Self, (&'static str, String)> {
        if let Some(problem) = cfg.problem() {
            return Err(problem);
        }
        let prompt = cfg.prompt.iter().filter_map(|p| ApiKind::from_path(p)).collect();
        let patterns = |field: &'static str, list: &[String]| -> Result<Vec<Pattern>, (&'static str, String)> {
            list.iter().map(|p| Pattern::parse(p).map_err(|m| (field, m))).collect()
        };
        Ok(Self { prompt, model: patterns("paths.model", &cfg.model)?, refuse: patterns("paths.refuse", &cfg.refuse)? })
    }

    /// The ask of `method` on `path`.
    pub fn ask(&self, method: &str, path: &str) -> Ask {
        let path = normal(path);
        // kvgate's own answers take HEAD too (the headers of the GET, no body).
        let own = |ask: Ask| if matches!(method, "GET" | "HEAD") { ask } else { Ask::MethodNotAllowed("GET, HEAD") };
        let get = |ask: Ask| if method == "GET" { ask } else { Ask::MethodNotAllowed("GET") };
        // A model id may hold `/` or be percent-encoded: the gateway answers it itself (nothing
        // is forwarded), so only the prefix must be plain.
        if path.starts_with("/v1/models/") {
            let Some(id) = model_id(path) else { return Ask::NotFound };
            let spelled = format!("/v1/models/{id}");
            let refused = self.refuse.iter().any(|p| p.matches("/v1/models") || p.matches(&spelled));
            return if refused { Ask::NotFound } else { own(Ask::ModelInfo) };
        }
        if ambiguous(path) || self.refuse.iter().any(|p| p.matches(path)) {
            return Ask::NotFound;
        }
        match path {
            "/v1/models" => return own(Ask::Models),
            "/health" => return own(Ask::Health),
            "/version" => return get(Ask::Route(Place::AnyEndpoint)),
            _ => {}
        }
        let place = match ApiKind::from_path(path) {
            Some(api) if self.prompt.contains(&api) => Some(Place::Prompt(api)),
            _ if self.model.iter().any(|p| p.matches(path)) => Some(Place::Model),
            _ => None,
        };
        match place {
            Some(place) if method == "POST" => Ask::Route(place),
            Some(_) => Ask::MethodNotAllowed("POST"),
            None => Ask::NotFound,
        }
    }
}

/// The model id of a `/v1/models/{id}` path, percent-decoded (`None` when it is no such path
/// or does not decode to UTF-8).
pub fn model_id(path: &str) -> Option<String> {
    let raw = normal(path).strip_prefix("/v1/models/").filter(|id| !id.is_empty())?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut k = 0;
    while k < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[k], bytes.get(k + 1).copied().and_then(hex), bytes.get(k + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                k += 3;
            }
            (b, ..) => {
                out.push(b);
                k += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Result<PathPolicy, (&'static str, String)> {
        PathPolicy::new(&serde_saphyr::from_str::<PathsConfig>(yaml).expect("yaml"))
    }

    #[test]
    fn the_default_routes_the_serving_apis_and_refuses_the_rest() {
        let p = PathPolicy::default();
        assert_eq!(p.ask("POST", "/v1/chat/completions?x=1"), Ask::Route(Place::Prompt(ApiKind::ChatCompletions)));
        assert_eq!(p.ask("POST", "/v1/completions/"), Ask::Route(Place::Prompt(ApiKind::Completions)));
        assert_eq!(p.ask("POST", "/tokenize"), Ask::Route(Place::Model));
        assert_eq!(p.ask("GET", "/v1/completions"), Ask::MethodNotAllowed("POST"));
        assert_eq!(p.ask("GET", "/v1/models"), Ask::Models);
        assert_eq!(p.ask("POST", "/v1/models"), Ask::MethodNotAllowed("GET, HEAD"));
        assert_eq!(p.ask("HEAD", "/v1/models"), Ask::Models);
        assert_eq!(p.ask("GET", "/health"), Ask::Health);
        assert_eq!(p.ask("HEAD", "/health"), Ask::Health);
        assert_eq!(p.ask("POST", "/health"), Ask::MethodNotAllowed("GET, HEAD"));
        assert_eq!(p.ask("HEAD", "/version"), Ask::MethodNotAllowed("GET"));
        assert_eq!(p.ask("GET", "/version"), Ask::Route(Place::AnyEndpoint));
        assert_eq!(p.ask("GET", "/v1/models/meta-llama/Llama-3.1-8B"), Ask::ModelInfo);
        assert_eq!(p.ask("GET", "/v1/models/meta-llama%2FLlama-3.1-8B"), Ask::ModelInfo);
        assert_eq!(p.ask("DELETE", "/v1/models/x"), Ask::MethodNotAllowed("GET, HEAD"));
        assert_eq!(model_id("/v1/models/meta-llama%2FLlama-3.1-8B"), Some("meta-llama/Llama-3.1-8B".into()));
        assert_eq!(model_id("/v1/models/a/b/?x=1"), Some("a/b".into()));
        assert_eq!(model_id("/v1/models/%ff"), None);
        assert_eq!(model_id("/v1/models/"), None);
        for admin in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/reset_prefix_cache", "/admin/faults"] {
            assert_eq!(p.ask("POST", admin), Ask::NotFound, "{admin}");
        }
        for other in ["/metrics", "/", "", "/v1/anything", "/tokenizer"] {
            assert_eq!(p.ask("GET", other), Ask::NotFound, "{other}");
        }
    }

    #[test]
    fn a_config_opens_and_closes_paths() {
        let p = policy("model: ['/v1/load_lora_adapter', '/v1/audio/*']\nrefuse: ['/v1/audio/secret', /v1/embeddings]")
            .expect("valid");
        assert_eq!(p.ask("POST", "/v1/load_lora_adapter"), Ask::Route(Place::Model));
        assert_eq!(p.ask("POST", "/v1/audio/transcriptions"), Ask::Route(Place::Model));
        assert_eq!(p.ask("POST", "/v1/audio/secret"), Ask::NotFound);
        // No other spelling of a refused path gets through.
        for spelling in [
            "/v1/audio/%73ecret",
            "/v1/audio/secret//",
            "/v1/audio//secret",
            "/v1/audio/./secret",
            "/v1/audio/x/../secret",
            "/v1/audio/secret;x",
            "/v1/audio\\secret",
            "v1/audio/secret",
        ] {
            assert_eq!(p.ask("POST", spelling), Ask::NotFound, "{spelling}");
        }
        assert_eq!(p.ask("POST", "/v1/audio/translations///"), Ask::Route(Place::Model));
        let q = policy("model: ['/v1/x/*']\nrefuse: ['/v1/x/admin/*']").expect("valid");
        assert_eq!(q.ask("POST", "/v1/x"), Ask::Route(Place::Model), "a prefix covers its own folder");
        assert_eq!(q.ask("POST", "/v1/x/admin"), Ask::NotFound);
        assert_eq!(p.ask("POST", "/v1/embeddings"), Ask::NotFound);
        let r = policy("refuse: [/health, /version, '/v1/models*']").expect("valid");
        for path in ["/health", "/version", "/v1/models", "/v1/models/x"] {
            assert_eq!(r.ask("GET", path), Ask::NotFound, "{path}");
        }
        // Listing `model` replaced the default list.
        assert_eq!(p.ask("POST", "/tokenize"), Ask::NotFound);
        let p = policy("prompt: [/v1/chat/completions]").expect("valid");
        assert_eq!(p.ask("POST", "/v1/completions"), Ask::NotFound);
    }

    #[test]
    fn bad_patterns_are_named() {
        assert_eq!(policy("prompt: [/tokenize]").unwrap_err().0, "paths.prompt");
        assert_eq!(policy("prompt: ['/v1/*']").unwrap_err().0, "paths.prompt");
        assert_eq!(policy("model: [tokenize]").unwrap_err().0, "paths.model");
        assert_eq!(policy("refuse: ['/a*b']").unwrap_err().0, "paths.refuse");
    }
}
