//! examples/k8s/daemonset.yaml's container under exactly the confinement that file declares
//! (support/pod.rs derives it from the manifest and the Dockerfile), on the private libvirtd
//! testbed whose network namespace stands in for the node's (`hostNetwork: true`): it starts,
//! connects, writes its state and memory where the manifest mounts them, holds the host lock a
//! host-side `virtwarden apply` respects, and can do what the node needs.

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "support/pod.rs"]
mod pod;
mod testbed;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kube::Api;
use pod::{poll, Pod, Running};
use testbed::{inside, work};
use virtwarden_crd::HostPolicyEnactment;

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
    if std::env::var_os("VW_TESTBED").is_none() {
        pod::ensure_k8s_testenv();
    }
    if !inside("e2e_the_daemonset_container_runs_under_its_own_confinement") {
        return;
    }
    let work = work();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (server, cluster) = rt.block_on(pod::real_cluster(&work, "kvm-1"));
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
    // Off again: the operator must set it from its HostPolicy below.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "0\n").unwrap();

    // Started as the manifest starts it.
    let log = work.join("operator.log");
    let mut container = Running(pod.start(&log));
    pod::wait_ready(&pod.argv, &mut container, &log, T);
    pod::assert_state_and_host_lock(&pod.mounts, &pod.argv, &work, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Through the real API server, as the DaemonSet's ServiceAccount: a HostPolicy is enforced
    // on this node — a bridge created, forwarding set, a domain kept running — its memory kept in
    // the data volume and its enactment written.
    let hv = testbed::connect();
    testbed::define_guest(&hv, "vm1", "brpod");
    rt.block_on(server.apply_yaml(
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: { name: node }\nspec:\n  \
         bridges:\n    - name: brpod\n    - name: brop\n  forwarding: { ipv4: true }\n  \
         domains:\n    - name: vm1\n      restart: always\n",
    ));
    let has_link =
        |name: &str| Command::new("ip").args(["link", "show", name]).output().is_ok_and(|o| o.status.success());
    let forwarding = || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim() == "1";
    let enforced = poll(T, || has_link("brop") && forwarding() && testbed::running(&hv, "vm1"));
    assert!(enforced, "the HostPolicy was not enforced:\n{}", log_text());
    let pid = testbed::qemu_pid("vm1").expect("vm1's QEMU");
    testbed::kill9(pid);
    let restarted = poll(T, || testbed::running(&hv, "vm1") && testbed::qemu_pid("vm1").is_some_and(|p| p != pid));
    assert!(restarted, "the crashed domain was not restarted:\n{}", log_text());
    let data_dir = pod::arg_value(&pod.argv, "--data-dir").unwrap_or_else(|| "/var/lib/virtwarden".into());
    let memory = pod.source_of(&data_dir).join("memory.json");
    let remembered = poll(T, || std::fs::read_to_string(&memory).is_ok_and(|m| m.contains("\"vm1\"")));
    assert!(remembered, "no restart record in {}:\n{}", memory.display(), log_text());
    let api: Api<HostPolicyEnactment> = Api::all(server.admin.clone());
    let written = poll(T, || {
        rt.block_on(api.list(&Default::default())).is_ok_and(|l| {
            l.items.iter().any(|e| e.spec.node == "kvm-1" && e.spec.policy == "node" && e.status.is_some())
        })
    });
    assert!(written, "no enactment of kvm-1 with status:\n{}", log_text());
}
