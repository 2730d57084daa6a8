//! Carrying out planned actions through the hypervisor, then re-reading to verify them.

pub mod boot_xml;
pub mod remediation;
mod execute;

pub use execute::{apply_plan, execute_action, ActError, ActionOutcome, ApplyReport};
