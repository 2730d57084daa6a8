//! Carrying out planned actions through the hypervisor, then re-reading to verify them.

pub mod boot_xml;
mod execute;

pub use execute::{ActError, ActionOutcome, ApplyReport, apply_plan, execute_action};
