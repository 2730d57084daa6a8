//! virtwarden: a self-healing reconciliation controller for libvirt/KVM hosts.
//! observe → plan (pure) → act → verify; front ends (CLI, host service, operator) drive it.
//!
//! The engine, planner and model live in the backend-neutral `virtwarden-core` crate (core/);
//! they are re-exported here under their old paths. This crate holds the backends (libvirt,
//! netlink and `/proc`, hyper, Kubernetes), diagnosis and the front ends.

pub use virtwarden_core::{act, blocking, engine, fsutil, guest, guest_text, hypervisor, memory, observe, plan};

pub mod assets;
pub mod cli;
pub mod control;
pub mod diagnose;
pub mod exit;
pub mod host;
pub mod hostnet;
pub mod http;
pub mod libvirt;
pub mod lock;
pub mod logging;
pub mod operator;
/// Probing guests from the host (`virtwarden_core::probe`) and its HTTP backend (`http`).
pub mod probe {
    pub use virtwarden_core::probe::*;
    pub mod http;
}
pub mod service;
pub mod show;
pub mod startup_pages;
