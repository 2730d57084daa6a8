//! examples/k8s/daemonset.yaml's container under exactly the confinement that file declares
//! (support/pod.rs derives it from the manifest and the Dockerfile), on the private libvirtd
//! testbed whose network namespace stands in for the node's (`hostNetwork: true`): it starts,
//! connects, writes its state and memory where the manifest mounts them, holds the host lock a
//! host-side `virtwarden apply` respects, and can do what the node needs.

#[path = "support/pod.rs"]
mod pod;
mod testbed;

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use pod::{poll, Cluster, Pod, Running};
use testbed::{inside, work};

const T: Duration = Duration::from_secs(60);

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
    pod::service_account_dir(&sa);
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

    // What the node needs, with these capabilities and mounts: a bridge (netlink, NET_ADMIN)
    // and forwarding written through VIRTWARDEN_PROC_SYS. A one-shot `virtwarden apply` in the
    // same confinement, with its policy as the test's input at /tmp.
    let input = work.join("node-policy");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(
        input.join("node.yaml"),
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: { name: node }\nspec:\n  \
         bridges:\n    - name: brpod\n  forwarding: { ipv4: true }\n",
    )
    .unwrap();
    let apply: Vec<String> = ["/usr/local/bin/virtwarden", "apply", "--connect", "qemu:///system", "/tmp"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = pod.command_with(&apply, Some(&input)).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "apply in the container: {text}");
    assert!(testbed::sh(&["ip", "-d", "link", "show", "brpod"]).contains("bridge"), "{text}");
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim(), "1", "{text}");

    // Started as the manifest starts it.
    let log = work.join("operator.log");
    let mut container = Running(pod.start(&log));
    pod::wait_ready(&pod.argv, &mut container, &log, T);
    pod::assert_state_and_host_lock(&pod.mounts, &pod.argv, &work, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // The API server: reached with the in-cluster configuration (token dir + service env).
    api.set_nonblocking(true).unwrap();
    let reached = poll(T, || api.accept().is_ok());
    assert!(reached, "the operator never connected to {}:{}\n{}", cluster.api_host, cluster.api_port, log_text());
}
