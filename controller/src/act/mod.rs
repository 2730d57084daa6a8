//! Carrying out planned actions through the hypervisor, then re-reading to verify them.

pub mod boot_xml;
pub mod calls;
mod execute;
pub mod hook;
pub mod network;
pub mod remediation;
pub mod retry;

pub use execute::{apply_plan, execute_action, ActError, ActionOutcome, ApplyReport};
