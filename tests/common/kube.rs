//! A real Kubernetes API server on loopback — Debian's etcd and a kube-apiserver built by
//! `ci/kube-apiserver.sh` (or the binary `KVGATE_KUBE_APISERVER` names) — and the kubelet's
//! part, played by the tests: create pods, then patch their status (phase, IP, `Ready`).
//!
//! There is no scheduler, controller or kubelet: pods get no IP unless a test gives one, and
//! deleting a pod that names a node leaves it terminating.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::{Value, json};

/// The admin's bearer token (group `system:masters`).
pub const ADMIN_TOKEN: &str = "kvgate-test-admin";

/// The tool `env_var` names, or the path a `ci/` script prints after fetching (or building)
/// and caching it.
fn tool(env_var: &str, script: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    let out =
        super::ci_script(script).stderr(Stdio::inherit()).output().unwrap_or_else(|e| panic!("{script} runs: {e}"));
    assert!(out.status.success(), "{script} failed: {}", out.status);
    PathBuf::from(String::from_utf8(out.stdout).expect("a path").trim())
}

/// The kube-apiserver binary, built and cached once per machine.
fn apiserver_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| tool("KVGATE_KUBE_APISERVER", "kube-apiserver.sh")).clone()
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).expect("log file");
    cmd.stdout(Stdio::null()).stderr(file).spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// etcd and a kube-apiserver on loopback, with their certificates and kubeconfigs in a
/// temporary folder; all stopped and removed on drop.
pub struct Cluster {
    pub dir: PathBuf,
    /// The API server's HTTPS port.
    pub port: u16,
    etcd: Child,
    apiserver: Option<Child>,
    etcd_port: u16,
}

impl Cluster {
    /// Starts etcd and the API server and waits until the server is ready.
    pub async fn start() -> Self {
        Self::start_on(super::free_port()).await
    }

    /// [`Cluster::start`] with the API server on `port`.
    pub async fn start_on(port: u16) -> Self {
        // Built (or found) before anything starts.
        apiserver_binary();
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("kvgate-kube-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let serving = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("serving certificate");
        std::fs::write(dir.join("ca.pem"), serving.cert.pem()).expect("write");
        std::fs::write(dir.join("serving.key"), serving.signing_key.serialize_pem()).expect("write");
        let sa = rcgen::KeyPair::generate().expect("service-account key");
        std::fs::write(dir.join("sa.key"), sa.serialize_pem()).expect("write");
        std::fs::write(dir.join("sa.pub"), sa.public_key_pem()).expect("write");
        std::fs::write(dir.join("tokens.csv"), format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n"))
            .expect("write");
        let (etcd_port, peer_port) = (super::free_port(), super::free_port());
        let client_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = spawn_logged(
            Command::new("etcd").args([
                "--name=local",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls={client_url}"),
                &format!("--advertise-client-urls={client_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=local={peer_url}"),
            ]),
            &dir.join("etcd.log"),
        );
        let mut cluster = Self { dir, port, etcd, apiserver: None, etcd_port };
        cluster.start_apiserver();
        cluster.wait_ready().await;
        cluster
    }

    /// Starts the API server (again), on the same port and etcd.
    pub fn start_apiserver(&mut self) {
        let d = &self.dir;
        let issuer = "https://kubernetes.default.svc.cluster.local";
        let child = spawn_logged(
            Command::new(apiserver_binary()).args([
                &format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={}", self.port),
                "--insecure-port=0",
                &format!("--tls-cert-file={}", d.join("ca.pem").display()),
                &format!("--tls-private-key-file={}", d.join("serving.key").display()),
                &format!("--token-auth-file={}", d.join("tokens.csv").display()),
                &format!("--service-account-key-file={}", d.join("sa.pub").display()),
                &format!("--service-account-signing-key-file={}", d.join("sa.key").display()),
                &format!("--service-account-issuer={issuer}"),
                &format!("--api-audiences={issuer}"),
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--disable-admission-plugins=ServiceAccount",
                "--enable-priority-and-fairness=false",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ]),
            &d.join("apiserver.log"),
        );
        self.apiserver = Some(child);
    }

    /// Kills the API server (etcd keeps the data).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until `/readyz` answers 200 (at most 90 s).
    pub async fn wait_ready(&mut self) {
        let client = self.admin().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let req = hyper::Request::get("/readyz").body(Vec::new()).expect("request");
            if client.request_text(req).await.is_ok_and(|t| t.trim() == "ok") {
                return;
            }
            if let Some(status) = self.apiserver.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("kube-apiserver exited ({status}):\n{}", tail(&self.dir.join("apiserver.log")));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kube-apiserver not ready in 90 s:\n{}",
                tail(&self.dir.join("apiserver.log"))
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A kubeconfig file for a bearer `token`, with `namespace` as its context's namespace.
    pub fn kubeconfig(&self, name: &str, token: &str, namespace: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: test\n    user: {name}\n    namespace: {namespace}\ncurrent-context: {name}\n",
            self.port,
            self.dir.join("ca.pem").display()
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }

    /// A client with the admin's rights.
    pub async fn admin(&self) -> kube::Client {
        let path = self.kubeconfig("admin", ADMIN_TOKEN, "default");
        let kc = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .expect("client config");
        kube::Client::try_from(cfg).expect("client")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The documents of a multi-document YAML text, as JSON (empty ones left out).
pub fn yaml_documents(text: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let last = docs.last_mut().expect("a document");
            last.push_str(line);
            last.push('\n');
        }
    }
    docs.iter()
        .filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')))
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap_or_else(|e| panic!("YAML document: {e}\n{d}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The API for `obj`'s kind (found through discovery), in `namespace` when namespaced and
/// the object names none.
pub async fn api_for(client: &kube::Client, obj: &DynamicObject, namespace: &str) -> Api<DynamicObject> {
    let types = obj.types.as_ref().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(types).expect("group, version, kind");
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("the API server serves {gvk:?}: {e}"));
    match caps.scope {
        Scope::Namespaced => {
            let ns = obj.metadata.namespace.as_deref().unwrap_or(namespace);
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    }
}

/// Creates every object of a YAML text (the way `kubectl create -f` would). A `policy/v1`
/// PodDisruptionBudget goes in as `policy/v1beta1`: this API server (v1.20) serves only that
/// version, whose spec has the same fields.
pub async fn create_all(client: &kube::Client, yaml: &str, namespace: &str) -> Vec<DynamicObject> {
    let mut out = Vec::new();
    for mut doc in yaml_documents(yaml) {
        if doc["apiVersion"] == "policy/v1" && doc["kind"] == "PodDisruptionBudget" {
            doc["apiVersion"] = json!("policy/v1beta1");
        }
        let obj: DynamicObject = serde_json::from_value(doc).expect("a Kubernetes object");
        let api = api_for(client, &obj, namespace).await;
        let created = api
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("creating {:?} {:?}: {e}", obj.types, obj.metadata.name));
        out.push(created);
    }
    out
}

/// Creates an InferencePool CRD from a YAML file under `tests/data` and waits until its kind
/// is served.
pub async fn install_crd(client: &kube::Client, file: &str, group: &str) {
    install_crd_of(client, file, &GroupVersionKind::gvk(group, "v1", "InferencePool")).await;
}

/// The CRD of the InferenceObjective kind (`inference.networking.x-k8s.io/v1alpha2`).
pub async fn install_objective_crd(client: &kube::Client) {
    let gvk = GroupVersionKind::gvk(OBJECTIVE_GROUP, "v1alpha2", "InferenceObjective");
    install_crd_of(client, "inferenceobjective-crd.yaml", &gvk).await;
}

/// Creates a CRD from a YAML file under `tests/data` and waits until `gvk` is served.
async fn install_crd_of(client: &kube::Client, file: &str, gvk: &GroupVersionKind) {
    let yaml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(file)).expect("CRD file");
    create_all(client, &yaml, "default").await;
    let ok = super::eventually(30, || {
        let gvk = gvk.clone();
        async move { kube::discovery::pinned_kind(client, &gvk).await.is_ok() }
    })
    .await;
    assert!(ok, "{gvk:?} served");
}

/// The InferenceObjective kind's group.
pub const OBJECTIVE_GROUP: &str = "inference.networking.x-k8s.io";

/// An InferenceObjective `name` with a raw `spec`.
pub fn inference_objective(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("{OBJECTIVE_GROUP}/v1alpha2"), "kind": "InferenceObjective",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("object")
}

/// Creates namespace `name`.
pub async fn namespace(client: &kube::Client, name: &str) {
    let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
    create_all(client, &yaml, "default").await;
}

/// An InferencePool object in `group` (v1) with a raw `spec`.
pub fn inference_pool(group: &str, name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("{group}/v1"), "kind": "InferencePool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("object")
}

/// The usual spec: pods labelled `app: <app>`, these ports, kvgate as the picker.
pub fn pool_spec(app: &str, ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports.iter().map(|p| json!({"number": p})).collect();
    json!({"selector": {"matchLabels": {"app": app}}, "targetPorts": ports,
           "endpointPickerRef": {"name": "kvgate", "port": {"number": 9002}}})
}

/// Creates or replaces an InferencePool (or any object, by server-side apply).
pub async fn put_pool(client: &kube::Client, namespace: &str, obj: &DynamicObject) {
    let api = api_for(client, obj, namespace).await;
    let name = obj.metadata.name.clone().expect("name");
    let patch = PatchParams::apply("kvgate-tests").force();
    api.patch(&name, &patch, &Patch::Apply(obj)).await.unwrap_or_else(|e| panic!("applying {name}: {e}"));
}

/// The kubelet's part for the tests' pods.
pub struct Kubelet {
    pub pods: Api<Pod>,
}

impl Kubelet {
    pub fn new(client: &kube::Client, namespace: &str) -> Self {
        Self { pods: Api::namespaced(client.clone(), namespace) }
    }

    /// Creates pod `name` with `labels`; `node` schedules it (so that deleting it leaves it
    /// terminating, as a kubelet would until its containers stop).
    pub async fn create(&self, name: &str, labels: &[(&str, &str)], node: bool) {
        let labels: serde_json::Map<String, Value> = labels.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
        let mut spec = json!({"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]});
        if node {
            spec["nodeName"] = json!("node-a");
        }
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": spec,
        }))
        .expect("pod");
        self.pods.create(&PostParams::default(), &pod).await.unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
    }

    /// Sets the pod's status as a kubelet would: running with `ip`, `Ready` or not.
    pub async fn status(&self, name: &str, ip: &str, ready: bool) {
        let ready = if ready { "True" } else { "False" };
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": ready}, {"type": "ContainersReady", "status": ready}],
        }});
        self.pods
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("patching the status of pod {name}: {e}"));
    }

    /// Creates a pod and makes it Ready at `ip`.
    pub async fn ready(&self, name: &str, labels: &[(&str, &str)], ip: &str) {
        self.create(name, labels, false).await;
        self.status(name, ip, true).await;
    }

    /// Replaces the pod's labels (one update, as `kubectl label --overwrite` of a whole set).
    pub async fn relabel(&self, name: &str, labels: &[(&str, &str)]) {
        let mut pod = self.pods.get(name).await.unwrap_or_else(|e| panic!("reading pod {name}: {e}"));
        pod.metadata.labels = Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        self.pods
            .replace(name, &PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("relabelling pod {name}: {e}"));
    }

    /// Deletes the pod (a scheduled one stays terminating).
    pub async fn delete(&self, name: &str) {
        self.pods.delete(name, &DeleteParams::default()).await.unwrap_or_else(|e| panic!("deleting pod {name}: {e}"));
    }
}

/// A Helm 3 binary (`ci/helm.sh` fetches and caches it), or the one `KVGATE_HELM` names.
pub fn helm_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| tool("KVGATE_HELM", "helm.sh")).clone()
}

/// `helm template RELEASE deploy/helm/kvgate --namespace NS` with `--set` values.
pub fn render_chart(release: &str, namespace: &str, set: &[&str]) -> String {
    render(release, namespace, set, &[])
}

/// The same against the API server of `kubeconfig` (`--dry-run=server`), so that the chart's
/// `lookup`s see the objects there, as on an upgrade.
pub fn render_chart_on(kubeconfig: &Path, release: &str, namespace: &str, set: &[&str]) -> String {
    render(release, namespace, set, &["--dry-run=server".as_ref(), "--kubeconfig".as_ref(), kubeconfig.as_os_str()])
}

fn render(release: &str, namespace: &str, set: &[&str], more: &[&std::ffi::OsStr]) -> String {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/kvgate");
    let mut cmd = Command::new(helm_binary());
    cmd.args(["template", release]).arg(&chart).args(["--namespace", namespace]).args(more);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("helm runs");
    assert!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

/// A token for service account `name` in `namespace` (the TokenRequest API, as
/// `kubectl create token` uses).
pub async fn service_account_token(client: &kube::Client, namespace: &str, name: &str) -> String {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"audiences": []}});
    let answer: Value = api
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for service account {namespace}/{name}: {e}"));
    answer["status"]["token"].as_str().expect("a token").to_owned()
}
