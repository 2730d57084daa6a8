//! The remembered values, as plain serializable data. Times are milliseconds since the Unix
//! epoch (the engine's clock), so they keep their meaning across restarts.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::observe::{DomainState, ObservedDomain, StateReason};

/// A point on the engine's clock: time since the Unix epoch, advancing monotonically while
/// the engine runs (see `engine::clock`), so remembered times keep their meaning across restarts.
pub type Tick = std::time::Duration;

/// Current format of the memory file.
pub const FORMAT: u32 = 1;

/// Everything remembered about the host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    pub format: u32,
    #[serde(default)]
    pub domains: BTreeMap<String, DomainMemory>,
    /// What the network flap detector keeps about links (owned by the network task).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub network: serde_json::Value,
    /// Uplink takeovers: in flight (checkpoints to restore first at start), committed, held
    /// (owned by `act::uplink`).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub uplinks: serde_json::Value,
    /// Set while this memory stands in for one that was lost (corrupt, unreadable, or missing
    /// although it existed), until it is rebuilt or an admin confirms (`virtwarden memory
    /// confirm`). Kept on disk, so a restart meanwhile does not forget the loss too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<MemoryLoss>,
}

/// What is known about a lost memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryLoss {
    /// What happened to it (the load problem).
    pub why: String,
    #[serde(with = "tick_ms")]
    pub at: Tick,
    /// Managed domains seen running since: what is remembered about them is current again.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub rebuilt: std::collections::BTreeSet<String>,
}

impl MemoryLoss {
    /// `memory.json is not valid (…) at 2026-…`.
    pub fn describe(&self) -> String {
        format!("{} (at {})", self.why, tick_text(self.at))
    }
}

impl Memory {
    pub fn empty() -> Self {
        Memory { format: FORMAT, ..Default::default() }
    }

    /// The remembered intent for `domain`, if any.
    pub fn intent(&self, domain: &str) -> Option<&Intent> {
        self.domains.get(domain).and_then(|d| d.intent.as_ref())
    }

    /// The loss, while nothing current is remembered about `domain` (not seen running since).
    pub fn lost_for(&self, domain: &str) -> Option<&MemoryLoss> {
        self.lost.as_ref().filter(|l| !l.rebuilt.contains(domain))
    }

    /// Whether [`forget_unmanaged`](Self::forget_unmanaged) would change anything.
    pub fn has_unmanaged_work(&self, managed: impl Fn(&str) -> bool, now: Tick, grace: std::time::Duration) -> bool {
        self.domains.iter().any(|(name, d)| match (managed(name), d.unmanaged_since) {
            (true, since) => since.is_some(),
            (false, None) => true,
            (false, Some(t)) => now.saturating_sub(t) >= grace,
        })
    }

    /// Entries of domains no policy names are dropped `grace` after they were first found
    /// unnamed, so a policy moved between files (or briefly invalid) keeps its history; a domain
    /// named again keeps its entry. Returns the names dropped.
    pub fn forget_unmanaged(
        &mut self,
        managed: impl Fn(&str) -> bool,
        now: Tick,
        grace: std::time::Duration,
    ) -> Vec<String> {
        let mut dropped = Vec::new();
        self.domains.retain(|name, d| {
            if managed(name) {
                d.unmanaged_since = None;
                return true;
            }
            let since = *d.unmanaged_since.get_or_insert(now);
            let keep = now.saturating_sub(since) < grace;
            if !keep {
                dropped.push(name.clone());
            }
            keep
        });
        dropped
    }
}

/// What is remembered about one domain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainMemory {
    #[serde(default)]
    pub restarts: TrackerState,
    /// The last intent observed, if it still holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,
    /// Backoffs of its boot order and autostart when another writer keeps changing them: the
    /// planner's flap detector (`plan::flap::FlapDetector`) as the worker last saved it. Kept as
    /// JSON so the memory sits below the planner (which reads the memory) without a cycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flap: Option<serde_json::Value>,
    /// The last health verdict not yet followed by a passing probe (`plan` notes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_health: Option<BadHealth>,
    /// Since when no policy names it; forgotten after a grace period (see
    /// [`Memory::forget_unmanaged`]).
    #[serde(default, with = "opt_tick_ms", skip_serializing_if = "Option::is_none")]
    pub unmanaged_since: Option<Tick>,
}

/// A guest judged unhealthy or not booted, as last known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BadHealth {
    /// The verdict: `boot failed: …`, `unhealthy (probe: …)`.
    pub verdict: String,
    #[serde(with = "tick_ms")]
    pub at: Tick,
}

impl BadHealth {
    /// `boot failed: … (judged 2026-11-23T12:00:00Z)`.
    pub fn describe(&self) -> String {
        format!("{} (judged {})", self.verdict, tick_text(self.at))
    }
}

/// Why a domain that is off is off, as last observed: what libvirt forgets when it restarts
/// (it then reports every inactive domain as `shut off (unknown)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Intent {
    /// A guest or an admin stopped it (`shut off (shutdown|destroyed|saved)`).
    StoppedOnPurpose {
        reason: StateReason,
        #[serde(with = "tick_ms")]
        at: Tick,
    },
    /// virtwarden stopped it because its policy said `state: stopped`.
    StoppedByPolicy {
        #[serde(with = "tick_ms")]
        at: Tick,
    },
    /// It was migrated to another host; the persistent definition stayed behind.
    MigratedAway {
        #[serde(with = "tick_ms")]
        at: Tick,
    },
}

impl Intent {
    pub fn describe(&self) -> String {
        match self {
            Intent::StoppedOnPurpose { reason, at } => {
                format!("stopped on purpose ({reason}) at {}", tick_text(*at))
            }
            Intent::StoppedByPolicy { at } => format!("stopped by its policy at {}", tick_text(*at)),
            Intent::MigratedAway { at } => format!("migrated away at {}", tick_text(*at)),
        }
    }
}

/// The intent to remember after observing `observed` (`None`: the domain is not defined), given
/// what was remembered before. libvirt's reason is authoritative when it says something;
/// `shut off (unknown)` (libvirt forgot, e.g. after restarting) keeps what was remembered.
pub fn intent_after(current: Option<&Intent>, observed: Option<&ObservedDomain>, now: Tick) -> Option<Intent> {
    let Some(obs) = observed else {
        return current.cloned();
    };
    if obs.state != DomainState::ShutOff {
        // Running, paused, …: whoever stopped it before has started it again.
        return if obs.state.is_active() { None } else { current.cloned() };
    }
    match obs.reason {
        StateReason::Migrated => match current {
            Some(i @ Intent::MigratedAway { .. }) => Some(i.clone()),
            _ => Some(Intent::MigratedAway { at: now }),
        },
        r if r.is_deliberate_stop() => match current {
            // virtwarden's own stop for `state: stopped` shows up as shutdown/destroyed.
            Some(i @ Intent::StoppedByPolicy { .. }) => Some(i.clone()),
            Some(i @ Intent::StoppedOnPurpose { reason, .. }) if *reason == r => Some(i.clone()),
            _ => Some(Intent::StoppedOnPurpose { reason: r, at: now }),
        },
        StateReason::Unknown | StateReason::FromSnapshot => current.cloned(),
        // A crash: nobody meant it.
        _ => None,
    }
}

/// A quarantine: no more automatic restarts until it is released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quarantine {
    pub reason: String,
    #[serde(with = "tick_ms")]
    pub since: Tick,
}

/// The crash-loop bookkeeping of one domain (the state of the planner's `RestartTracker`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackerState {
    /// When restarts were issued, pruned to the backoff window.
    #[serde(default, with = "ticks_ms")]
    pub restarts: VecDeque<Tick>,
    #[serde(default, with = "opt_tick_ms", skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<Tick>,
    /// Failures in the current streak (0 for the first failure after a healthy run).
    #[serde(default)]
    pub consecutive: u32,
    /// Set while the domain is down and not yet recovered.
    #[serde(default, with = "opt_tick_ms", skip_serializing_if = "Option::is_none")]
    pub down_since: Option<Tick>,
    #[serde(default, with = "opt_tick_ms", skip_serializing_if = "Option::is_none")]
    pub next_allowed: Option<Tick>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    /// Restarts issued since this memory was created.
    #[serde(default)]
    pub total_restarts: u32,
}

impl TrackerState {
    /// Lift the quarantine (`virtwarden release`): the streak and the window start afresh, the
    /// lifetime count stays. The lifted quarantine, if there was one.
    pub fn release(&mut self) -> Option<Quarantine> {
        let q = self.quarantine.take()?;
        self.restarts.clear();
        self.consecutive = 0;
        self.down_since = None;
        self.next_allowed = None;
        Some(q)
    }
}

/// An epoch tick as RFC 3339 text, for messages.
pub fn tick_text(t: Tick) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{}ms", t.as_millis()))
}

fn to_ms(t: &Tick) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
}

mod tick_ms {
    use super::Tick;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Tick, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(super::to_ms(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Tick, D::Error> {
        Ok(Tick::from_millis(u64::deserialize(d)?))
    }
}

mod opt_tick_ms {
    use super::Tick;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<Tick>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&super::to_ms(t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Tick>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Tick::from_millis))
    }
}

mod ticks_ms {
    use std::collections::VecDeque;

    use super::Tick;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &VecDeque<Tick>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(t.iter().map(super::to_ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<Tick>, D::Error> {
        Ok(Vec::<u64>::deserialize(d)?.into_iter().map(Tick::from_millis).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(state: DomainState, reason: StateReason) -> ObservedDomain {
        ObservedDomain {
            name: "web1".into(),
            uuid: String::new(),
            state,
            reason,
            persistent: true,
            autostart: false,
            boot: Default::default(),
            interfaces: vec![],
            disks: vec![],
            id: None,
        }
    }

    #[test]
    fn intent_follows_what_libvirt_says_and_survives_it_forgetting() {
        let t = Tick::from_secs(10);
        let off = |r| seen(DomainState::ShutOff, r);
        let admin = intent_after(None, Some(&off(StateReason::Destroyed)), t);
        assert_eq!(admin, Some(Intent::StoppedOnPurpose { reason: StateReason::Destroyed, at: t }));
        // libvirtd restarted: `shut off (unknown)` keeps the remembered stop, with its time.
        let later = Tick::from_secs(99);
        assert_eq!(intent_after(admin.as_ref(), Some(&off(StateReason::Unknown)), later), admin);
        // Someone started it: the stop no longer holds.
        assert_eq!(intent_after(admin.as_ref(), Some(&seen(DomainState::Running, StateReason::Booted)), later), None);
        // A crash is not an intent.
        assert_eq!(intent_after(admin.as_ref(), Some(&off(StateReason::Crashed)), later), None);
        assert_eq!(intent_after(None, Some(&off(StateReason::Migrated)), t), Some(Intent::MigratedAway { at: t }));
        let ours = Intent::StoppedByPolicy { at: t };
        assert_eq!(intent_after(Some(&ours), Some(&off(StateReason::Shutdown)), later), Some(ours.clone()));
        assert_eq!(intent_after(Some(&ours), None, later), Some(ours), "undefined: nothing new is known");
    }

    #[test]
    fn entries_of_unmanaged_domains_are_dropped_after_the_grace_period_only() {
        let hour = std::time::Duration::from_secs(3600);
        let mut m = Memory::empty();
        for name in ["kept", "moved", "gone"] {
            m.domains.insert(name.into(), DomainMemory::default());
        }
        let t0 = Tick::from_secs(1_700_000_000);
        let managed_at_first = |n: &str| n == "kept";
        assert!(m.has_unmanaged_work(managed_at_first, t0, hour));
        assert!(m.forget_unmanaged(managed_at_first, t0, hour).is_empty(), "nothing dropped at once");
        assert!(!m.has_unmanaged_work(managed_at_first, t0 + hour / 2, hour));
        // "moved" is named again (its policy moved to another file): it keeps its history.
        let managed_later = |n: &str| n == "kept" || n == "moved";
        assert!(m.forget_unmanaged(managed_later, t0 + hour / 2, hour).is_empty());
        assert_eq!(m.domains["moved"].unmanaged_since, None);
        assert_eq!(m.forget_unmanaged(managed_later, t0 + hour, hour), ["gone"]);
        assert_eq!(m.domains.keys().collect::<Vec<_>>(), ["kept", "moved"]);
        assert!(!m.has_unmanaged_work(managed_later, t0 + hour * 5, hour));
    }

    #[test]
    fn round_trips_through_json() {
        let mut m = Memory::empty();
        m.domains.insert(
            "web1".into(),
            DomainMemory {
                restarts: TrackerState {
                    restarts: [Tick::from_millis(1_700_000_000_000)].into(),
                    last_restart: Some(Tick::from_millis(1_700_000_000_000)),
                    consecutive: 2,
                    down_since: None,
                    next_allowed: Some(Tick::from_millis(1_700_000_004_000)),
                    quarantine: Some(Quarantine { reason: "4 restarts within 1h".into(), since: Tick::from_secs(5) }),
                    total_restarts: 7,
                },
                bad_health: Some(BadHealth {
                    verdict: "unhealthy (probe: tcp 10.0.0.2:22: refused)".into(),
                    at: Tick::from_secs(9),
                }),
                intent: Some(Intent::StoppedOnPurpose {
                    reason: StateReason::Destroyed,
                    at: Tick::from_millis(1_700_000_000_500),
                }),
                flap: None,
                unmanaged_since: Some(Tick::from_secs(11)),
            },
        );
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"kind\":\"stopped-on-purpose\",\"reason\":\"destroyed\""), "{text}");
        let back: Memory = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
    }
}
