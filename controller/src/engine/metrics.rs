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
    pub worker_panics: Counter,
    pub hooks_refused: Family<RefusalLabel, Counter>,
    /// Repairs that started or extended a backoff because another writer keeps changing an
    /// object back, by kind (`stp`, `port`, `tap`, `forwarding`, `bridge`, `boot-order`, …).
    pub writer_conflicts: Family<DriftLabel, Counter>,
    /// Objects whose repairs are backed off now, by kind.
    pub backed_off: Family<DriftLabel, Gauge>,
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
        Metrics {
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
            worker_panics,
            hooks_refused,
            writer_conflicts,
            backed_off,
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

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
