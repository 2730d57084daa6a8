//! Start ordering and dependencies of a domain (`startup:`), used by `apply` and `run`. The
//! field names are the public contract (issue 13).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// When a domain may start relative to the others.
///
/// ```yaml
/// startup:
///   order: 2
///   after: [db1]
///   delay: 30s
///   requires: {paths: [/mnt/images]}
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Startup {
    /// Lower starts first; the same order starts in parallel; domains without an order start
    /// after all ordered ones. Stops go in reverse order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u32>,
    /// Start only once these domains run (and pass their health probe, if they declare one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// After this domain started, wait this long before the next order group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Duration>,
    /// What must be in place before a start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires: Option<Requires>,
}

/// Preconditions of a start.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requires {
    /// Absolute paths that must exist (storage mounted) before a start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}
