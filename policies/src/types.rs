//! The HostPolicy document: the one policy language shared by host files and the CRD.
//! Field names are the public contract; every struct rejects unknown fields.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::health::Health;
use crate::startup::Startup;

/// The only accepted `apiVersion`.
pub const API_VERSION: &str = "virtwarden.io/v1alpha1";
/// The only accepted `kind`.
pub const KIND: &str = "HostPolicy";

/// One policy document as written in a YAML file.
///
/// ```yaml
/// apiVersion: virtwarden.io/v1alpha1
/// kind: HostPolicy
/// metadata: { name: web-tier }
/// spec:
///   domains: [{ name: web1, state: running, restart: on-failure }]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "HostPolicy", description = "Desired state of a libvirt/KVM host, reconciled by virtwarden.")]
pub struct HostPolicy {
    /// Always `virtwarden.io/v1alpha1`.
    #[schemars(extend("enum" = [API_VERSION]))]
    pub api_version: String,
    /// Always `HostPolicy`.
    #[schemars(extend("enum" = [KIND]))]
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: HostPolicySpec,
}

/// Identifies a policy; `name` appears in plans, status and logs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Lowercase letters, digits, `-` and `.`, at most 253 characters (a Kubernetes object name).
    pub name: String,
    /// Kubernetes labels (ignored in host mode; kept so a document is also a custom resource).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Kubernetes annotations (ignored in host mode).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What the host should look like.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostPolicySpec {
    /// Kubernetes operator only: node labels this policy applies to. Host mode ignores it, so
    /// one document works in both modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// libvirt domains under management. Domains not listed in any policy are never touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainPolicy>,
    /// Linux bridges under management. Bridges not listed in any policy are never touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<BridgePolicy>,
    /// IP forwarding of the host's network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<Forwarding>,
}

/// Desired state and healing rules for one libvirt domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainPolicy {
    /// The libvirt domain name.
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default)]
    pub state: DesiredDomainState,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Enforce libvirt's autostart flag; absent leaves it as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// Desired boot order of the persistent definition; absent leaves it as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Vec<BootDevice>>,
    /// Crash-loop protection; absent fields take the documented defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Escalation ladder tried as consecutive failures accumulate; absent means `start` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation: Option<Vec<RemediationStep>>,
    /// How long a graceful shutdown may take before the domain is destroyed (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<Duration>,
    /// Probe the guest from the host; absent: libvirt's state alone decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Start ordering and dependencies; absent: no constraints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<Startup>,
}

/// Default wait for a graceful shutdown before falling back to destroy.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

impl DomainPolicy {
    /// A policy with every optional field absent (handy for tests and builders).
    pub fn named(name: impl Into<String>) -> Self {
        DomainPolicy {
            name: name.into(),
            state: DesiredDomainState::default(),
            restart: RestartPolicy::default(),
            autostart: None,
            boot: None,
            backoff: None,
            remediation: None,
            shutdown_timeout: None,
            health: None,
            startup: None,
        }
    }

    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT)
    }
}

/// Whether the domain should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DesiredDomainState {
    /// Keep it running (how a stop is treated depends on `restart`).
    #[default]
    Running,
    /// Keep it shut off: shut down gracefully, destroy after `shutdownTimeout`.
    Stopped,
    /// Observe and report only; never act on it.
    Ignored,
}

/// When a domain that stopped is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After any stop, including a guest or admin shutdown.
    Always,
    /// Only after a crash; a guest or admin shutdown is honoured.
    #[default]
    OnFailure,
    /// Never restart; only report.
    Never,
}

/// A boot device class, as libvirt's `<os><boot dev=…>` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BootDevice {
    Hd,
    Cdrom,
    Network,
    Fd,
}

impl BootDevice {
    /// The name libvirt uses in `<boot dev=…>`.
    pub fn as_str(self) -> &'static str {
        match self {
            BootDevice::Hd => "hd",
            BootDevice::Cdrom => "cdrom",
            BootDevice::Network => "network",
            BootDevice::Fd => "fd",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hd" => Some(BootDevice::Hd),
            "cdrom" => Some(BootDevice::Cdrom),
            "network" => Some(BootDevice::Network),
            "fd" => Some(BootDevice::Fd),
            _ => None,
        }
    }
}

impl std::fmt::Display for BootDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Crash-loop protection. See [`Backoff::resolve`] for the defaults.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// Delay before restarting a domain that failed again soon after a restart (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay: Option<Duration>,
    /// Upper bound of the doubling delay (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<Duration>,
    /// Healthy uptime after which the failure count resets (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_after: Option<Duration>,
    /// More restarts than this within `window` quarantines the domain (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_restarts: Option<u32>,
    /// Sliding window for `maxRestarts` (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
}

/// [`Backoff`] with every default filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffSettings {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub reset_after: Duration,
    pub max_restarts: u32,
    pub window: Duration,
}

impl BackoffSettings {
    pub const DEFAULT: BackoffSettings = BackoffSettings {
        initial_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(300),
        reset_after: Duration::from_secs(600),
        max_restarts: 10,
        window: Duration::from_secs(3600),
    };
}

impl Backoff {
    pub fn resolve(backoff: Option<&Backoff>) -> BackoffSettings {
        let d = BackoffSettings::DEFAULT;
        let Some(b) = backoff else { return d };
        BackoffSettings {
            initial_delay: b.initial_delay.unwrap_or(d.initial_delay),
            max_delay: b.max_delay.unwrap_or(d.max_delay),
            reset_after: b.reset_after.unwrap_or(d.reset_after),
            max_restarts: b.max_restarts.unwrap_or(d.max_restarts),
            window: b.window.unwrap_or(d.window),
        }
    }
}

/// One rung of the remediation ladder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemediationStep {
    pub action: RemediationAction,
    /// Used from this many consecutive failures on (default 0 = from the first failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u32>,
    /// `exec` only: argv, no shell; the first element is an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `exec` only: kill the command after this long (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// Default time an `exec` remediation may run.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// A remediation the engine knows how to carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RemediationAction {
    Start,
    Reset,
    DestroyStart,
    RedefineBootOrder,
    Exec,
}

impl RemediationAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RemediationAction::Start => "start",
            RemediationAction::Reset => "reset",
            RemediationAction::DestroyStart => "destroy-start",
            RemediationAction::RedefineBootOrder => "redefine-boot-order",
            RemediationAction::Exec => "exec",
        }
    }
}

/// A Linux bridge and its ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BridgePolicy {
    /// Interface name: 1–15 bytes, no `/`, `:` or whitespace.
    #[schemars(length(min = 1, max = 15))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stp: Option<Stp>,
    /// Host interfaces that must be ports of this bridge. VM taps follow from the domains' XML.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Allow changing the ports or STP settings of a bridge that carries one of the host's
    /// uplinks: `false` (default), `true`, or `"force"`. An uplink is an interface with a default
    /// route in any routing table (multipath and nexthop-object routes included) or with a
    /// global address; it counts when it is the bridge, one of its ports, or a port listed here.
    /// With `true` a listed uplink port is taken over (its MAC, MTU, addresses, routes and rules
    /// move to the bridge), verified, and rolled back if verification fails; other listed ports
    /// and STP changes are verified and rolled back the same way; an uplink that a DHCP client,
    /// NetworkManager or systemd-networkd manages is refused unless `"force"`.
    #[serde(default, skip_serializing_if = "UplinkChange::is_never")]
    pub allow_uplink_change: UplinkChange,
    /// Probes that must pass after an uplink change, besides the default gateways answering
    /// ARP/NDP on the new path: `[{ping: {address: 198.51.100.1}}, {tcp: {address: …, port: 22}}]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify: Vec<VerifyProbe>,
    /// How long verification of an uplink change may take before it is rolled back (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_timeout: Option<Duration>,
}

/// Default time verification of an uplink change may take.
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

impl BridgePolicy {
    pub fn verify_timeout(&self) -> Duration {
        self.verify_timeout.unwrap_or(DEFAULT_VERIFY_TIMEOUT)
    }
}

/// `allowUplinkChange`: `false`, `true` or `"force"` (older files with a bool keep working).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UplinkChange {
    /// Never touch a bridge that carries an uplink.
    #[default]
    Never,
    /// Change it, taking the uplink over with checkpoint, verification and rollback; refused
    /// while another manager (DHCP client, NetworkManager, systemd-networkd) runs the uplink.
    Allow,
    /// As `Allow`, even when another manager runs the uplink.
    Force,
}

impl UplinkChange {
    pub fn is_never(&self) -> bool {
        matches!(self, UplinkChange::Never)
    }
    pub fn allowed(&self) -> bool {
        !self.is_never()
    }
}

impl Serialize for UplinkChange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UplinkChange::Never => s.serialize_bool(false),
            UplinkChange::Allow => s.serialize_bool(true),
            UplinkChange::Force => s.serialize_str("force"),
        }
    }
}

impl<'de> Deserialize<'de> for UplinkChange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = UplinkChange;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or \"force\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<UplinkChange, E> {
                Ok(if v { UplinkChange::Allow } else { UplinkChange::Never })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UplinkChange, E> {
                match v {
                    "force" => Ok(UplinkChange::Force),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for UplinkChange {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "UplinkChange".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // One enum of mixed types: a Kubernetes structural schema allows no typed anyOf branches,
        // and a field without a type must preserve unknown fields.
        schemars::json_schema!({
            "description": "false (default), true, or \"force\" (also when a DHCP client or network manager runs the uplink).",
            "enum": [false, true, "force"],
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
    fn inline_schema() -> bool {
        true
    }
}

/// One verification probe of an uplink change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum VerifyProbe {
    /// An ICMP echo answered.
    Ping { address: std::net::IpAddr },
    /// A TCP connection accepted.
    Tcp { address: std::net::IpAddr, port: u16 },
}

impl std::fmt::Display for VerifyProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifyProbe::Ping { address } => write!(f, "ping {address}"),
            VerifyProbe::Tcp { address: std::net::IpAddr::V6(a), port } => write!(f, "tcp [{a}]:{port}"),
            VerifyProbe::Tcp { address, port } => write!(f, "tcp {address}:{port}"),
        }
    }
}

/// Spanning tree settings; timers in seconds, as `ip link … type bridge` takes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Stp {
    /// Spanning tree on or off.
    pub enabled: bool,
    /// Seconds, 2–30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 30))]
    pub forward_delay: Option<u32>,
    /// Seconds, 1–10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub hello_time: Option<u32>,
    /// Seconds, 6–40.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 6, max = 40))]
    pub max_age: Option<u32>,
    /// Bridge priority, 0–65535 (lower wins the root election).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
}

/// The kernel's accepted ranges (seconds) for STP timers while STP is on.
pub const FORWARD_DELAY_RANGE: std::ops::RangeInclusive<u32> = 2..=30;
pub const HELLO_TIME_RANGE: std::ops::RangeInclusive<u32> = 1..=10;
pub const MAX_AGE_RANGE: std::ops::RangeInclusive<u32> = 6..=40;

/// IP forwarding switches; absent leaves the setting as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Forwarding {
    /// `net/ipv4/ip_forward`; absent leaves it as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    /// `net/ipv6/conf/all/forwarding`; absent leaves it as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
}

#[cfg(test)]
mod uplink_change_tests {
    use super::*;

    fn bridge(extra: &str) -> Result<BridgePolicy, String> {
        serde_saphyr::from_str::<BridgePolicy>(&format!("name: br0\n{extra}")).map_err(|e| e.to_string())
    }

    #[test]
    fn allow_uplink_change_takes_true_false_and_force() {
        assert_eq!(bridge("").unwrap().allow_uplink_change, UplinkChange::Never);
        assert_eq!(bridge("allowUplinkChange: false\n").unwrap().allow_uplink_change, UplinkChange::Never);
        assert_eq!(bridge("allowUplinkChange: true\n").unwrap().allow_uplink_change, UplinkChange::Allow);
        assert_eq!(bridge("allowUplinkChange: force\n").unwrap().allow_uplink_change, UplinkChange::Force);
        assert_eq!(bridge("allowUplinkChange: \"force\"\n").unwrap().allow_uplink_change, UplinkChange::Force);
        let err = bridge("allowUplinkChange: always\n").unwrap_err();
        assert!(err.contains("force"), "{err}");
        let b = bridge("allowUplinkChange: force\nverify: [{ping: {address: 198.51.100.1}}, {tcp: {address: 198.51.100.1, port: 22}}]\nverifyTimeout: 3s\n").unwrap();
        assert_eq!(b.verify.len(), 2);
        assert_eq!(b.verify[1].to_string(), "tcp 198.51.100.1:22");
        assert_eq!(b.verify_timeout(), Duration::from_secs(3));
        // Round trip: the bool stays a bool.
        let json = serde_json::to_value(bridge("allowUplinkChange: true\n").unwrap()).unwrap();
        assert_eq!(json["allowUplinkChange"], serde_json::json!(true));
    }
}
