//! Carrying out planned actions through the hypervisor, then re-reading to verify them.

pub mod boot_xml;
mod execute;
pub mod network;
pub mod remediation;

pub use execute::{apply_plan, execute_action, ActError, ActionOutcome, ApplyReport};
