//! The engine's durable memory: what libvirt cannot tell us after a restart — each domain's
//! restart history, backoff position and quarantine, the last intent observed (stopped on
//! purpose, migrated away) — kept crash-safe in `--data-dir` and read back at start.

pub mod model;
pub mod store;

pub use model::{intent_after, BadHealth, DomainMemory, Intent, Memory, MemoryLoss, Quarantine, TrackerState};
pub use store::{MemoryError, MemoryStore, MEMORY_FILE};
