//! A REAL Kubernetes API server for the operator's integration tests: etcd (Debian's etcd-server)
//! and kube-apiserver + kube-controller-manager 1.20 (built once from Debian's source package by
//! controller/tests/k8s/testenv.sh into target/k8s/bin), on free 127.0.0.1 ports, with a
//! throw-away PKI and data in a temporary directory. Everything it starts is stopped by pid when
//! the `ApiServer` is dropped. Nothing listens on anything but loopback.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};
use kube::{Api, Client, Config};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("controller/ has a parent").to_path_buf()
}

/// Where the built binaries are (K8S_DIR overrides target/k8s).
pub fn k8s_dir() -> PathBuf {
    std::env::var_os("K8S_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target/k8s"))
}

static BUILD: Mutex<()> = Mutex::new(());

/// Build the binaries if they are missing (`make test` does it before; a lone `cargo test` too).
fn ensure_binaries() -> PathBuf {
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let bin = k8s_dir().join("bin");
    let ready = ["kube-apiserver", "kube-controller-manager"].iter().all(|b| bin.join(b).is_file())
        && which("etcd").is_some()
        && which("openssl").is_some();
    if !ready {
        let script = repo().join("controller/tests/k8s/testenv.sh");
        let status = Command::new(&script).status().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(status.success(), "{} failed ({status}): no real API server to test against", script.display());
    }
    bin
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(cmd)).find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 (bound and released: the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Certificates for the server, an admin client (group system:masters) and the service-account
/// token signing key, made with openssl in `pki`.
fn make_pki(pki: &Path) {
    std::fs::create_dir_all(pki).expect("pki dir");
    let sh = |script: &str| run(Command::new("bash").arg("-euc").arg(script).current_dir(pki));
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=virtwarden-test-ca -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth\\n' > server.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile server.ext -out apiserver.crt 2>/dev/null
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj /O=system:masters/CN=admin -keyout admin.key -out admin.csr 2>/dev/null
        printf 'extendedKeyUsage=clientAuth\\n' > client.ext
        openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile client.ext -out admin.crt 2>/dev/null
        rm -f ./*.csr");
}

/// A running etcd + kube-apiserver (+ kube-controller-manager), stopped on drop.
pub struct ApiServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub api_port: u16,
    pub etcd_port: u16,
    etcd_peer_port: u16,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    kcm: Option<Child>,
    /// kubeconfig of the admin user (system:masters).
    pub admin_kubeconfig: PathBuf,
    pub admin: Client,
}

impl ApiServer {
    /// Start everything and wait until the API server is ready (a minute at most).
    pub async fn start() -> ApiServer {
        let bin = ensure_binaries();
        let dir = tempfile::Builder::new().prefix("virtwarden-k8s-").tempdir().expect("tempdir");
        make_pki(&dir.path().join("pki"));
        let admin_kubeconfig = dir.path().join("admin.kubeconfig");
        let mut s = ApiServer {
            bin,
            api_port: free_port(),
            etcd_port: free_port(),
            etcd_peer_port: free_port(),
            etcd: None,
            apiserver: None,
            kcm: None,
            admin_kubeconfig: admin_kubeconfig.clone(),
            admin: placeholder_client(),
            dir,
        };
        s.start_etcd();
        let pki = s.pki();
        let admin = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
            s.api_port,
            pki.join("ca.crt").display(),
            pki.join("admin.crt").display(),
            pki.join("admin.key").display()
        );
        std::fs::write(&admin_kubeconfig, admin).expect("admin kubeconfig");
        s.admin = client_from(&admin_kubeconfig).await;
        s.start_apiserver().await;
        s.start_controller_manager();
        s
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file")
    }

    /// The last lines a component logged (for failure messages).
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn start_etcd(&mut self) {
        let url = |p: u16| format!("http://127.0.0.1:{p}");
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.path().join("etcd"))
            .args(["--listen-client-urls", &url(self.etcd_port), "--advertise-client-urls", &url(self.etcd_port)])
            .args(["--listen-peer-urls", &url(self.etcd_peer_port)])
            .args(["--initial-advertise-peer-urls", &url(self.etcd_peer_port)])
            .arg(format!("--initial-cluster=test={}", url(self.etcd_peer_port)))
            .args(["--unsafe-no-fsync", "--listen-metrics-urls", &url(free_port())])
            .stdin(Stdio::null())
            .stdout(self.log("etcd"))
            .stderr(self.log("etcd"))
            .spawn()
            .expect("etcd (Debian package etcd-server) runs");
        self.etcd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while etcd_request(self.etcd_port, "GET", "/health", "").is_none_or(|r| !r.contains("true")) {
            assert!(Instant::now() < deadline, "etcd not healthy after 30 s:\n{}", self.log_tail("etcd"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Start (or start again) kube-apiserver and wait until /readyz answers.
    pub async fn start_apiserver(&mut self) {
        let pki = self.pki();
        let p = |f: &str| pki.join(f).display().to_string();
        let child = Command::new(self.bin.join("kube-apiserver"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--insecure-port=0"])
            .arg(format!("--secure-port={}", self.api_port))
            .arg(format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port))
            .arg(format!("--cert-dir={}", pki.display()))
            .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", p("sa.key")))
            .arg("--api-audiences=https://kubernetes.default.svc")
            .args(["--service-cluster-ip-range=10.96.0.0/24", "--endpoint-reconciler-type=none"])
            .arg(format!("--audit-policy-file={}", self.audit_policy().display()))
            .arg(format!("--audit-log-path={}", self.dir.path().join("audit.log").display()))
            .arg("--audit-log-format=json")
            .stdin(Stdio::null())
            .stdout(self.log("kube-apiserver"))
            .stderr(self.log("kube-apiserver"))
            .spawn()
            .expect("kube-apiserver runs");
        self.apiserver = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ready = self.admin.request_text(http::Request::get("/readyz").body(Vec::new()).expect("request")).await;
            if ready.is_ok_and(|t| t.trim() == "ok") {
                return;
            }
            if let Some(Ok(Some(status))) = self.apiserver.as_mut().map(|c| c.try_wait()) {
                panic!("kube-apiserver exited ({status}):\n{}", self.log_tail("kube-apiserver"));
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready after 90 s:\n{}",
                self.log_tail("kube-apiserver")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every request the server answered (its audit log, level Metadata): verb, requestURI,
    /// user.username, responseStatus.code, requestReceivedTimestamp, …
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    fn audit_policy(&self) -> PathBuf {
        let path = self.dir.path().join("audit-policy.yaml");
        if !path.exists() {
            let policy =
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n";
            std::fs::write(&path, policy).expect("audit policy");
        }
        path
    }

    /// Write a key straight into etcd (the API server not involved): moves etcd's revision on.
    pub fn bump_etcd_revision(&self) {
        let out =
            etcd_request(self.etcd_port, "POST", "/v3/kv/put", r#"{"key":"dmlydHdhcmRlbi10ZXN0","value":"eA=="}"#)
                .expect("etcd put");
        assert!(out.contains("header"), "put: {out}");
    }

    /// Stop kube-apiserver (etcd keeps running): an API outage.
    pub fn stop_apiserver(&mut self) {
        if let Some(child) = self.apiserver.take() {
            stop(child);
        }
    }

    fn start_controller_manager(&mut self) {
        let pki = self.pki();
        let child = Command::new(self.bin.join("kube-controller-manager"))
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .args(["--leader-elect=false", "--port=0", "--secure-port=0", "--bind-address=127.0.0.1"])
            .arg(format!("--service-account-private-key-file={}", pki.join("sa.key").display()))
            .arg(format!("--root-ca-file={}", pki.join("ca.crt").display()))
            .arg("--controllers=garbagecollector,namespace,serviceaccount")
            .stdin(Stdio::null())
            .stdout(self.log("kube-controller-manager"))
            .stderr(self.log("kube-controller-manager"))
            .spawn()
            .expect("kube-controller-manager runs");
        self.kcm = Some(child);
    }

    /// Compact etcd at its current revision: every watch that resumes from an older resource
    /// version then gets 410 Gone and must list again.
    pub fn compact_etcd(&self) {
        let range = etcd_request(self.etcd_port, "POST", "/v3/kv/range", r#"{"key":"AA=="}"#)
            .unwrap_or_else(|| panic!("etcd range:\n{}", self.log_tail("etcd")));
        let v: serde_json::Value = serde_json::from_str(&range).expect("etcd answers JSON");
        let revision = v["header"]["revision"].as_str().expect("a revision").to_string();
        let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
        let out = etcd_request(self.etcd_port, "POST", "/v3/kv/compaction", &body).expect("etcd compaction");
        assert!(out.contains("header"), "compaction: {out}");
    }

    /// A server-side apply of every document of a YAML stream, as `kubectl apply --server-side`
    /// would, with the admin user; CRDs are waited for until established.
    pub async fn apply_yaml(&self, yaml: &str) {
        let discovery = Discovery::new(self.admin.clone()).run().await.expect("API discovery");
        let mut discovery = discovery;
        for doc in serde_saphyr::from_multiple::<serde_json::Value>(yaml).expect("YAML manifests") {
            if doc.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("a Kubernetes object");
            let types = obj.types.clone().expect("apiVersion and kind");
            let gvk = kube::api::GroupVersionKind::try_from(&types).expect("a group/version/kind");
            if discovery.resolve_gvk(&gvk).is_none() {
                discovery = Discovery::new(self.admin.clone()).run().await.expect("API discovery");
            }
            let (ar, caps) = discovery.resolve_gvk(&gvk).unwrap_or_else(|| panic!("{gvk:?} is not served"));
            let api = dynamic_api(&self.admin, &ar, &caps, obj.metadata.namespace.as_deref());
            let name = obj.metadata.name.clone().expect("a name");
            api.patch(&name, &PatchParams::apply("virtwarden-tests").force(), &Patch::Apply(&doc))
                .await
                .unwrap_or_else(|e| panic!("apply {} {name}: {e}", types.kind));
            if types.kind == "CustomResourceDefinition" {
                self.wait_established(&name).await;
            }
        }
    }

    async fn wait_established(&self, crd: &str) {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let api: Api<CustomResourceDefinition> = Api::all(self.admin.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let established = api.get(crd).await.ok().and_then(|c| c.status).is_some_and(|s| {
                s.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                return;
            }
            assert!(Instant::now() < deadline, "CRD {crd} not established after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A token of ServiceAccount `namespace/name` through the TokenRequest API (valid one hour).
    pub async fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec!["https://kubernetes.default.svc".into()],
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = api
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"));
        answer.status.expect("a token").token
    }

    /// A kubeconfig (at `path`) that authenticates as ServiceAccount `namespace/name` with a
    /// TokenRequest token, `namespace` as its default namespace, as a pod of it would be.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str, path: &Path) -> PathBuf {
        let token = self.service_account_token(namespace, name).await;
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: {name}, namespace: {namespace}}}\ncurrent-context: test\n",
            self.api_port,
            self.pki().join("ca.crt").display()
        );
        std::fs::write(path, text).expect("service-account kubeconfig");
        path.to_path_buf()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [self.kcm.take(), self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            stop(child);
        }
    }
}

/// SIGTERM by pid, then SIGKILL after 15 s; always reaped.
pub fn stop(mut child: Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("a kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("a client config");
    Client::try_from(config).expect("a client")
}

/// Until `start` sets the real one.
fn placeholder_client() -> Client {
    let config = Config::new("https://127.0.0.1:1".parse().expect("uri"));
    Client::try_from(config).expect("a client")
}

fn dynamic_api(client: &Client, ar: &ApiResource, caps: &ApiCapabilities, ns: Option<&str>) -> Api<DynamicObject> {
    match (&caps.scope, ns) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, ar),
        (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), ar),
        (Scope::Cluster, _) => Api::all_with(client.clone(), ar),
    }
}

/// One plain HTTP/1.0 request to etcd's JSON gateway; the body of the answer.
fn etcd_request(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}
