//! A worker's repairs of drift that another writer may keep undoing (boot order, autostart):
//! a repair that keeps being undone is backed off (doubling) and reported instead of fought
//! over; the backoff is kept in the durable memory and counted in the backed-off gauge.

use tokio::time::Instant;

use super::super::metrics::DriftLabel;
use super::Worker;
use crate::observe::ObservedDomain;
use crate::plan::flap::{tick_text, FlapKey, FlapKind, Verdict};
use crate::plan::{Action, ActionKind};

impl Worker {
    /// Correct configuration or state drift, unless another writer keeps undoing this
    /// correction: then it waits (doubling) and is reported instead of fought over. Returns when
    /// a held correction may go.
    pub(super) async fn correct(&mut self, action: Action, observed: Option<&ObservedDomain>) -> Option<Instant> {
        let key = match action.kind {
            ActionKind::SetBootOrder { .. } => Some(FlapKey::new(FlapKind::BootOrder, self.name())),
            ActionKind::SetAutostart { .. } => Some(FlapKey::new(FlapKind::Autostart, self.name())),
            _ => None,
        };
        let Some(key) = key else {
            self.run_action(action, observed).await;
            return None;
        };
        let wanted = format!("{:?}", action.kind);
        if let Verdict::Wait { until } = self.flap.drifted(&key, &wanted, self.shared.tick()) {
            let note =
                format!("another writer keeps changing {key}: {} held until {}", action.kind.verb(), tick_text(until));
            self.shared.update_domain(self.name(), |s| s.notes.push(note));
            self.remember_flaps();
            return Some(self.shared.instant_at(until));
        }
        if self.run_action(action, observed).await && self.flap.repaired(&key, &wanted, self.shared.tick()) {
            tracing::warn!(domain = %self.name(), object = %key, "another writer keeps changing it; backing off");
            self.shared.metrics.writer_conflicts.get_or_create(&DriftLabel { kind: key.kind.as_str().into() }).inc();
        }
        self.remember_flaps();
        None
    }

    /// Forget objects that stayed put; keep status, the gauge and the memory in step. Returns
    /// when a backoff ends, so status is rewritten then (it never shows a past "next repair").
    pub(super) fn settle_flaps(&mut self) -> Option<Instant> {
        let now = self.shared.tick();
        let calmed = self.flap.settle(now);
        for key in &calmed {
            tracing::info!(domain = %self.name(), object = %key, "no longer changed by another writer");
        }
        self.remember_flaps();
        self.flap.next_wakeup(now).map(|t| self.shared.instant_at(t))
    }

    fn remember_flaps(&mut self) {
        let now = self.shared.tick();
        let lines: Vec<String> = self.flap.flapping().iter().map(|r| r.line(now)).collect();
        let kinds: Vec<FlapKind> = self.flap.flapping().iter().map(|r| r.key.kind).collect();
        self.count_flapping(&kinds);
        let flap = (!self.flap.is_empty()).then(|| self.flap.clone());
        let saved = serde_json::to_value(&flap).ok();
        if saved != self.flap_saved {
            let name = self.name().to_string();
            let value = saved.clone().filter(|v| !v.is_null());
            self.shared.memory.update(|m| m.domains.entry(name).or_default().flap = value);
            self.flap_saved = saved;
        }
        self.shared.update_domain(self.name(), |s| s.flapping = lines);
    }

    /// Move this worker's share of the backed-off gauge to `kinds`.
    pub(super) fn count_flapping(&mut self, kinds: &[FlapKind]) {
        for k in self.counted.iter().filter(|k| !kinds.contains(k)) {
            self.shared.metrics.backed_off.get_or_create(&DriftLabel { kind: k.as_str().into() }).dec();
        }
        for k in kinds.iter().filter(|k| !self.counted.contains(k)) {
            self.shared.metrics.backed_off.get_or_create(&DriftLabel { kind: k.as_str().into() }).inc();
        }
        self.counted = kinds.to_vec();
    }
}
