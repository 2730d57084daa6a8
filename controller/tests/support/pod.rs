//! The DaemonSet's container, run the way a kubelet and runc run it, DERIVED FROM
//! examples/k8s/daemonset.yaml (and the image's ENTRYPOINT/CMD/USER from examples/k8s/Dockerfile)
//! so the test and the shipped manifest cannot drift:
//! - the root file system: a minimal root built from the host's /usr and /etc with the binary at
//!   the image's entrypoint, read-only when `readOnlyRootFilesystem: true` (as runc does: mount
//!   points first, then the root is remounted read-only);
//! - every declared volume at its `mountPath`: `hostPath` from a stand-in for the host (see
//!   [`host_side`]), `emptyDir` fresh (tmpfs for `medium: Memory`), `readOnly` honoured, the
//!   `hostPath` type checked or created as the kubelet does;
//! - the ServiceAccount token directory at /var/run/secrets/kubernetes.io/serviceaccount and the
//!   kubelet's KUBERNETES_SERVICE_HOST/PORT, unless `automountServiceAccountToken: false`;
//! - /proc of its own PID namespace with /proc/sys read-only, /sys read-only, a /dev of its own;
//! - exactly the declared capabilities (the runtime's default set, minus `drop`, plus `add`) in
//!   the bounding, permitted and effective sets, none inheritable or ambient (`setpriv`);
//!   `allowPrivilegeEscalation: false` → no_new_privs; the user of `runAsUser` or the image;
//! - only the declared environment (plus the kubelet's and the image's PATH/HOME/HOSTNAME);
//! - the pod's network: `hostNetwork: true` shares the namespace the test runs in (the testbed's
//!   private one), otherwise a new one.
//!
//! Not reproduced: the `RuntimeDefault` seccomp profile (it is the runtime's, not ours), cgroup
//! limits, the runtime's masked /proc paths. A field this harness does not understand (another
//! volume type, `privileged`, `valueFrom` other than `spec.nodeName`, mount propagation) fails the
//! test, so a manifest change is never silently run under a looser confinement.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};

/// The capabilities containerd and CRI-O give a container that asks for nothing.
pub const RUNTIME_DEFAULT_CAPS: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Where the kubelet mounts the ServiceAccount token.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// examples/k8s/daemonset.yaml, typed.
pub fn daemonset() -> DaemonSet {
    let path = repo().join("examples/k8s/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pod template and its (only) container.
pub fn pod_and_container() -> (PodSpec, Container) {
    let pod = daemonset().spec.expect("spec").template.spec.expect("template.spec");
    assert_eq!(pod.containers.len(), 1, "the harness runs one container");
    let c = pod.containers[0].clone();
    (pod, c)
}

/// What the final stage of examples/k8s/Dockerfile says about running the image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub user: String,
    /// What its `apt-get install` adds to the base image.
    pub packages: Vec<String>,
}

pub fn dockerfile_image() -> ImageConfig {
    let text = std::fs::read_to_string(repo().join("examples/k8s/Dockerfile")).unwrap();
    let last_stage = text.rsplit_once("\nFROM ").expect("a FROM line").1;
    let json = |line: &str| -> Vec<String> {
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("Dockerfile: exec form expected ({e}): {line}"))
    };
    let mut image = ImageConfig { entrypoint: vec![], cmd: vec![], user: "0".into(), packages: vec![] };
    for line in last_stage.lines() {
        if let Some((_, rest)) = line.split_once("apt-get install -y --no-install-recommends ") {
            let list = rest.split("&&").next().unwrap_or("");
            image.packages = list.split_whitespace().map(str::to_string).collect();
        }
        if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            image.entrypoint = json(rest);
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            image.cmd = json(rest);
        } else if let Some(rest) = line.strip_prefix("USER ") {
            image.user = rest.trim().to_string();
        }
    }
    assert!(!image.entrypoint.is_empty(), "Dockerfile: no ENTRYPOINT in the final stage");
    image
}

/// The container's capability set: the runtime default, minus `drop` (ALL empties it), plus
/// `add`; upper case without `CAP_`.
pub fn capabilities(c: &Container) -> BTreeSet<String> {
    let sc = c.security_context.clone().unwrap_or_default();
    assert_ne!(sc.privileged, Some(true), "privileged containers are not what this harness runs");
    let caps = sc.capabilities.unwrap_or_default();
    let norm = |s: &String| s.trim_start_matches("CAP_").to_ascii_uppercase();
    let drop: BTreeSet<String> = caps.drop.iter().flatten().map(norm).collect();
    let mut set: BTreeSet<String> = if drop.contains("ALL") {
        BTreeSet::new()
    } else {
        RUNTIME_DEFAULT_CAPS.iter().map(|s| s.to_string()).filter(|c| !drop.contains(c)).collect()
    };
    set.extend(caps.add.iter().flatten().map(norm));
    set
}

/// The Linux capability bit of a name (only those a manifest could plausibly add).
pub fn cap_bit(name: &str) -> u32 {
    match name {
        "CHOWN" => 0,
        "DAC_OVERRIDE" => 1,
        "FOWNER" => 3,
        "FSETID" => 4,
        "KILL" => 5,
        "SETGID" => 6,
        "SETUID" => 7,
        "SETPCAP" => 8,
        "NET_BIND_SERVICE" => 10,
        "NET_RAW" => 13,
        "NET_ADMIN" => 12,
        "SYS_CHROOT" => 18,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "MKNOD" => 27,
        "AUDIT_WRITE" => 29,
        "SETFCAP" => 31,
        other => panic!("capability {other}: add its bit to the harness"),
    }
}

/// Where a `hostPath` lives on the stand-in host. Inside the testbed /run is a private tmpfs and
/// /proc/sys/net is the private network namespace's, so those are used as they are (a lock
/// there is the one a host-side `virtwarden` in the testbed takes); anything else is redirected
/// under `<work>/host`, never the real host's directory.
pub fn host_side(work: &Path, path: &str) -> PathBuf {
    assert!(path.starts_with('/'), "hostPath {path} is not absolute");
    if path == "/run" || path.starts_with("/run/") || path.starts_with("/proc/sys/net") {
        assert!(std::env::var_os("VW_TESTBED").is_some(), "hostPath {path} outside the testbed would be the host's");
        PathBuf::from(path)
    } else {
        work.join("host").join(path.trim_start_matches('/'))
    }
}

/// What the test gives the pod that the manifest leaves to the cluster.
pub struct Cluster {
    pub node_name: String,
    /// KUBERNETES_SERVICE_HOST / _PORT.
    pub api_host: String,
    pub api_port: u16,
    /// `token`, `ca.crt`, `namespace`: what the kubelet projects into the container.
    pub service_account_dir: PathBuf,
}

/// One mount of the pod: where it comes from on the stand-in host, where it goes inside.
#[derive(Debug, Clone)]
pub struct PodMount {
    pub volume: String,
    pub source: PathBuf,
    pub path: String,
    pub read_only: bool,
    pub is_dir: bool,
}

/// The declared volumes' host sides, prepared as the kubelet does (hostPath type checked or
/// created, emptyDir fresh, tmpfs for `medium: Memory`), shallow mount paths first.
pub fn prepare_volumes(work: &Path, pod: &PodSpec, c: &Container) -> Vec<PodMount> {
    let volumes: BTreeMap<String, Volume> = pod.volumes.iter().flatten().map(|v| (v.name.clone(), v.clone())).collect();
    let mut declared: Vec<_> = c.volume_mounts.clone().unwrap_or_default();
    declared.sort_by_key(|m| m.mount_path.matches('/').count());
    let mut mounts = Vec::new();
    for m in &declared {
        assert!(m.mount_propagation.is_none() && m.sub_path.is_none(), "{}: unsupported mount options", m.name);
        assert!(!m.mount_path.starts_with("/proc"), "{}: mounts under /proc are not supported", m.name);
        let v = volumes.get(&m.name).unwrap_or_else(|| panic!("volumeMount {}: no such volume", m.name));
        let read_only = m.read_only == Some(true);
        let (source, is_dir) = if let Some(hp) = &v.host_path {
            let src = host_side(work, &hp.path);
            let is_dir = match hp.type_.as_deref().unwrap_or("") {
                "Directory" => {
                    assert!(src.is_dir(), "hostPath {} (type Directory) is missing on the host", hp.path);
                    true
                }
                "DirectoryOrCreate" => {
                    mkdirs(&src);
                    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
                    true
                }
                "File" => {
                    assert!(src.is_file(), "hostPath {} (type File) is missing on the host", hp.path);
                    false
                }
                "FileOrCreate" => {
                    if !src.exists() {
                        touch(&src);
                        std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
                    }
                    false
                }
                "" => src.is_dir(),
                other => panic!("hostPath {}: type {other} is not supported by the harness", hp.path),
            };
            (src, is_dir)
        } else if let Some(ed) = &v.empty_dir {
            let src = work.join("emptydir").join(&m.name);
            mkdirs(&src);
            if ed.medium.as_deref() == Some("Memory") {
                let mut opts = "mode=0777".to_string();
                if let Some(q) = &ed.size_limit {
                    opts.push_str(&format!(",size={}", q.0.replace("Mi", "m").replace("Gi", "g").replace("Ki", "k")));
                }
                run(&["mount", "-t", "tmpfs", "-o", &opts, "tmpfs", src.to_str().unwrap()]);
            } else {
                std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
            }
            (src, true)
        } else {
            panic!("volume {}: only hostPath and emptyDir are supported by the harness", v.name);
        };
        mounts.push(PodMount { volume: m.name.clone(), source, path: m.mount_path.clone(), read_only, is_dir });
    }
    mounts
}

/// What the kubelet puts in the container's environment: the API server's address (with a
/// ServiceAccount token mounted) and the manifest's `env`.
pub fn kubelet_env(pod: &PodSpec, c: &Container, cluster: &Cluster) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if pod.automount_service_account_token != Some(false) {
        env.push(("KUBERNETES_SERVICE_HOST".into(), cluster.api_host.clone()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), cluster.api_port.to_string()));
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let path = from.field_ref.as_ref().map(|f| f.field_path.as_str());
                assert_eq!(path, Some("spec.nodeName"), "env {}: only the node name is supported", e.name);
                cluster.node_name.clone()
            }
            _ => panic!("env {}: neither value nor valueFrom", e.name),
        };
        env.push((e.name.clone(), value));
    }
    assert!(c.env_from.is_none(), "envFrom is not supported by the harness");
    env
}

/// The confinement, built once; [`Pod::command`] runs anything inside it.
pub struct Pod {
    pub root: PathBuf,
    pub mounts: Vec<PodMount>,
    pub caps: BTreeSet<String>,
    pub no_new_privs: bool,
    pub read_only_root: bool,
    pub env: Vec<(String, String)>,
    /// entrypoint + args.
    pub argv: Vec<String>,
    uid: u32,
    host_network: bool,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn mkdirs(p: &Path) {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

fn touch(p: &Path) {
    mkdirs(p.parent().unwrap());
    std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
}

fn bind(src: &Path, dst: &Path, read_only: bool) {
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    if read_only {
        run(&["mount", "--bind", "-o", "ro", s, d]);
    } else {
        run(&["mount", "--bind", s, d]);
    }
}

/// A mount point at `inside` (relative symlinks in the root resolve inside it).
fn mount_point(root: &Path, inside: &str, is_dir: bool) -> PathBuf {
    let p = root.join(inside.trim_start_matches('/'));
    if is_dir {
        mkdirs(&p);
    } else {
        touch(&p);
    }
    p
}

impl Pod {
    /// Build the container's root under `work/pod-root` and its mounts, from the manifest.
    /// `binary` is put at the image's entrypoint. Run inside the testbed's mount namespace.
    pub fn from_manifest(work: &Path, cluster: &Cluster, binary: &Path) -> Pod {
        let (pod, c) = pod_and_container();
        let image = dockerfile_image();
        let sc = c.security_context.clone().unwrap_or_default();
        let read_only_root = sc.read_only_root_filesystem == Some(true);
        // Kubernetes sets no_new_privs unless allowPrivilegeEscalation is true (or privileged).
        let no_new_privs = sc.allow_privilege_escalation != Some(true);
        let uid: u32 = match sc.run_as_user.or(pod.security_context.as_ref().and_then(|s| s.run_as_user)) {
            Some(u) => u as u32,
            None => image.user.parse().unwrap_or_else(|_| panic!("Dockerfile USER {}: numeric only", image.user)),
        };
        let caps = capabilities(&c);

        let root = work.join("pod-root");
        mkdirs(&root);
        run(&["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", root.to_str().unwrap()]);
        // The image's layout (merged /usr): the host's /usr and /etc, read-only.
        for entry in std::fs::read_dir("/").unwrap().flatten() {
            let p = entry.path();
            if let Ok(target) = std::fs::read_link(&p) {
                if !target.is_absolute() {
                    std::os::unix::fs::symlink(&target, root.join(entry.file_name())).unwrap();
                }
            }
        }
        mkdirs(&root.join("usr"));
        for entry in std::fs::read_dir("/usr").unwrap().flatten() {
            let (name, p) = (entry.file_name(), entry.path());
            if name == "local" {
                continue;
            }
            if let Ok(target) = std::fs::read_link(&p) {
                std::os::unix::fs::symlink(&target, root.join("usr").join(&name)).unwrap();
            } else if p.is_dir() {
                bind(&p, &mount_point(&root, &format!("/usr/{}", name.to_string_lossy()), true), true);
            }
        }
        bind(Path::new("/etc"), &mount_point(&root, "/etc", true), true);
        for d in ["/proc", "/sys", "/root", "/tmp", "/run", "/var/lib", "/usr/local/bin"] {
            mount_point(&root, d, true);
        }
        std::os::unix::fs::symlink("../run", root.join("var/run")).unwrap();
        let dev = mount_point(&root, "/dev", true);
        run(&["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid", "tmpfs", dev.to_str().unwrap()]);
        for d in ["null", "zero", "full", "random", "urandom", "tty"] {
            bind(&Path::new("/dev").join(d), &mount_point(&root, &format!("/dev/{d}"), false), false);
        }
        run(&["mount", "-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", root.join("sys").to_str().unwrap()]);
        // The binary at the image's entrypoint (when the manifest keeps the image's command).
        let entrypoint = c.command.clone().unwrap_or(image.entrypoint.clone());
        if c.command.is_none() {
            bind(binary, &mount_point(&root, &image.entrypoint[0], false), true);
        }

        let mounts = prepare_volumes(work, &pod, &c);
        for m in &mounts {
            bind(&m.source, &mount_point(&root, &m.path, m.is_dir), m.read_only);
        }
        // The kubelet's projected ServiceAccount volume (read-only).
        let sa_mounted = pod.automount_service_account_token != Some(false);
        if sa_mounted {
            bind(&cluster.service_account_dir, &mount_point(&root, SERVICE_ACCOUNT_DIR, true), true);
        }
        if read_only_root {
            run(&["mount", "-o", "remount,ro", root.to_str().unwrap()]);
        }

        // The environment: the image's, the kubelet's, the manifest's.
        let mut env = vec![
            ("PATH".to_string(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
            ("HOME".to_string(), "/root".to_string()),
            ("HOSTNAME".to_string(), cluster.node_name.clone()),
        ];
        env.extend(kubelet_env(&pod, &c, cluster));
        let mut argv = entrypoint;
        argv.extend(c.args.clone().unwrap_or(if c.command.is_none() { image.cmd } else { vec![] }));
        Pod {
            root,
            mounts,
            caps,
            no_new_privs,
            read_only_root,
            env,
            argv,
            uid,
            host_network: pod.host_network == Some(true),
        }
    }

    /// The stand-in host's side of the mount at `path` inside the container.
    pub fn source_of(&self, path: &str) -> &Path {
        &self.mounts.iter().find(|m| m.path == path).unwrap_or_else(|| panic!("no mount at {path}")).source
    }

    /// `argv` inside the confinement, as PID 1 of its own PID namespace; the environment is the
    /// container's only. Killing the returned process (SIGKILL) kills the container.
    pub fn command(&self, argv: &[String]) -> Command {
        self.command_with(argv, None)
    }

    /// [`Pod::command`] with one more directory, read-only at /tmp (a test's input; this mount
    /// is the test's, not the manifest's, and exists only for this command).
    pub fn command_with(&self, argv: &[String], input: Option<&Path>) -> Command {
        let caps: Vec<String> = self.caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())).collect();
        let bounding = std::iter::once("-all".to_string()).chain(caps).collect::<Vec<_>>().join(",");
        let mut setpriv =
            vec!["/usr/bin/setpriv".to_string(), "--bounding-set".into(), bounding, "--inh-caps".into(), "-all".into()];
        if self.no_new_privs {
            setpriv.push("--no-new-privs".into());
        }
        if self.uid != 0 {
            setpriv.extend([
                "--reuid".into(),
                self.uid.to_string(),
                "--regid".into(),
                self.uid.to_string(),
                "--clear-groups".into(),
            ]);
        }
        setpriv.extend(["--".into(), "/usr/bin/env".into(), "-i".into()]);
        setpriv.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        setpriv.extend(argv.iter().cloned());
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--kill-child", "--mount", "--propagation", "private"]);
        if !self.host_network {
            cmd.arg("--net");
        }
        // /proc of the new PID namespace, /proc/sys read-only (runc's readonlyPaths), then the
        // root, the capabilities and no_new_privs.
        cmd.args([
            "--",
            "/bin/sh",
            "-ec",
            "mount -t proc -o nosuid,nodev,noexec proc \"$0/proc\"\n\
             mount --bind \"$0/proc/sys\" \"$0/proc/sys\"\n\
             mount -o remount,bind,ro,nosuid,nodev,noexec \"$0/proc/sys\"\n\
             if [ -n \"$VW_INPUT\" ]; then mount --bind -o ro \"$VW_INPUT\" \"$0/tmp\"; fi\n\
             cd \"$0\"\nexec chroot \"$0\" \"$@\"",
        ]);
        cmd.arg(&self.root).args(setpriv);
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd.env("VW_INPUT", input.unwrap_or(Path::new("")));
        cmd
    }

    /// The container as the manifest runs it (its entrypoint and args), output to `log`.
    pub fn start(&self, log: &Path) -> Child {
        let out = std::fs::File::create(log).unwrap();
        self.command(&self.argv)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start the container")
    }

    /// Run `argv` in the confinement to completion.
    pub fn exec(&self, argv: &[&str]) -> std::process::Output {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        self.command(&argv).output().expect("run in the container")
    }
}

// ---------------------------------------------------------------- what a node agent must do

/// A throw-away CA certificate, so the in-cluster configuration loads as in a pod.
pub fn service_account_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("openssl")
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

/// The container, killed (with its PID namespace) when the test ends.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn arg_value(argv: &[String], flag: &str) -> Option<String> {
    argv.iter().position(|a| a == flag).and_then(|i| argv.get(i + 1).cloned())
}

/// Poll `cond` every 20 ms for up to `timeout`; whether it came true.
pub fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while !cond() {
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// One plain HTTP/1.0 GET on loopback: (status code, body).
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// Wait until the container answers /readyz on the manifest's `--metrics-addr` (libvirt
/// connected through the mounted socket, first resync done); fails early when it exits.
pub fn wait_ready(argv: &[String], container: &mut Running, log: &Path, timeout: Duration) {
    let metrics = arg_value(argv, "--metrics-addr").expect("--metrics-addr in the manifest");
    let mut exited = None;
    let ready = poll(timeout, || {
        exited = container.0.try_wait().ok().flatten();
        exited.is_some() || get(&metrics, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(ready && exited.is_none(), "not ready on {metrics} ({exited:?}):\n{log_text}");
    assert_eq!(get(&metrics, "/healthz").map(|r| r.0), Some(200), "{log_text}");
    assert!(!log_text.contains("remembering in memory only"), "{log_text}");
}

/// The control socket in the state directory's volume, the data directory's volume in use, and
/// the host-wide lock the host's own file: a host-side `virtwarden apply` with the default lock
/// path is refused, naming the operator.
pub fn assert_state_and_host_lock(mounts: &[PodMount], argv: &[String], work: &Path, log: &Path) {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let source = |path: &str| -> PathBuf {
        mounts.iter().find(|m| m.path == path).unwrap_or_else(|| panic!("no volume at {path}")).source.clone()
    };
    let state_dir = arg_value(argv, "--state-dir").unwrap_or_else(|| "/run/virtwarden".into());
    let socket = source(&state_dir).join("control.sock");
    assert!(socket.exists(), "no {} (state dir {state_dir}):\n{}", socket.display(), log_text());
    let data_dir = arg_value(argv, "--data-dir").unwrap_or_else(|| "/var/lib/virtwarden".into());
    let data = source(&data_dir);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&data).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "the engine made {} its private data directory", data.display());

    let lock = std::fs::read_to_string("/run/virtwarden.lock").expect("the host's lock file");
    assert!(lock.ends_with(" operator\n"), "{lock:?}");
    let policies = work.join("host-policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("p.yaml"),
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: { name: p }\nspec:\n  domains: []\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args(["apply", "--connect", "qemu:///system"])
        .arg(&policies)
        .env_remove("VIRTWARDEN_LOCK_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("another virtwarden is changing this host"), "{stderr}");
    assert!(stderr.contains("`operator`"), "{stderr}");
}

// ---------------------------------------------------------------- the cluster side

/// A real API server (support/apiserver.rs) with the manifests a cluster admin applies
/// (namespace, CRDs, ServiceAccount, RBAC; the admission policy needs 1.30 and is left out),
/// this node's Node object labelled as the DaemonSet's nodeSelector asks, and in
/// `work/serviceaccount` what the kubelet projects into the pod: a TokenRequest token of the
/// DaemonSet's own ServiceAccount (not an admin), the cluster CA and the namespace.
pub async fn real_cluster(work: &Path, node_name: &str) -> (crate::apiserver::ApiServer, Cluster) {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, PostParams};

    let server = crate::apiserver::ApiServer::start().await;
    let k8s = repo().join("examples/k8s");
    for f in ["namespace.yaml", "crd.yaml", "serviceaccount.yaml", "rbac.yaml"] {
        server.apply_yaml(&std::fs::read_to_string(k8s.join(f)).unwrap()).await;
    }
    eprintln!("examples/k8s/admission-policy.yaml not applied: ValidatingAdmissionPolicy needs Kubernetes 1.30, this API server is 1.20");
    let ds = daemonset();
    let spec = ds.spec.clone().unwrap().template.spec.unwrap();
    let node = Node {
        metadata: kube::api::ObjectMeta {
            name: Some(node_name.into()),
            labels: spec.node_selector.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Node>::all(server.admin.clone()).create(&PostParams::default(), &node).await.expect("create the Node");
    let namespace = ds.metadata.namespace.clone().expect("the DaemonSet's namespace");
    let account = spec.service_account_name.clone().expect("the DaemonSet's serviceAccountName");
    let dir = work.join("serviceaccount");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), server.service_account_token(&namespace, &account).await).unwrap();
    std::fs::copy(server.dir().join("pki/ca.crt"), dir.join("ca.crt")).unwrap();
    std::fs::write(dir.join("namespace"), &namespace).unwrap();
    let cluster = Cluster {
        node_name: node_name.into(),
        api_host: "127.0.0.1".into(),
        api_port: server.api_port,
        service_account_dir: dir,
    };
    (server, cluster)
}

/// The real API server's binaries (controller/tests/k8s/testenv.sh, a no-op when built): run
/// before entering the testbed, which has no network to build them.
pub fn ensure_k8s_testenv() {
    let script = repo().join("controller/tests/k8s/testenv.sh");
    let status = Command::new(&script).status().unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(status.success(), "{} failed: no real API server to test against", script.display());
}
