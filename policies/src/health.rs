//! Guest health: how virtwarden probes a guest from the host (`health:` of a domain). The field
//! names are the public contract (issue 11); defaults are documented on each field.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// Default probe period.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(10);
/// Default time one probe may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of consecutive failures, after the guest was healthy, that make it unhealthy.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Default time a guest has after a start or reset to pass its probe.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Probing a guest from the host.
///
/// ```yaml
/// health:
///   probe: {http: {port: 80, path: /healthz}}
///   period: 10s
///   failureThreshold: 3
///   bootTimeout: 5m
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Health {
    pub probe: Probe,
    /// The guest's address; absent: from the guest agent, then the DHCP lease, then ARP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// Time between probes (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Duration>,
    /// Time one probe may take (default 2s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Consecutive failures after the guest was healthy that make it unhealthy (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub failure_threshold: Option<u32>,
    /// The probe must pass this soon after every start or reset, else "boot failed" (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_timeout: Option<Duration>,
}

impl Health {
    pub fn period(&self) -> Duration {
        self.period.unwrap_or(DEFAULT_PERIOD)
    }
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }
    pub fn failure_threshold(&self) -> u32 {
        self.failure_threshold.unwrap_or(DEFAULT_FAILURE_THRESHOLD)
    }
    pub fn boot_timeout(&self) -> Duration {
        self.boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT)
    }
}

/// What one probe does; exactly one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Probe {
    /// HTTP GET; success is a 2xx or 3xx answer.
    Http(HttpProbe),
    /// A TCP connection is accepted.
    Tcp(TcpProbe),
    /// The QEMU guest agent answers `guest-ping` (through libvirt).
    GuestAgentPing(GuestAgentPing),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpProbe {
    /// TCP port of the guest's HTTP service (1–65535).
    pub port: u16,
    /// Request path (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpProbe {
    /// TCP port that must accept a connection (1–65535).
    pub port: u16,
}

/// No settings: the probe's `timeout` is the agent command's timeout.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuestAgentPing {}
