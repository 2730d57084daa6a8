//! Carrying out planned actions through the hypervisor, then re-reading to verify them.

pub mod boot_xml;
pub mod calls;
mod execute;
pub mod hook;
pub mod network;
pub mod remediation;
pub mod retry;
mod schedule;
pub mod shutdown;
pub mod uplink;

pub use execute::{apply_plan, apply_plan_with, execute_action, ActError, ActionOutcome, ApplyReport};
pub use schedule::{ApplyOptions, DEFAULT_PARALLEL};

/// For test fakes: a `DomainControl` whose every call is the type's own `call(name)` (which
/// records it and says how it went); `persistent_xml` answers an empty document.
#[cfg(test)]
macro_rules! control_by_call {
    ($t:ty) => {
        impl crate::hypervisor::DomainControl for $t {
            fn start(&self, _: &str) -> Result<(), crate::hypervisor::HypervisorError> {
                self.call("start")
            }
            fn shutdown(&self, _: &str) -> Result<(), crate::hypervisor::HypervisorError> {
                self.call("shutdown")
            }
            fn destroy(&self, _: &str) -> Result<(), crate::hypervisor::HypervisorError> {
                self.call("destroy")
            }
            fn resume(&self, _: &str) -> Result<(), crate::hypervisor::HypervisorError> {
                self.call("resume")
            }
            fn reset(&self, _: &str) -> Result<(), crate::hypervisor::HypervisorError> {
                self.call("reset")
            }
            fn set_autostart(&self, _: &str, _: bool) -> Result<(), crate::hypervisor::HypervisorError> {
                self.call("autostart")
            }
            fn persistent_xml(&self, _: &str) -> Result<String, crate::hypervisor::HypervisorError> {
                self.call("dumpxml").map(|_| String::new())
            }
            fn define_xml(&self, _: &str, _: &str) -> Result<(), crate::hypervisor::HypervisorError> {
                self.call("define")
            }
        }
    };
}
#[cfg(test)]
pub(crate) use control_by_call;
