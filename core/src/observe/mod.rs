//! Observing the host: the plain-data model and the readers that fill it.

pub mod arp;
pub mod console;
pub mod domain_xml;
pub mod guarded;
pub mod guest_devices;
pub mod host_addrs;
pub mod model;
pub mod net;
pub mod paths;
pub mod reason;

pub use model::*;
pub use net::*;
pub use reason::StateReason;
