//! virtwarden: a self-healing reconciliation controller for libvirt/KVM hosts.
//! observe → plan (pure) → act → verify; front ends (CLI, host service, operator) drive it.

pub mod act;
pub mod assets;
pub mod blocking;
pub mod cli;
pub mod diagnose;
pub mod engine;
pub mod exit;
pub mod fsutil;
pub mod guest;
pub mod guest_text;
pub mod host;
pub mod hostnet;
pub mod http;
pub mod hypervisor;
pub mod libvirt;
pub mod lock;
pub mod logging;
pub mod memory;
pub mod observe;
pub mod operator;
pub mod plan;
pub mod probe;
pub mod service;
pub mod show;
