//! `test:///default` is shared by every connection in one process, so the tests that use it
//! live in their own test binary and run one after another in a single test.

use virtwarden::act::apply_plan;
use virtwarden::hypervisor::DomainReader;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::DomainState;
use virtwarden::plan::{plan, render_text};
use virtwarden_policies::DesiredState;

fn policy(spec: &str) -> DesiredState {
    virtwarden_tests::inline_policy(spec)
}

#[test]
fn default_test_host_domain_is_stopped_then_started() {
    let host = LibvirtHost::open("test:///default").unwrap();
    let stop = policy("  domains:\n    - name: test\n      state: stopped\n      shutdownTimeout: 5s\n");
    let p = plan(&stop, &host.observe_host().unwrap());
    assert_eq!(p.actions.len(), 1, "{}", render_text(&p));
    assert!(apply_plan(&host, &stop, &p).unwrap().converged());
    let d = host.observe_domain("test").unwrap().unwrap();
    assert_eq!((d.state, d.reason.as_str()), (DomainState::ShutOff, "shutdown"));

    // A guest shutdown is honoured under on-failure, and undone under always.
    let on_failure = policy("  domains:\n    - name: test\n      restart: on-failure\n");
    assert!(plan(&on_failure, &host.observe_host().unwrap()).is_empty());
    let always = policy("  domains:\n    - name: test\n      restart: always\n");
    let p = plan(&always, &host.observe_host().unwrap());
    assert!(apply_plan(&host, &always, &p).unwrap().converged());
    assert_eq!(host.observe_domain("test").unwrap().unwrap().state, DomainState::Running);
}
