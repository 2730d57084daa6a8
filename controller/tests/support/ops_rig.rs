//! `virtwarden run` as a process on libvirt's test driver, everything under a temp directory
//! (state, data, lock, policies), serving /metrics on a free port, in the state operators are
//! paged for: web1's guest never answers its TCP probe (nothing listens on its port), so it is
//! judged "boot failed", reset once, and quarantined by the service itself; web2's probe
//! answers (a local listener stands in for its service), so it is healthy; db1 has no probe.

#![allow(dead_code)]

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long the service may take to reach a state the rig waits for.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct OpsRig {
    child: Child,
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub data_dir: PathBuf,
    pub policies: PathBuf,
    pub metrics: SocketAddr,
    /// web1's probe port, on which nothing listens until [`OpsRig::fix_web1`].
    pub web1_port: u16,
    web1_service: Option<TcpListener>,
    _web2_service: TcpListener,
    log: Arc<Mutex<String>>,
}

pub fn testbed_uri() -> String {
    format!("test://{}", super::ops_tools::repo().join("examples/testbed/node.xml").display())
}

/// A port nothing listens on (bound, then let go).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free local port").port()
}

fn policy(web1_port: u16, web2_port: u16) -> String {
    format!(
        "apiVersion: virtwarden.io/v1alpha1
kind: HostPolicy
metadata: {{name: web}}
spec:
  domains:
    - name: web1
      restart: always
      autostart: true
      backoff: {{initialDelay: 100ms, maxDelay: 200ms, resetAfter: 1h, maxRestarts: 1, window: 1h}}
      health:
        probe: {{tcp: {{port: {web1_port}}}}}
        address: 127.0.0.1
        period: 1s
        timeout: 500ms
        failureThreshold: 1
        bootTimeout: 1s
    - name: web2
      restart: always
      health:
        probe: {{tcp: {{port: {web2_port}}}}}
        address: 127.0.0.1
        period: 1s
        timeout: 500ms
---
apiVersion: virtwarden.io/v1alpha1
kind: HostPolicy
metadata: {{name: database}}
spec:
  domains:
    - name: db1
      restart: always
      autostart: true
"
    )
}

impl OpsRig {
    /// Start the service under `dir` and wait until it serves /metrics.
    pub fn start(dir: &Path) -> OpsRig {
        let web2_service = TcpListener::bind("127.0.0.1:0").expect("web2's stand-in service");
        let web2_port = web2_service.local_addr().unwrap().port();
        let web1_port = free_port();
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("ops.yaml"), policy(web1_port, web2_port)).unwrap();
        let state_dir = dir.join("state");
        let data_dir = dir.join("data");
        let mut child = Command::new(env!("CARGO_BIN_EXE_virtwarden"))
            .env_remove("LIBVIRT_DEFAULT_URI")
            .env_remove("NOTIFY_SOCKET")
            .env("VIRTWARDEN_LOCK_FILE", dir.join("virtwarden.lock"))
            .env("NO_COLOR", "1")
            .args(["run", "-c", &testbed_uri(), "--metrics-addr", "127.0.0.1:0", "--resync", "1h", "--state-dir"])
            .arg(&state_dir)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg(&policies)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start virtwarden run");
        // The log is kept for failure messages; the bound address is read from it.
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("serving /metrics") {
                    if let Some(addr) = line.split_whitespace().find_map(|w| w.strip_prefix("bound=")) {
                        let _ = tx.send(addr.to_string());
                    }
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let metrics = match rx.recv_timeout(WAIT) {
            Ok(a) => a.parse().expect("a socket address after bound="),
            Err(_) => {
                let _ = child.kill();
                panic!("virtwarden run never served /metrics; log:\n{}", log.lock().unwrap());
            }
        };
        OpsRig {
            child,
            dir: dir.to_path_buf(),
            state_dir,
            data_dir,
            policies,
            metrics,
            web1_port,
            web1_service: None,
            _web2_service: web2_service,
            log,
        }
    }

    pub fn status_path(&self) -> PathBuf {
        self.state_dir.join("status.json")
    }

    pub fn status(&self) -> Option<Value> {
        serde_json::from_slice(&std::fs::read(self.status_path()).ok()?).ok()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Poll the status file (another process writes it) until `cond` holds.
    pub fn wait_status(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.status() {
                if cond(&s) {
                    return s;
                }
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; status: {:#?}\nlog:\n{}", self.status(), self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// web1 quarantined by the service (boot failed, reset, boot failed again).
    pub fn wait_web1_quarantined(&self) -> Value {
        self.wait_status("web1 quarantined", |s| domain(s, "web1").is_some_and(|d| d["quarantined"].is_string()))
    }

    /// Start answering web1's probe: the cause is fixed, a release can stick.
    pub fn fix_web1(&mut self) {
        self.web1_service = Some(TcpListener::bind(("127.0.0.1", self.web1_port)).expect("bind web1's probe port"));
    }

    /// GET /metrics.
    pub fn scrape(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).expect("connect to /metrics");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // HTTP/1.0: the body runs to the end of the connection, never chunked.
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.metrics).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read /metrics");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "{head}");
        body.to_string()
    }
}

impl Drop for OpsRig {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn domain<'a>(s: &'a Value, name: &str) -> Option<&'a Value> {
    s["domains"].as_array()?.iter().find(|d| d["name"] == name)
}
