//! Carrying out planned actions through the hypervisor, then re-reading to verify them.

pub mod boot_xml;
mod execute;
pub mod network;
pub mod remediation;
mod schedule;

pub use execute::{apply_plan, apply_plan_with, execute_action, ActError, ActionOutcome, ApplyReport};
pub use schedule::{ApplyOptions, DEFAULT_PARALLEL};
