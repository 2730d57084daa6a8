//! Flapping: an object that another writer keeps changing back (a network manager resetting STP,
//! a script rewriting a boot order). Only a real fight counts: the first repair towards a desired
//! value (the object's creation, a first install, a policy edit or reload that changed the value)
//! is virtwarden's own doing and never counts; each further repair towards the same value is a
//! revert by someone else. After `threshold` reverts of one object within `window`, further
//! repairs of it wait, `initial_delay` doubling up to `max_delay`, and it is reported as "another
//! writer keeps changing X" until it has stayed put for `quiet`. Pure: time is passed in (the
//! engine's clock, time since the Unix epoch), and the state serializes — times as Unix
//! milliseconds — so a backoff still running outlives a restart (see [`FlapDetector::resume`]).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use serde::{Deserialize, Serialize};

use super::restart::Tick;

/// When an object counts as flapping and how long its repairs wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapSettings {
    /// Reverts of one object within `window` after which further repairs wait.
    pub threshold: u32,
    pub window: Duration,
    /// The first wait; each further repair while backing off doubles it, up to `max_delay`.
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// An object not found changed for this long is forgotten (and no longer reported).
    pub quiet: Duration,
}

impl Default for FlapSettings {
    /// 5 reverts within 60 s; then 10 s doubling to 5 min; forgotten after 10 min without change.
    fn default() -> Self {
        FlapSettings {
            threshold: 5,
            window: Duration::from_secs(60),
            initial_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(300),
            quiet: Duration::from_secs(600),
        }
    }
}

impl FlapSettings {
    /// Never back off (benchmarks that repair the same object in a loop).
    pub fn off() -> Self {
        FlapSettings { threshold: u32::MAX, ..Default::default() }
    }
}

/// What kind of object is fought over; the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlapKind {
    /// A bridge's existence or up state.
    Bridge,
    Stp,
    Port,
    Tap,
    Forwarding,
    BootOrder,
    Autostart,
}

impl FlapKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FlapKind::Bridge => "bridge",
            FlapKind::Stp => "stp",
            FlapKind::Port => "port",
            FlapKind::Tap => "tap",
            FlapKind::Forwarding => "forwarding",
            FlapKind::BootOrder => "boot-order",
            FlapKind::Autostart => "autostart",
        }
    }
}

/// One object: a kind and a name (bridge, port, tap, `ipv4`/`ipv6`, domain).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FlapKey {
    pub kind: FlapKind,
    pub object: String,
}

impl FlapKey {
    pub fn new(kind: FlapKind, object: &str) -> Self {
        FlapKey { kind, object: object.to_string() }
    }
}

impl fmt::Display for FlapKey {
    /// In the user's words: `bridge br0 stp`, `port eth1`, `domain web1 boot order`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.object;
        match self.kind {
            FlapKind::Bridge => write!(f, "bridge {o}"),
            FlapKind::Stp => write!(f, "bridge {o} stp"),
            FlapKind::Port => write!(f, "port {o}"),
            FlapKind::Tap => write!(f, "tap {o}"),
            FlapKind::Forwarding => write!(f, "forwarding {o}"),
            FlapKind::BootOrder => write!(f, "domain {o} boot order"),
            FlapKind::Autostart => write!(f, "domain {o} autostart"),
        }
    }
}

/// May a drifted object be repaired now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Repair,
    /// Backing off: not before `until`.
    Wait {
        until: Tick,
    },
}

/// `t` as an RFC 3339 time in whole seconds, for status lines.
pub fn tick_text(t: Tick) -> String {
    DateTime::from_timestamp_millis(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{}s after the epoch", t.as_secs()))
}

/// What is remembered about one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlapRecord {
    pub key: FlapKey,
    /// The desired value the repairs were towards (the repair action, as text); a repair towards
    /// another value starts the record afresh.
    #[serde(default)]
    wanted: String,
    /// Reverts (repairs after the first towards `wanted`) within the window, oldest first.
    #[serde(with = "ms_list")]
    repairs: Vec<Tick>,
    /// When the object was last found changed.
    #[serde(with = "ms")]
    last_drift: Tick,
    /// While backing off: the current delay and when the next repair may go.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_ms")]
    delay: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_ms")]
    next_repair: Option<Tick>,
    /// Repairs that started or extended a backoff: each one a change another writer made again.
    pub conflicts: u32,
}

impl FlapRecord {
    /// Backing off this object.
    pub fn is_flapping(&self) -> bool {
        self.delay.is_some()
    }

    pub fn next_repair(&self) -> Option<Tick> {
        self.next_repair
    }

    /// For status at `now`: `another writer keeps changing bridge br0 stp; backing off 20s, next
    /// repair at 2025-01-01T00:00:20Z` — never a time already past (then: repaired at once if
    /// changed again within the quiet period, with a longer wait after).
    pub fn line(&self, now: Tick) -> String {
        let mut line = format!("another writer keeps changing {}", self.key);
        match (self.delay, self.next_repair) {
            (Some(delay), Some(at)) if at > now => {
                line.push_str(&format!("; backing off {}s, next repair at {}", delay.as_secs(), tick_text(at)))
            }
            (Some(delay), _) => line.push_str(&format!("; last backoff {}s, watching", delay.as_secs())),
            _ => {}
        }
        line
    }
}

/// Flap detector state for any number of objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlapDetector {
    #[serde(default)]
    records: Vec<FlapRecord>,
    #[serde(skip)]
    settings: Option<FlapSettings>,
}

/// Time from `then` to `now`; zero when the clock went backwards.
fn since(then: Tick, now: Tick) -> Duration {
    now.saturating_sub(then)
}

impl FlapDetector {
    pub fn new(settings: FlapSettings) -> Self {
        FlapDetector { records: Vec::new(), settings: Some(settings) }
    }

    /// Use `settings` from now on (e.g. after loading persisted state).
    /// Nothing is being watched or backed off.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn set_settings(&mut self, settings: FlapSettings) {
        self.settings = Some(settings);
    }

    pub fn settings(&self) -> FlapSettings {
        self.settings.unwrap_or_default()
    }

    fn record(&mut self, key: &FlapKey, now: Tick) -> &mut FlapRecord {
        let i = match self.records.iter().position(|r| &r.key == key) {
            Some(i) => i,
            None => {
                self.records.push(FlapRecord {
                    key: key.clone(),
                    wanted: String::new(),
                    repairs: Vec::new(),
                    last_drift: now,
                    delay: None,
                    next_repair: None,
                    conflicts: 0,
                });
                self.records.len() - 1
            }
        };
        &mut self.records[i]
    }

    /// `key` was found changed at `now`, to be repaired towards `wanted`: may it be repaired now?
    /// A new desired value (a policy edit) is applied at once, whatever the backoff of the old.
    pub fn drifted(&mut self, key: &FlapKey, wanted: &str, now: Tick) -> Verdict {
        let max = self.settings().max_delay;
        let r = self.record(key, now);
        r.last_drift = now;
        if r.wanted != wanted {
            return Verdict::Repair;
        }
        match r.next_repair {
            // A wall clock set back must not stretch the wait beyond the longest delay.
            Some(at) if at > now + max => {
                r.next_repair = Some(now + max);
                Verdict::Wait { until: now + max }
            }
            Some(at) if at > now => Verdict::Wait { until: at },
            _ => Verdict::Repair,
        }
    }

    /// `key` was repaired towards `wanted` at `now`. True when this repair starts or extends a
    /// backoff: the object was reverted `threshold` times within the window, so another writer
    /// is at it. The first repair towards a value (creation, first install, a changed policy)
    /// is no revert: it starts the record afresh.
    pub fn repaired(&mut self, key: &FlapKey, wanted: &str, now: Tick) -> bool {
        let s = self.settings();
        let r = self.record(key, now);
        if r.wanted != wanted {
            r.wanted = wanted.to_string();
            r.repairs.clear();
            r.delay = None;
            r.next_repair = None;
            return false;
        }
        r.repairs.retain(|t| since(*t, now) < s.window);
        r.repairs.push(now);
        if r.delay.is_none() && (r.repairs.len() as u64) < u64::from(s.threshold) {
            return false;
        }
        let delay = match r.delay {
            None => s.initial_delay,
            Some(d) => (d * 2).min(s.max_delay),
        };
        r.delay = Some(delay);
        r.next_repair = Some(now + delay);
        r.conflicts += 1;
        true
    }

    /// After a restart of virtwarden (a reboot included): keep only backoffs still running at
    /// `now`; counts and finished backoffs are forgotten, so a fight is judged afresh.
    pub fn resume(&mut self, now: Tick) {
        self.records.retain(|r| r.delay.is_some() && r.next_repair.is_some_and(|at| at > now));
    }

    /// Forget objects that stayed put for the quiet period; returns those that were flapping.
    pub fn settle(&mut self, now: Tick) -> Vec<FlapKey> {
        let quiet = self.settings().quiet;
        let mut calmed = Vec::new();
        self.records.retain(|r| {
            let keep = since(r.last_drift, now) < quiet || r.next_repair.is_some_and(|at| at > now);
            if !keep && r.is_flapping() {
                calmed.push(r.key.clone());
            }
            keep
        });
        calmed
    }

    /// When `key`'s next repair may go, if it is waiting at `now` (does not count as drift).
    pub fn wait_until(&self, key: &FlapKey, now: Tick) -> Option<Tick> {
        self.records.iter().find(|r| &r.key == key).and_then(|r| r.next_repair).filter(|at| *at > now)
    }

    /// Objects being backed off, in key order.
    pub fn flapping(&self) -> Vec<&FlapRecord> {
        let mut v: Vec<&FlapRecord> = self.records.iter().filter(|r| r.is_flapping()).collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// The earliest time a held repair may go.
    pub fn next_wakeup(&self, now: Tick) -> Option<Tick> {
        self.records.iter().filter_map(|r| r.next_repair).filter(|at| *at > now).min()
    }
}

/// Times as Unix milliseconds, like the rest of the durable memory.
mod ms {
    use super::Duration;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod opt_ms {
    use super::Duration;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

mod ms_list {
    use super::Duration;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let ms: Vec<u64> = v.iter().map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)).collect();
        ms.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Ok(Vec::<u64>::deserialize(d)?.into_iter().map(Duration::from_millis).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Tick {
        Tick::from_secs((1_700_000_000 + secs) as u64)
    }

    fn stp() -> FlapKey {
        FlapKey::new(FlapKind::Stp, "br0")
    }

    /// Drift found and repaired towards `on` at `secs`; returns whether the repair was allowed.
    fn fight(d: &mut FlapDetector, secs: i64) -> Verdict {
        fight_for(d, "on", secs)
    }

    fn fight_for(d: &mut FlapDetector, wanted: &str, secs: i64) -> Verdict {
        let v = d.drifted(&stp(), wanted, t(secs));
        if v == Verdict::Repair {
            d.repaired(&stp(), wanted, t(secs));
        }
        v
    }

    /// The first repair (not counted) and five reverts, at 0..=5 s: backing off from 5 s.
    fn five_reverts(d: &mut FlapDetector) {
        for s in 0..=5 {
            assert_eq!(fight(d, s), Verdict::Repair, "repair at {s}s is immediate");
        }
    }

    #[test]
    fn five_reverts_within_the_window_start_a_doubling_backoff_up_to_the_cap() {
        let mut d = FlapDetector::new(FlapSettings::default());
        five_reverts(&mut d);
        // The fifth revert within 60 s started the backoff: 10 s from it.
        assert_eq!(fight(&mut d, 6), Verdict::Wait { until: t(15) });
        assert_eq!(fight(&mut d, 14), Verdict::Wait { until: t(15) });
        assert_eq!(fight(&mut d, 15), Verdict::Repair);
        // Changed back again: 20 s, 40 s, 80 s, 160 s, then capped at 300 s.
        let mut at = 15;
        for delay in [20, 40, 80, 160, 300, 300] {
            assert_eq!(fight(&mut d, at + 1), Verdict::Wait { until: t(at + delay) });
            at += delay;
            assert_eq!(fight(&mut d, at), Verdict::Repair);
        }
        let f = d.flapping();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].conflicts, 8);
        assert!(
            f[0].line(t(at))
                .starts_with("another writer keeps changing bridge br0 stp; backing off 300s, next repair at"),
            "{}",
            f[0].line(t(at))
        );
    }

    #[test]
    fn repairs_spread_beyond_the_window_never_back_off() {
        let mut d = FlapDetector::new(FlapSettings::default());
        for s in (0..20).map(|i| i * 31) {
            assert_eq!(fight(&mut d, s), Verdict::Repair);
        }
        assert!(d.flapping().is_empty());
    }

    #[test]
    fn an_object_that_stays_put_for_the_quiet_period_is_forgotten() {
        let mut d = FlapDetector::new(FlapSettings::default());
        five_reverts(&mut d);
        assert_eq!(d.flapping().len(), 1);
        assert_eq!(d.next_wakeup(t(7)), Some(t(15)));
        // Still reported while the wait runs and shortly after, never with a past time.
        assert!(
            d.flapping()[0].line(t(7)).ends_with("next repair at 2023-11-14T22:13:35Z"),
            "{}",
            d.flapping()[0].line(t(7))
        );
        assert!(d.settle(t(300)).is_empty());
        assert_eq!(d.flapping().len(), 1);
        let later = d.flapping()[0].line(t(300));
        assert_eq!(later, "another writer keeps changing bridge br0 stp; last backoff 10s, watching");
        // 10 minutes after it was last found changed: forgotten, and repairs are immediate again.
        assert_eq!(d.settle(t(606)), vec![stp()]);
        assert!(d.flapping().is_empty());
        assert_eq!(fight(&mut d, 607), Verdict::Repair);
    }

    #[test]
    fn creation_first_installs_and_policy_edits_are_no_reverts() {
        let mut d = FlapDetector::new(FlapSettings::default());
        // Three repairs in a minute, the creation among them (issue 18): no fight.
        for s in 0..3 {
            assert_eq!(fight(&mut d, s), Verdict::Repair);
        }
        assert!(d.flapping().is_empty());
        // A policy edited back and forth: every repair is towards a new value, none counts.
        let mut d = FlapDetector::new(FlapSettings::default());
        for s in 0..20 {
            let wanted = if s % 2 == 0 { "on" } else { "off" };
            assert_eq!(fight_for(&mut d, wanted, s), Verdict::Repair);
        }
        assert!(d.flapping().is_empty());
        // While backing off, a new desired value goes at once and starts afresh.
        let mut d = FlapDetector::new(FlapSettings::default());
        five_reverts(&mut d);
        assert_eq!(fight(&mut d, 6), Verdict::Wait { until: t(15) });
        assert_eq!(fight_for(&mut d, "off", 7), Verdict::Repair);
        assert!(d.flapping().is_empty());
        assert_eq!(fight_for(&mut d, "off", 8), Verdict::Repair);
    }

    #[test]
    fn only_a_running_backoff_outlives_a_restart() {
        let mut d = FlapDetector::new(FlapSettings::default());
        five_reverts(&mut d);
        let port = FlapKey::new(FlapKind::Port, "eth1");
        d.drifted(&port, "br0", t(5));
        d.repaired(&port, "br0", t(5));
        let mut early = d.clone();
        early.resume(t(10));
        assert_eq!(early.flapping().len(), 1, "still backing off at 10 s");
        assert!(early.records.iter().all(|r| r.key == stp()), "counts are not carried: {early:?}");
        d.resume(t(16));
        assert!(d.is_empty(), "the backoff ended at 15 s: nothing carried");
    }

    #[test]
    fn objects_are_independent() {
        let mut d = FlapDetector::new(FlapSettings::default());
        five_reverts(&mut d);
        let port = FlapKey::new(FlapKind::Port, "eth1");
        assert_eq!(d.drifted(&port, "br0", t(6)), Verdict::Repair);
        assert!(!d.repaired(&port, "br0", t(6)));
    }

    #[test]
    fn a_clock_set_back_does_not_stretch_the_wait() {
        let mut d = FlapDetector::new(FlapSettings::default());
        five_reverts(&mut d);
        // The wall clock jumps back an hour.
        assert_eq!(d.drifted(&stp(), "on", t(-3600)), Verdict::Wait { until: t(-3600 + 300) });
    }

    #[test]
    fn state_round_trips_through_json_and_keys_read_like_the_users_words() {
        let mut d = FlapDetector::new(FlapSettings::default());
        five_reverts(&mut d);
        let text = serde_json::to_string(&d).unwrap();
        let mut back: FlapDetector = serde_json::from_str(&text).unwrap();
        back.set_settings(FlapSettings::default());
        assert_eq!(back, d);
        assert_eq!(fight(&mut back, 6), Verdict::Wait { until: t(15) });
        let words: Vec<String> = [
            FlapKey::new(FlapKind::Port, "eth1"),
            FlapKey::new(FlapKind::Forwarding, "ipv4"),
            FlapKey::new(FlapKind::BootOrder, "web1"),
            FlapKey::new(FlapKind::Autostart, "web1"),
        ]
        .iter()
        .map(|k| k.to_string())
        .collect();
        assert_eq!(words, ["port eth1", "forwarding ipv4", "domain web1 boot order", "domain web1 autostart"]);
    }

    #[test]
    fn off_never_backs_off() {
        let mut d = FlapDetector::new(FlapSettings::off());
        for s in 0..100 {
            assert_eq!(fight(&mut d, s), Verdict::Repair);
        }
    }
}
