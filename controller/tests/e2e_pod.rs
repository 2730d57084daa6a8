//! examples/k8s/daemonset.yaml's container under exactly the confinement that file declares
//! (support/pod.rs derives it from the manifest and the Dockerfile), on the private libvirtd
//! testbed whose network namespace stands in for the node's (`hostNetwork: true`): it starts,
//! connects, writes its state and memory where the manifest mounts them, holds the host lock a
//! host-side `virtwarden apply` respects, and can do what the node needs.

#[path = "support/pod.rs"]
mod pod;
mod testbed;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use pod::{Cluster, Pod};
use testbed::{inside, work};

const T: Duration = Duration::from_secs(60);

/// The container, killed (with its PID namespace) when the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `cond` every 20 ms for up to `timeout`; whether it came true.
fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while !cond() {
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn arg_value(argv: &[String], flag: &str) -> Option<String> {
    argv.iter().position(|a| a == flag).and_then(|i| argv.get(i + 1).cloned())
}

/// One plain HTTP/1.0 GET on loopback: (status code, body).
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// A throw-away CA certificate, so the in-cluster configuration loads as in a pod.
fn service_account_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vw-pod-test"])
        .arg("-keyout")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.crt"))
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(dir.join("ca.key")).unwrap();
    std::fs::write(dir.join("token"), "placeholder").unwrap();
    std::fs::write(dir.join("namespace"), "virtwarden").unwrap();
}

fn status_line(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key} not in /proc/self/status"))
        .trim()
        .to_string()
}

#[test]
fn e2e_the_daemonset_container_runs_under_its_own_confinement() {
    if !inside("e2e_the_daemonset_container_runs_under_its_own_confinement") {
        return;
    }
    let work = work();
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    let sa = work.join("serviceaccount");
    service_account_dir(&sa);
    let cluster = Cluster {
        node_name: "kvm-1".into(),
        api_host: "127.0.0.1".into(),
        api_port: api.local_addr().unwrap().port(),
        service_account_dir: sa,
    };
    let pod = Pod::from_manifest(&work, &cluster, Path::new(env!("CARGO_BIN_EXE_virtwarden")));

    // The confinement is real: each of these fails under a looser one.
    let out = pod.exec(&["cat", "/proc/self/status"]);
    let status = String::from_utf8_lossy(&out.stdout);
    let mask: u64 = pod.caps.iter().map(|c| 1u64 << pod::cap_bit(c)).sum();
    let expected = format!("{mask:016x}");
    for key in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(status_line(&status, key), expected, "{key} (declared {:?})", pod.caps);
    }
    assert_eq!(status_line(&status, "CapInh"), "0000000000000000");
    assert_eq!(status_line(&status, "CapAmb"), "0000000000000000");
    assert_eq!(status_line(&status, "NoNewPrivs"), if pod.no_new_privs { "1" } else { "0" });
    assert!(pod.read_only_root, "the manifest asks for a read-only root");
    let out = pod.exec(&["touch", "/probe"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{out:?}");
    let out = pod.exec(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{out:?}");
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim(), "0");

    // Started as the manifest starts it.
    let log = work.join("operator.log");
    let mut container = Running(pod.start(&log));
    let metrics = arg_value(&pod.argv, "--metrics-addr").expect("--metrics-addr in the manifest");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut exited = None;
    let ready = poll(T, || {
        exited = container.0.try_wait().ok().flatten();
        exited.is_some() || get(&metrics, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    assert!(ready && exited.is_none(), "not ready on {metrics} ({exited:?}):\n{}", log_text());
    assert_eq!(get(&metrics, "/healthz").map(|r| r.0), Some(200), "{}", log_text());

    // Its state where the manifest mounts it: the control socket in the state directory.
    let state_dir = arg_value(&pod.argv, "--state-dir").unwrap_or_else(|| "/run/virtwarden".into());
    let socket = pod.source_of(&state_dir).join("control.sock");
    assert!(socket.exists(), "no {} (state dir {state_dir}):\n{}", socket.display(), log_text());
    let data_dir = arg_value(&pod.argv, "--data-dir").unwrap_or_else(|| "/var/lib/virtwarden".into());
    let data = pod.source_of(&data_dir).to_path_buf();
    let (_, metrics_text) = get(&metrics, "/metrics").unwrap();
    assert!(!log_text().contains("remembering in memory only"), "{}", log_text());

    // The host-wide lock is the host's file: a host-side apply (default lock path) is refused.
    let lock = std::fs::read_to_string("/run/virtwarden.lock").expect("the host's lock file");
    assert!(lock.ends_with(" operator\n"), "{lock:?}");
    let policies = work.join("host-policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("p.yaml"),
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: { name: p }\nspec:\n  domains: []\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args(["apply", "--connect", testbed::URI])
        .arg(&policies)
        .env_remove("VIRTWARDEN_LOCK_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("another virtwarden is changing this host"), "{stderr}");
    assert!(stderr.contains("`operator`"), "{stderr}");

    // The API server: reached with the in-cluster configuration (token dir + service env).
    api.set_nonblocking(true).unwrap();
    let reached = poll(T, || api.accept().is_ok());
    assert!(reached, "the operator never connected to {}:{}\n{}", cluster.api_host, cluster.api_port, log_text());
    let _ = (data, metrics_text);
}
