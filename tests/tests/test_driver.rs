//! Engine tests against libvirt's own test driver (in-process, no daemon): real libvirt
//! semantics for start, shutdown, autostart and define, on `examples/testbed/node.xml` and
//! `test:///default`.

use std::collections::BTreeSet;

use virtwarden::act::apply_plan;
use virtwarden::hypervisor::{DomainControl, DomainReader};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::{domain_xml::parse_domain_xml, BootStyle, DomainState};
use virtwarden::plan::{plan, render_text, ActionKind};
use virtwarden_policies::{load_paths, BootDevice, DesiredState};
use virtwarden_tests::{repo_path, testbed_uri};

fn example_policies() -> DesiredState {
    load_paths(&[repo_path("examples/policies")]).expect("examples are valid").desired
}

fn policy(spec: &str) -> DesiredState {
    virtwarden_tests::inline_policy(spec)
}

/// The persistent XML's lines without `<boot …/>` elements (libvirt formats one element a line).
fn lines_without_boot(xml: &str) -> Vec<String> {
    xml.lines().filter(|l| !l.trim_start().starts_with("<boot ")).map(str::to_string).collect()
}

#[test]
fn plan_shows_drift_apply_converges_plan_shows_none() {
    let host = LibvirtHost::open(&testbed_uri()).unwrap();
    let desired = example_policies();
    let before = plan(&desired, &host.observe_host().unwrap());
    let kinds: BTreeSet<(&str, &str)> = before.actions.iter().map(|a| (a.domain.as_str(), a.kind.name())).collect();
    let expected: BTreeSet<(&str, &str)> = [
        ("db1", "set-autostart"),
        ("web1", "set-boot-order"),
        ("web1", "set-autostart"),
        ("web1", "start"),
        ("web2", "set-boot-order"),
        ("web2", "set-autostart"),
        ("batch1", "shutdown"),
    ]
    .into_iter()
    .collect();
    assert_eq!(kinds, expected, "plan was:\n{}", render_text(&before));

    let report = apply_plan(&host, &desired, &before).unwrap();
    assert_eq!(report.failed(), 0, "{:#?}", report.outcomes);
    assert!(report.converged(), "left over:\n{}", render_text(&report.remaining));

    // Observe independently once more: the host is as the policies say.
    let after = host.observe_host().unwrap();
    assert!(plan(&desired, &after).is_empty());
    let web1 = after.domain("web1").unwrap();
    assert_eq!(web1.state, DomainState::Running);
    assert!(web1.autostart);
    assert_eq!(web1.boot.order, [BootDevice::Hd, BootDevice::Network]);
    assert_eq!(after.domain("batch1").unwrap().state, DomainState::ShutOff);
    assert_eq!(after.domain("batch1").unwrap().reason.as_str(), "shutdown");
    // cache1 is `state: ignored`: still paused.
    assert_eq!(after.domain("cache1").unwrap().state, DomainState::Paused);
}

#[test]
fn unmanaged_domains_are_untouched() {
    let host = LibvirtHost::open(&testbed_uri()).unwrap();
    let legacy_before = host.observe_domain("legacy").unwrap().unwrap();
    let legacy_xml_before = host.persistent_xml("legacy").unwrap();
    let desired = example_policies();
    let p = plan(&desired, &host.observe_host().unwrap());
    assert!(p.actions.iter().all(|a| a.domain != "legacy"));
    apply_plan(&host, &desired, &p).unwrap();
    assert_eq!(host.observe_domain("legacy").unwrap().unwrap(), legacy_before);
    assert_eq!(host.persistent_xml("legacy").unwrap(), legacy_xml_before);
}

#[test]
fn os_style_boot_rewrite_changes_only_boot_elements() {
    let host = LibvirtHost::open(&testbed_uri()).unwrap();
    let before = host.persistent_xml("web1").unwrap();
    let desired = policy("  domains:\n    - name: web1\n      state: ignored\n      boot: [cdrom, hd, network]\n");
    let mut p = plan(&desired, &host.observe_host().unwrap());
    assert!(p.actions.is_empty(), "ignored domains get no actions");
    // Act on the would-be change directly to test the rewrite on real libvirt.
    let desired = policy("  domains:\n    - name: web1\n      state: stopped\n      boot: [cdrom, hd, network]\n");
    p = plan(&desired, &host.observe_host().unwrap());
    assert_eq!(p.actions.len(), 1, "{}", render_text(&p));
    assert!(matches!(p.actions[0].kind, ActionKind::SetBootOrder { .. }));
    let report = apply_plan(&host, &desired, &p).unwrap();
    assert!(report.converged(), "{:#?}", report);
    let after = host.persistent_xml("web1").unwrap();
    assert_eq!(lines_without_boot(&after), lines_without_boot(&before));
    let boot = parse_domain_xml(&after).unwrap().boot;
    assert_eq!(boot.style, BootStyle::Os);
    assert_eq!(boot.order, [BootDevice::Cdrom, BootDevice::Hd, BootDevice::Network]);
}

#[test]
fn per_device_boot_rewrite_keeps_the_style_and_everything_else() {
    let host = LibvirtHost::open(&testbed_uri()).unwrap();
    let before = host.persistent_xml("web2").unwrap();
    let desired = policy("  domains:\n    - name: web2\n      boot: [cdrom, network]\n");
    let p = plan(&desired, &host.observe_host().unwrap());
    let report = apply_plan(&host, &desired, &p).unwrap();
    assert!(report.converged(), "{:#?}", report);
    let after = host.persistent_xml("web2").unwrap();
    assert_eq!(lines_without_boot(&after), lines_without_boot(&before));
    let boot = parse_domain_xml(&after).unwrap().boot;
    assert_eq!(boot.style, BootStyle::PerDevice);
    assert_eq!(boot.order, [BootDevice::Cdrom, BootDevice::Network]);
    assert!(!after.contains("<boot dev="), "per-device style must not gain <os><boot>: {after}");
}

#[test]
fn impossible_boot_order_fails_and_is_reported() {
    let host = LibvirtHost::open(&testbed_uri()).unwrap();
    let desired = policy("  domains:\n    - name: web2\n      boot: [fd]\n");
    let p = plan(&desired, &host.observe_host().unwrap());
    let report = apply_plan(&host, &desired, &p).unwrap();
    assert_eq!(report.failed(), 1);
    let err = report.outcomes[0].error.as_deref().unwrap();
    assert!(err.contains("no such device"), "{err}");
    assert!(!report.converged());
    assert_eq!(report.remaining.actions.len(), 1, "the drift is still planned after a failure");
}

#[test]
fn autostart_is_set_and_cleared() {
    let host = LibvirtHost::open(&testbed_uri()).unwrap();
    for on in [true, false] {
        let desired = policy(&format!("  domains:\n    - name: db1\n      autostart: {on}\n"));
        let p = plan(&desired, &host.observe_host().unwrap());
        if on {
            assert_eq!(p.actions.len(), 1, "{}", render_text(&p));
        }
        let report = apply_plan(&host, &desired, &p).unwrap();
        assert!(report.converged());
        assert_eq!(host.observe_domain("db1").unwrap().unwrap().autostart, on);
    }
}

#[test]
fn observes_interfaces_disks_and_networks() {
    let host = LibvirtHost::open(&testbed_uri()).unwrap();
    let observed = host.observe_host().unwrap();
    let web2 = observed.domain("web2").unwrap();
    assert_eq!(web2.uuid, "4dea22b3-1d52-d8f3-2516-782e98a3e002");
    assert_eq!(web2.interfaces[0].kind, "network");
    assert_eq!(web2.interfaces[0].source.as_deref(), Some("default"));
    assert_eq!(web2.interfaces[0].mac.as_deref(), Some("52:54:00:00:01:02"));
    assert!(web2.interfaces[0].target.is_some(), "a running domain has a tap");
    assert_eq!(web2.disks.len(), 2);
    assert_eq!(web2.disks[1].device, "cdrom");
    assert_eq!(web2.boot.style, BootStyle::PerDevice);
    let web1 = observed.domain("web1").unwrap();
    assert_eq!(web1.interfaces[0].source.as_deref(), Some("br0"));
    assert_eq!(web1.disks[0].driver_type.as_deref(), Some("qcow2"));
    assert_eq!(web1.disks[0].source.as_deref(), Some("/var/lib/libvirt/images/web1.qcow2"));
    assert_eq!(observed.networks[0].name, "default");
    assert_eq!(observed.networks[0].bridge.as_deref(), Some("virbr0"));
    assert_eq!(observed.domain("cache1").unwrap().state, DomainState::Paused);
}
