//! Prometheus metrics. Labels are bounded: domain names (from policies) and fixed enums, never
//! error strings.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabel {
    pub domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub kind: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabel {
    pub kind: String,
}

/// Why an `exec` hook was refused: a fixed word (see `act::hook::Refusal::kind`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeKindLabel {
    /// `http`, `tcp`, `guest-agent-ping`.
    pub probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeFailureLabels {
    pub domain: String,
    /// [`crate::plan::health::ProbeFailure::kind`]: `timeout`, `refused`, `http-status`, …
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    pub domain: String,
    /// One of [`HEALTH_STATES`].
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuestEventLabels {
    pub domain: String,
    /// [`crate::hypervisor::events::GuestEventKind::label`]: `reboot`, `watchdog`, `io-error`, …
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// `libvirt`, `status` (hung path checks: `required_paths_not_answering`).
    pub pool: String,
}

/// The values of `guest_health`'s `state` label; exactly one is 1 per probed domain.
pub const HEALTH_STATES: [&str; 6] = ["down", "booting", "healthy", "unhealthy", "boot-failed", "suspended"];

type ProbeHistograms = Family<ProbeKindLabel, Histogram, fn() -> Histogram>;

fn probe_histogram() -> Histogram {
    // 100 µs … ~6.5 s: local answers to timeouts.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Every metric the engine exports.
pub struct Metrics {
    pub registry: Registry,
    pub restarts: Family<DomainLabel, Counter>,
    pub actions: Family<ActionLabels, Counter>,
    pub drift: Family<DriftLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub event_lag_seconds: Histogram,
    pub quarantined: Gauge,
    /// 1 for each managed domain that is quarantined, 0 otherwise (for alerts naming it).
    pub domain_quarantined: Family<DomainLabel, Gauge>,
    pub connected: Gauge,
    /// 1 once connected and the first resync round is done (what `/readyz` says), 0 otherwise.
    pub ready: Gauge,
    /// Domains whose start waits for its order group, a dependency, a path or a start slot.
    pub waiting_starts: Gauge,
    pub worker_panics: Counter,
    pub hooks_refused: Family<RefusalLabel, Counter>,
    /// Repairs that started or extended a backoff because another writer keeps changing an
    /// object back, by kind (`stp`, `port`, `tap`, `forwarding`, `bridge`, `boot-order`, …).
    pub writer_conflicts: Family<DriftLabel, Counter>,
    /// Objects whose repairs are backed off now, by kind.
    pub backed_off: Family<DriftLabel, Gauge>,
    /// Uplink changes rolled back (failed verification) and held now.
    pub uplink_rollbacks: Counter,
    pub uplink_held: Gauge,
    /// Guest health (issue 11).
    pub probe_seconds: ProbeHistograms,
    pub probe_failures: Family<ProbeFailureLabels, Counter>,
    pub guest_health: Family<HealthLabels, Gauge>,
    pub guest_events: Family<GuestEventLabels, Counter>,
    /// 1 while the domain's libvirt calls hang (status `stalled`), 0 otherwise.
    pub domain_stalled: Family<DomainLabel, Gauge>,
    pub stalled: Gauge,
    /// Required paths (`startup.requires.paths`) whose check does not return (storage hung).
    pub paths_not_answering: Gauge,
    /// 1 while the durable memory is lost and not yet rebuilt or confirmed.
    pub memory_lost: Gauge,
    /// Threads whose blocking call hangs past its deadline, by pool (read at each scrape).
    pub hung_threads: Family<PoolLabel, Gauge>,
    /// 1 while the domain's probe address is in conflict (its probes are no evidence).
    pub address_conflict: Family<DomainLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("virtwarden");
        let restarts = Family::<DomainLabel, Counter>::default();
        let actions = Family::<ActionLabels, Counter>::default();
        let drift = Family::<DriftLabel, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let event_lag_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 18));
        let quarantined = Gauge::default();
        let connected = Gauge::default();
        let ready = Gauge::default();
        let waiting_starts = Gauge::default();
        let domain_quarantined = Family::<DomainLabel, Gauge>::default();
        let worker_panics = Counter::default();
        registry.register("restarts", "Restarts issued, by domain", restarts.clone());
        registry.register("actions", "Actions carried out, by kind and result (ok|error)", actions.clone());
        registry.register("drift_detected", "Drift found, by kind", drift.clone());
        registry.register("reconcile_duration_seconds", "Time to reconcile one domain", reconcile_seconds.clone());
        registry.register(
            "event_lag_seconds",
            "From a libvirt event's arrival to its reconcile starting",
            event_lag_seconds.clone(),
        );
        registry.register("quarantined_domains", "Domains with automatic restarts stopped", quarantined.clone());
        registry.register(
            "domain_quarantined",
            "1 while the domain is quarantined (no more automatic restarts until `virtwarden release`)",
            domain_quarantined.clone(),
        );
        registry.register("connected", "1 while the libvirt connection is up", connected.clone());
        registry.register("ready", "1 once connected and the first resync is done", ready.clone());
        registry.register(
            "waiting_starts",
            "Domains whose start waits (order group, after, delay, required path, start slot); see status waitingFor",
            waiting_starts.clone(),
        );
        registry.register(
            "worker_panics",
            "Domain workers that panicked and were restarted (a bug: please report it)",
            worker_panics.clone(),
        );
        let hooks_refused = Family::<RefusalLabel, Counter>::default();
        registry.register(
            "hooks_refused",
            "exec hooks refused (not run) by the trust rules, by reason",
            hooks_refused.clone(),
        );
        let writer_conflicts = Family::<DriftLabel, Counter>::default();
        let backed_off = Family::<DriftLabel, Gauge>::default();
        registry.register(
            "writer_conflicts",
            "Repairs backed off because another writer keeps changing the object back, by kind",
            writer_conflicts.clone(),
        );
        registry.register(
            "backed_off_objects",
            "Objects whose repairs are backed off now, by kind",
            backed_off.clone(),
        );
        let uplink_rollbacks = Counter::default();
        let uplink_held = Gauge::default();
        registry.register(
            "uplink_rollbacks",
            "Uplink changes rolled back because their verification failed",
            uplink_rollbacks.clone(),
        );
        registry.register(
            "uplink_changes_held",
            "Uplink changes held after a rollback (until the policy changes or `virtwarden release`)",
            uplink_held.clone(),
        );
        let probe_seconds: ProbeHistograms = Family::new_with_constructor(probe_histogram);
        let probe_failures = Family::<ProbeFailureLabels, Counter>::default();
        let guest_health = Family::<HealthLabels, Gauge>::default();
        let guest_events = Family::<GuestEventLabels, Counter>::default();
        let address_conflict = Family::<DomainLabel, Gauge>::default();
        registry.register(
            "address_conflict",
            "1 while another MAC, the host or another domain claims the address the domain is probed at (probes are then no evidence)",
            address_conflict.clone(),
        );
        registry.register(
            "probe_duration_seconds",
            "Guest health probe duration, by probe kind",
            probe_seconds.clone(),
        );
        registry.register("probe_failures", "Failed guest health probes, by domain and reason", probe_failures.clone());
        registry.register(
            "guest_health",
            "1 for the guest's current health state (down|booting|healthy|unhealthy|boot-failed|suspended)",
            guest_health.clone(),
        );
        registry.register(
            "guest_events",
            "Guest faults and signs of life libvirt reported, by kind",
            guest_events.clone(),
        );
        let domain_stalled = Family::<DomainLabel, Gauge>::default();
        let stalled = Gauge::default();
        let paths_not_answering = Gauge::default();
        let memory_lost = Gauge::default();
        registry.register(
            "domain_stalled",
            "1 while a libvirt call about the domain does not return (status state `stalled`)",
            domain_stalled.clone(),
        );
        registry.register("stalled_domains", "Domains whose libvirt calls do not return", stalled.clone());
        registry.register(
            "required_paths_not_answering",
            "Required paths (startup.requires.paths) whose check does not return (storage hung)",
            paths_not_answering.clone(),
        );
        registry.register(
            "memory_lost",
            "1 while the durable memory is lost (down domains are left down until it is rebuilt or `virtwarden memory confirm`)",
            memory_lost.clone(),
        );
        let hung_threads = Family::<PoolLabel, Gauge>::default();
        registry.register(
            "hung_threads",
            "Threads whose blocking call hangs past its deadline, by pool (libvirt, status)",
            hung_threads.clone(),
        );
        Metrics {
            hung_threads,
            domain_stalled,
            stalled,
            paths_not_answering,
            memory_lost,
            registry,
            restarts,
            actions,
            drift,
            reconcile_seconds,
            event_lag_seconds,
            quarantined,
            domain_quarantined,
            connected,
            ready,
            waiting_starts,
            worker_panics,
            hooks_refused,
            writer_conflicts,
            backed_off,
            uplink_rollbacks,
            uplink_held,
            probe_seconds,
            probe_failures,
            guest_health,
            guest_events,
            address_conflict,
        }
    }
}

impl Metrics {
    pub fn action(&self, kind: &str, ok: bool) {
        self.actions
            .get_or_create(&ActionLabels {
                kind: kind.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }

    pub fn drift(&self, kind: &str) {
        self.drift.get_or_create(&DriftLabel { kind: kind.to_string() }).inc();
    }

    pub fn hook_refused(&self, reason: &'static str) {
        self.hooks_refused.get_or_create(&RefusalLabel { reason: reason.to_string() }).inc();
    }

    pub fn writer_conflict(&self, kind: &str) {
        self.writer_conflicts.get_or_create(&DriftLabel { kind: kind.to_string() }).inc();
    }

    /// How many objects of `kind` are backed off now.
    pub fn set_backed_off(&self, kind: &str, n: usize) {
        self.backed_off.get_or_create(&DriftLabel { kind: kind.to_string() }).set(n as i64);
    }

    /// One finished probe of `domain`; `probe` is `http`, `tcp` or `guest-agent-ping`.
    pub fn probe(&self, domain: &str, probe: &str, result: &crate::plan::health::ProbeResult) {
        self.probe_seconds
            .get_or_create(&ProbeKindLabel { probe: probe.to_string() })
            .observe(result.latency.as_secs_f64());
        if let Err(e) = &result.outcome {
            self.probe_failures
                .get_or_create(&ProbeFailureLabels { domain: domain.to_string(), reason: e.kind().to_string() })
                .inc();
        }
    }

    /// Set `domain`'s health state (one of [`HEALTH_STATES`]); the others go to 0.
    pub fn health_state(&self, domain: &str, state: &str) {
        for s in HEALTH_STATES {
            let v = i64::from(s == state);
            self.guest_health.get_or_create(&HealthLabels { domain: domain.to_string(), state: s.to_string() }).set(v);
        }
    }

    /// Whether `domain`'s probe address is in conflict now.
    pub fn set_address_conflict(&self, domain: &str, conflict: bool) {
        self.address_conflict.get_or_create(&DomainLabel { domain: domain.to_string() }).set(i64::from(conflict));
    }

    /// The domain is no longer probed (no `health`, or not managed): drop its series.
    pub fn forget_health(&self, domain: &str) {
        self.address_conflict.remove(&DomainLabel { domain: domain.to_string() });
        for s in HEALTH_STATES {
            self.guest_health.remove(&HealthLabels { domain: domain.to_string(), state: s.to_string() });
        }
    }

    pub fn guest_event(&self, domain: &str, kind: &str) {
        self.guest_events.get_or_create(&GuestEventLabels { domain: domain.to_string(), kind: kind.to_string() }).inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod health_tests {
    use std::time::Duration;

    use super::*;
    use crate::plan::health::{ProbeFailure, ProbeResult};

    #[test]
    fn probe_health_and_guest_event_metrics_are_exported() {
        let m = Metrics::default();
        let r = ProbeResult {
            target: "tcp 10.0.0.2:22".into(),
            address: None,
            latency: Duration::from_millis(3),
            outcome: Err(ProbeFailure::Refused),
        };
        m.probe("web1", "tcp", &r);
        m.health_state("web1", "booting");
        m.health_state("web1", "unhealthy");
        m.guest_event("web1", "watchdog");
        let text = m.encode();
        assert!(text.contains("virtwarden_probe_duration_seconds_count{probe=\"tcp\"} 1"), "{text}");
        assert!(text.contains("virtwarden_probe_failures_total{domain=\"web1\",reason=\"refused\"} 1"), "{text}");
        assert!(text.contains("virtwarden_guest_health{domain=\"web1\",state=\"unhealthy\"} 1"), "{text}");
        assert!(text.contains("virtwarden_guest_health{domain=\"web1\",state=\"booting\"} 0"), "{text}");
        assert!(text.contains("virtwarden_guest_events_total{domain=\"web1\",kind=\"watchdog\"} 1"), "{text}");
        m.forget_health("web1");
        assert!(!m.encode().contains("virtwarden_guest_health{"));
    }
}
