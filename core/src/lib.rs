//! virtwarden's backend-neutral core: the observed model, the durable memory, the pure planner,
//! acting through seams, and the engine that drives them. Its Cargo.toml names no backend crate
//! (`virt`, `rtnetlink`, `kube`, `hyper`, …; `make lint` checks it with `cargo tree`): libvirt,
//! netlink, `/proc` and HTTP live in the `virtwarden` crate and reach the engine through the
//! traits here (`hypervisor`, `guest`, `hostnet`, `probe::HttpGet`, `engine::connect`).

pub mod act;
pub mod blocking;
pub mod engine;
pub mod fsutil;
pub mod guest;
pub mod guest_text;
pub mod hostnet;
pub mod hypervisor;
pub mod memory;
pub mod observe;
pub mod plan;
pub mod probe;
