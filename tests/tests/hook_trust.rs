//! A refused `exec` remediation step through the engine against libvirt's test driver: it is not
//! run, and the domain's status, the metrics and the log say so (operator-mode exec policies).
//! And the registry's `exec` step as the engine's workers call it, on a test-driver connection.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use virtwarden::act::calls::{CallLimits, Calls};
use virtwarden::act::hook::{ExecPolicy, HookError};
use virtwarden::act::remediation::{Registry, RemediationContext, RemediationError};
use virtwarden::engine::status::StatusReport;
use virtwarden::engine::{Engine, EngineConfig};
use virtwarden::hypervisor::DomainControl;
use virtwarden::libvirt::connect::SharedConnector;
use virtwarden::libvirt::events::start_event_loop;
use virtwarden::libvirt::LibvirtHost;
use virtwarden_policies::load_texts;
use virtwarden_tests::testbed_uri;

const WAIT: Duration = Duration::from_secs(10);

fn refused(r: &StatusReport) -> Option<String> {
    r.domains.iter().find(|d| d.name == "web2").and_then(|d| d.refused_hook.clone())
}

/// Run web2 with a ladder of one `exec` step under `exec`, kill it, and return the status once
/// the step was refused: the refusal, the metrics text and `virtwarden status`'s text.
async fn refused_step(hook: &Path, exec: ExecPolicy) -> (String, String, String) {
    let spec = format!(
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: t\nspec:\n  domains:\n    - name: web2\n      restart: always\n      remediation:\n        - action: exec\n          command: [\"{}\"]\n",
        hook.display()
    );
    let desired = load_texts([(Path::new("inline.yaml"), spec.as_str())]).unwrap().desired;
    start_event_loop();
    let host = Arc::new(LibvirtHost::open(&testbed_uri()).unwrap());
    let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
    let (engine, task) = Engine::spawn(
        Arc::new(SharedConnector { host: host.clone() }),
        desired,
        config,
        Registry::with_exec_policy(exec),
    );
    assert!(engine.wait_for(WAIT, |_| engine.is_ready()).await.is_some(), "engine never became ready");
    host.destroy("web2").unwrap();
    let status = engine.wait_for(WAIT, |r| refused(r).is_some()).await;
    let metrics = engine.metrics_text();
    engine.shutdown();
    tokio::time::timeout(WAIT, task).await.expect("engine stops").unwrap();
    let status = status.unwrap_or_else(|| panic!("no refusal reported: {:#?}", engine.status()));
    let text = virtwarden::engine::status::render_text(&status);
    (refused(&status).unwrap_or_default(), metrics, text)
}

fn hook(dir: &Path, marker: &Path) -> std::path::PathBuf {
    let path = dir.join("repair.sh");
    std::fs::write(&path, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_mode_without_an_allowed_directory_refuses_every_exec_step() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let h = hook(tmp.path(), &marker);
    let (refusal, metrics, text) = refused_step(&h, ExecPolicy::Disabled).await;
    assert_eq!(
        refusal,
        format!(
            "refused to run {}: exec steps are disabled in operator mode; start `virtwarden operator` with --allow-exec-dir DIR",
            h.display()
        )
    );
    assert!(metrics.contains("virtwarden_hooks_refused_total{reason=\"exec-disabled\"}"), "{metrics}");
    assert!(text.contains(&format!("hook not run: {refusal}")), "{text}");
    assert!(!marker.exists(), "a refused hook never runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_mode_refuses_an_exec_step_outside_the_allowed_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(tmp.path()).unwrap();
    let allowed = root.join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let marker = root.join("ran");
    let h = hook(&root, &marker);
    let (refusal, metrics, _) = refused_step(&h, ExecPolicy::InsideDir(allowed.clone())).await;
    assert!(
        refusal.ends_with(&format!(
            "it resolves to {}, outside the allowed directory {}",
            h.display(),
            allowed.display()
        )),
        "{refusal}"
    );
    assert!(metrics.contains("virtwarden_hooks_refused_total{reason=\"outside-allowed-dir\"}"), "{metrics}");
    assert!(!marker.exists(), "a refused hook never runs");
}

/// Through the registry, as the engine's workers call it (moved here from `act/hook.rs`: it
/// needs a libvirt connection, and the core crate has no libvirt).
#[tokio::test]
async fn through_the_registry_a_failing_hook_runs_once_and_a_refused_one_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let log = dir.join("log");
    let h = dir.join("hook.sh");
    std::fs::write(&h, format!("#!/bin/sh\necho ran >> {}\nexit 1\n", log.display())).unwrap();
    std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hv: Arc<dyn virtwarden::hypervisor::Hypervisor> = Arc::new(LibvirtHost::open("test:///default").unwrap());
    let limits = Arc::new(CallLimits::new(2, Duration::from_secs(5), Duration::from_secs(5)));
    let calls = Calls::new(limits, Arc::new(|_| {})).with_connection(Some(hv));
    let ctx = RemediationContext {
        domain: "test".into(),
        uuid: String::new(),
        reason: "crashed".into(),
        attempt: 1,
        step: virtwarden::plan::restart::Step {
            action: virtwarden_policies::RemediationAction::Exec,
            command: vec![h.to_str().unwrap().into()],
            timeout: Duration::from_secs(10),
        },
        boot: None,
    };
    let exec = virtwarden_policies::RemediationAction::Exec;
    let host = Registry::with_builtins();
    let err = host.get(exec).unwrap().run(&ctx, &calls).await.unwrap_err();
    assert!(matches!(err, RemediationError::Hook(HookError::Exit { .. })), "{err}");
    assert_eq!(err.refused_hook(), None);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ran\n", "run exactly once");
    let operator = Registry::with_exec_policy(ExecPolicy::Disabled);
    let err = operator.get(exec).unwrap().run(&ctx, &calls).await.unwrap_err();
    assert!(err
        .refused_hook()
        .unwrap()
        .starts_with(&format!("refused to run {}: exec steps are disabled", h.display())));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ran\n", "a refused hook does not run");
}
