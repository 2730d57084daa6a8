//! The image as shipped: built without a registry by examples/k8s/build-image.sh (what `make
//! image` runs; here with this build's binary instead of the release one, so the suite needs no
//! release build), checked against the Dockerfile (entrypoint, cmd, user, packages), and run with
//! podman under the DaemonSet's securityContext, volumes and env — podman flags derived from
//! examples/k8s/daemonset.yaml — on the private libvirtd testbed.
//!
//! Two things about these machines are set explicitly (podman's defaults fail here):
//! - `--runtime runc`: crun refuses this host's hybrid cgroup layout ("cgroups in hybrid mode
//!   not supported, drop all controllers from cgroupv2": hugetlb is on the v2 hierarchy);
//! - `--ulimit nofile/nproc` within this process's limits: podman's defaults (nofile 1048576,
//!   nproc 4194304) need CAP_SYS_RESOURCE, which root here does not have ("setrlimit
//!   RLIMIT_NOFILE: Operation not permitted").

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "support/pod.rs"]
mod pod;
mod testbed;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use pod::{PodMount, Running, SERVICE_ACCOUNT_DIR};
use serde_json::Value;
use testbed::{inside, work};

const T: Duration = Duration::from_secs(90);
const NAME: &str = "e2e_the_image_runs_with_podman_under_the_daemonsets_confinement";

fn archive() -> PathBuf {
    pod::repo().join("target/image/test/virtwarden-test.oci.tar")
}

fn ensure_packages(packages: &[&str]) {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    let update = Command::new("apt-get").args(["update", "-qq"]).status().expect("apt-get");
    assert!(update.success(), "apt-get update failed");
    let out = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("apt-get");
    assert!(out.status.success(), "installing {missing:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A file of the OCI archive.
fn archive_member(archive: &Path, member: &str) -> Value {
    let out = Command::new("tar").arg("-xOf").arg(archive).arg(member).output().expect("tar");
    assert!(out.status.success(), "{member}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{member}: {e}"))
}

fn blob(digest: &Value) -> String {
    format!("blobs/sha256/{}", digest.as_str().unwrap().trim_start_matches("sha256:"))
}

/// The podman flags that say what the manifest says. Anything the manifest asks that has no
/// flag here fails in pod.rs (volumes, env) or below.
fn podman_run_args(pod: &PodSpec, c: &Container, mounts: &[PodMount], env: &[(String, String)]) -> Vec<String> {
    let mut a: Vec<String> = vec!["run".into(), "--rm".into(), "--name".into(), "vw-pod".into()];
    let limit = |name: &str| -> u64 {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().rev().nth(1).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
    };
    let nofile = limit("Max open files").min(1 << 20);
    let nproc = limit("Max processes").min(16384);
    a.extend([
        "--ulimit".into(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".into(),
        format!("nproc={nproc}:{nproc}"),
    ]);
    a.push(if pod.host_network == Some(true) { "--network=host" } else { "--network=none" }.into());
    let sc = c.security_context.clone().unwrap_or_default();
    assert_ne!(sc.privileged, Some(true));
    if sc.read_only_root_filesystem == Some(true) {
        // Kubernetes mounts nothing writable that the manifest does not declare.
        a.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if sc.allow_privilege_escalation != Some(true) {
        a.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    let seccomp = sc.seccomp_profile.or(pod.security_context.as_ref().and_then(|s| s.seccomp_profile.clone()));
    match seccomp.map(|p| p.type_).as_deref() {
        // podman's default profile is the runtime default.
        Some("RuntimeDefault") => {}
        Some("Unconfined") | None => a.extend(["--security-opt".into(), "seccomp=unconfined".into()]),
        Some(other) => panic!("seccompProfile {other}: not supported by this test"),
    }
    let caps = sc.capabilities.unwrap_or_default();
    for d in caps.drop.iter().flatten() {
        a.extend(["--cap-drop".into(), d.clone()]);
    }
    for d in caps.add.iter().flatten() {
        a.extend(["--cap-add".into(), d.clone()]);
    }
    if let Some(u) = sc.run_as_user {
        a.extend(["--user".into(), u.to_string()]);
    }
    for m in mounts {
        let ro = if m.read_only { ",ro" } else { "" };
        a.extend(["--mount".into(), format!("type=bind,source={},destination={}{ro}", m.source.display(), m.path)]);
    }
    for (k, v) in env {
        a.extend(["--env".into(), format!("{k}={v}")]);
    }
    if let Some(cmd) = &c.command {
        a.push(format!("--entrypoint={}", serde_json::to_string(cmd).unwrap()));
    }
    a
}

#[test]
fn e2e_the_image_runs_with_podman_under_the_daemonsets_confinement() {
    if std::env::var_os("VW_TESTBED").is_none() {
        // Outside the testbed (it has no network): the tools and the image.
        ensure_packages(&["podman", "runc", "buildah", "mmdebstrap", "openssl"]);
        pod::ensure_k8s_testenv();
        std::fs::create_dir_all(archive().parent().unwrap()).unwrap();
        let out = Command::new(pod::repo().join("examples/k8s/build-image.sh"))
            .arg(env!("CARGO_BIN_EXE_virtwarden"))
            .arg(archive())
            .output()
            .expect("build-image.sh");
        assert!(out.status.success(), "build-image.sh: {}", String::from_utf8_lossy(&out.stderr));
        // The image says what the Dockerfile says.
        let image = pod::dockerfile_image();
        let index = archive_member(&archive(), "index.json");
        let manifest = archive_member(&archive(), &blob(&index["manifests"][0]["digest"]));
        let config = archive_member(&archive(), &blob(&manifest["config"]["digest"]))["config"].clone();
        assert_eq!(config["Entrypoint"], serde_json::json!(image.entrypoint), "{config}");
        assert_eq!(config["Cmd"], serde_json::json!(image.cmd), "{config}");
        assert_eq!(config["User"], serde_json::json!(image.user), "{config}");
    }
    if !inside(NAME) {
        return;
    }
    let work = work();
    let podman = |args: &[&str]| -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(work.join("podman-storage"))
            .args(["--runroot", "/run/vw-podman", "--storage-driver", "vfs", "--runtime", "runc"])
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .args(args);
        cmd
    };
    let out = podman(&["load", "-q", "-i", archive().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "podman load: {}", String::from_utf8_lossy(&out.stderr));
    let tag = format!("localhost/virtwarden:{}", env!("CARGO_PKG_VERSION"));

    // The packages the Dockerfile installs are in the image.
    let out = podman(&["run", "--rm", "--network=none", "--entrypoint=[\"dpkg-query\"]"])
        .args(["--ulimit", "nproc=4096:4096", "--ulimit", "nofile=1024:1024"])
        .args([&tag, "-W", "-f=${Package}\n"])
        .output()
        .unwrap();
    let installed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dpkg-query in the image: {}", String::from_utf8_lossy(&out.stderr));
    for p in pod::dockerfile_image().packages {
        assert!(installed.lines().any(|l| l == p), "{p} is not in the image");
    }

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (server, cluster) = rt.block_on(pod::real_cluster(&work, "kvm-1"));
    let sa = cluster.service_account_dir.clone();
    let (spec, c) = pod::pod_and_container();
    let mut mounts = pod::prepare_volumes(&work, &spec, &c);
    if spec.automount_service_account_token != Some(false) {
        mounts.push(PodMount {
            volume: "kube-api-access".into(),
            source: sa,
            path: SERVICE_ACCOUNT_DIR.into(),
            read_only: true,
            is_dir: true,
        });
    }
    let env = pod::kubelet_env(&spec, &c, &cluster);
    // The flags take effect: only the declared capabilities, no_new_privs, the runtime's seccomp
    // filter, a read-only root.
    let mut probe = podman_run_args(&spec, &c, &mounts, &env);
    probe.extend(["--entrypoint=[\"/bin/sh\"]".to_string(), tag.clone(), "-c".into()]);
    probe.push("cat /proc/self/status; touch /probe".into());
    let probe: Vec<&str> = probe.iter().map(String::as_str).collect();
    let out = podman(&probe).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    let mask: u64 = pod::capabilities(&c).iter().map(|c| 1u64 << pod::cap_bit(c)).sum();
    let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(&format!("{key}:"))).map(str::trim);
    assert_eq!(field("CapEff"), Some(format!("{mask:016x}").as_str()), "{status}");
    assert_eq!(field("CapBnd"), Some(format!("{mask:016x}").as_str()), "{status}");
    let escalation = c.security_context.as_ref().and_then(|s| s.allow_privilege_escalation);
    assert_eq!(field("NoNewPrivs"), Some(if escalation == Some(true) { "0" } else { "1" }), "{status}");
    assert_eq!(field("Seccomp"), Some("2"), "{status}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{out:?}");

    let mut args = podman_run_args(&spec, &c, &mounts, &env);
    args.push(tag.clone());
    let argv: Vec<String> = c.args.clone().unwrap_or(pod::dockerfile_image().cmd);
    args.extend(argv.iter().cloned());
    let log = work.join("podman.log");
    let out = std::fs::File::create(&log).unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = podman(&args).stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap();
    let mut container = Running(child);
    pod::wait_ready(&argv, &mut container, &log, T);
    pod::assert_state_and_host_lock(&mounts, &argv, &work, &log);
    // Ready means the watches have listed from the real API server (as the ServiceAccount, from
    // the in-cluster configuration); its heartbeat Lease is written there too.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(server.admin.clone(), "virtwarden");
    let beat = pod::poll(T, || rt.block_on(leases.get_opt("kvm-1")).is_ok_and(|l| l.is_some()));
    assert!(beat, "no heartbeat Lease of kvm-1:\n{}", std::fs::read_to_string(&log).unwrap());

    // Stopped as the kubelet stops it: SIGTERM to PID 1, a clean exit.
    let out = podman(&["stop", "-t", "20", "vw-pod"]).output().unwrap();
    assert!(out.status.success(), "podman stop: {}", String::from_utf8_lossy(&out.stderr));
    let status = container.0.wait().unwrap();
    assert!(status.success(), "{status}:\n{}", std::fs::read_to_string(&log).unwrap());
}
