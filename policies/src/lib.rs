//! The virtwarden policy language: `HostPolicy` documents, loading them from files with
//! located errors, semantic validation and merging into one desired state. No host I/O beyond
//! reading policy files and checking who may have written them.

pub mod bounds;
pub mod dependencies;
pub mod desired;
pub mod duration;
pub mod health;
pub mod load;
pub mod locate;
pub mod merge;
pub mod schema;
pub mod startup;
pub mod trust;
pub mod types;
pub mod validate;

pub use desired::{DesiredState, ForwardingSetting, ManagedBridge, ManagedDomain};
pub use duration::Duration;
pub use health::{GuestAgentPing, Health, HttpProbe, Probe, TcpProbe};
pub use load::{load_paths, load_paths_with, load_texts, Diagnostic, LoadError, LoadedPolicies};
pub use startup::{Requires, Startup};
pub use trust::{TrustMode, TrustedOwners};
pub use types::*;
