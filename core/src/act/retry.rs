//! Retrying single idempotent libvirt calls after transient errors (a held job lock, a
//! timeout). A wrapper around any [`Hypervisor`], so a retry repeats exactly one call — never a
//! reset, a destroy-then-start sequence or a hook, which are not safe to repeat.

use std::sync::Arc;
use std::time::Duration;

use backon::{BlockingRetryable, ExponentialBuilder};

use crate::hypervisor::{DomainControl, DomainReader, Hypervisor, HypervisorError};
use crate::observe::{DomainState, ObservedDomain, ObservedHost, ObservedNetwork, StateReason};

/// How transient errors are retried: 200 ms doubling to 2 s, five times, with jitter.
fn policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(5)
        .with_jitter()
}

fn retry<T>(
    op: &'static str,
    name: &str,
    call: impl FnMut() -> Result<T, HypervisorError>,
) -> Result<T, HypervisorError> {
    call.retry(policy())
        .sleep(std::thread::sleep)
        .when(HypervisorError::is_transient)
        .notify(|e, after| tracing::warn!(domain = name, op, %e, ?after, "transient libvirt error; retrying this call"))
        .call()
}

/// Retries the idempotent calls of the hypervisor it wraps; `reset` is passed through once.
pub struct RetryIdempotent(pub Arc<dyn Hypervisor>);

impl DomainReader for RetryIdempotent {
    fn is_alive(&self) -> bool {
        self.0.is_alive()
    }

    fn guest_access(&self) -> Option<&dyn crate::guest::GuestAccess> {
        self.0.guest_access()
    }

    fn observe_host(&self) -> Result<ObservedHost, HypervisorError> {
        retry("observe", "", || self.0.observe_host())
    }

    fn observe_domain(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
        retry("observe", name, || self.0.observe_domain(name))
    }

    fn list_networks(&self) -> Result<Vec<ObservedNetwork>, HypervisorError> {
        retry("list networks", "", || self.0.list_networks())
    }

    fn domain_state_reason(&self, name: &str) -> Result<Option<(DomainState, StateReason)>, HypervisorError> {
        retry("state", name, || self.0.domain_state_reason(name))
    }
}

impl DomainControl for RetryIdempotent {
    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        retry("start", name, || self.0.start(name))
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        retry("shutdown", name, || self.0.shutdown(name))
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        retry("destroy", name, || self.0.destroy(name))
    }

    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        retry("resume", name, || self.0.resume(name))
    }

    /// Not idempotent: a second reset resets the guest again.
    fn reset(&self, name: &str) -> Result<(), HypervisorError> {
        self.0.reset(name)
    }

    fn set_autostart(&self, name: &str, on: bool) -> Result<(), HypervisorError> {
        retry("set autostart", name, || self.0.set_autostart(name, on))
    }

    fn persistent_xml(&self, name: &str) -> Result<String, HypervisorError> {
        retry("dumpxml", name, || self.0.persistent_xml(name))
    }

    fn define_xml(&self, name: &str, xml: &str) -> Result<(), HypervisorError> {
        retry("define", name, || self.0.define_xml(name, xml))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::hypervisor::ErrorKind;

    /// Fails the first `fail` calls of every operation with a transient error; counts calls.
    #[derive(Default)]
    struct Flaky {
        fail: u32,
        calls: Mutex<Vec<&'static str>>,
        failed: AtomicU32,
    }

    impl Flaky {
        fn call(&self, op: &'static str) -> Result<(), HypervisorError> {
            self.calls.lock().unwrap().push(op);
            if self.failed.load(Ordering::SeqCst) < self.fail {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return Err(HypervisorError::Simulated {
                    op,
                    domain: "web1".into(),
                    kind: ErrorKind::Transient,
                    message: "cannot acquire state change lock".into(),
                });
            }
            Ok(())
        }
    }

    impl DomainReader for Flaky {
        fn observe_host(&self) -> Result<ObservedHost, HypervisorError> {
            Ok(ObservedHost::default())
        }
        fn observe_domain(&self, _: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
            Ok(None)
        }
    }

    crate::act::control_by_call!(Flaky);

    #[test]
    fn an_idempotent_call_is_repeated_alone_until_it_works() {
        let flaky = Arc::new(Flaky { fail: 2, ..Default::default() });
        let hv = RetryIdempotent(flaky.clone());
        hv.start("web1").unwrap();
        assert_eq!(*flaky.calls.lock().unwrap(), ["start", "start", "start"]);
    }

    #[test]
    fn a_reset_is_never_repeated() {
        let flaky = Arc::new(Flaky { fail: 1, ..Default::default() });
        let hv = RetryIdempotent(flaky.clone());
        assert!(hv.reset("web1").is_err());
        assert_eq!(*flaky.calls.lock().unwrap(), ["reset"]);
    }
}
