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
