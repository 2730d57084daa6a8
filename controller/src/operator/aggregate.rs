//! A policy's aggregated status (nodes per condition), computed from the enactments every node
//! already watches, and whose turn it is to write it. One node's change then costs its own
//! enactment write plus at most one aggregate write, however many nodes the policy selects:
//! the first node by name writes; the others step in, one after another, only when a wrong
//! aggregate stays (that node is gone), so no node lists enactments and nodes never race.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use virtwarden_crd::{condition, HostPolicyEnactment, HostPolicyEnactmentStatus, HostPolicyStatus};

use super::enactment::{cond, keep_transition_times};

/// How long the node of rank `r` (0 = first by name) lets a wrong aggregate stand before it
/// writes it itself: `r × REPAIR_TURN`.
pub const REPAIR_TURN: Duration = Duration::from_secs(10);

/// Whether `e` is an enactment of this incarnation of the policy (a policy deleted and created
/// again under the same name has a new uid; the old enactments are being garbage-collected).
pub fn belongs_to(e: &HostPolicyEnactment, policy: &str, uid: &str) -> bool {
    e.spec.policy == policy && e.metadata.owner_references.iter().flatten().any(|o| o.uid == uid)
}

/// The policy's enactments as (node, status): the watched ones, with this node's own replaced by
/// what it last wrote, if known (the watch may not have delivered it yet). Sorted by node name.
pub fn members<'a>(
    enactments: &'a [Arc<HostPolicyEnactment>],
    policy: &str,
    uid: &str,
    me: &'a str,
    mine: Option<&'a HostPolicyEnactmentStatus>,
) -> Vec<(&'a str, Option<&'a HostPolicyEnactmentStatus>)> {
    let mut out: Vec<(&str, Option<&HostPolicyEnactmentStatus>)> = enactments
        .iter()
        .filter(|e| belongs_to(e, policy, uid) && (mine.is_none() || e.spec.node != me))
        .map(|e| (e.spec.node.as_str(), e.status.as_ref()))
        .collect();
    if let Some(m) = mine {
        out.push((me, Some(m)));
    }
    out.sort_by(|a, b| a.0.cmp(b.0));
    out
}

fn is_true(s: Option<&HostPolicyEnactmentStatus>, type_: &str) -> bool {
    s.is_some_and(|s| s.conditions.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// Where one node stands with a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Enforcing,
    /// On an older generation, or its heartbeat expired.
    Lagging,
    /// Alive, current, and Degraded.
    Failing,
}

/// A node whose heartbeat expired lags whatever its (stale) enactment says; one that has not
/// observed `generation` yet lags too; then Degraded is failing; the rest enforce.
pub fn standing(generation: Option<i64>, status: Option<&HostPolicyEnactmentStatus>, alive: bool) -> Standing {
    let current = status.is_some_and(|s| s.observed_generation >= generation);
    if !alive || !current {
        Standing::Lagging
    } else if is_true(status, condition::DEGRADED) {
        Standing::Failing
    } else {
        Standing::Enforcing
    }
}

/// Count nodes per condition and per standing (`alive` tells whose heartbeat is fresh);
/// conditions summarise them, keeping the transition times of `previous` where a condition's
/// status did not change.
pub fn aggregate(
    generation: Option<i64>,
    members: &[(&str, Option<&HostPolicyEnactmentStatus>)],
    alive: &dyn Fn(&str) -> bool,
    previous: Option<&HostPolicyStatus>,
    now: &Time,
) -> HostPolicyStatus {
    let count = |t: &str| members.iter().filter(|(_, s)| is_true(*s, t)).count() as u32;
    let standings: Vec<Standing> = members.iter().map(|(n, s)| standing(generation, *s, alive(n))).collect();
    let of = |x: Standing| standings.iter().filter(|s| **s == x).count() as u32;
    let (matched, available, progressing, degraded) =
        (members.len() as u32, count(condition::AVAILABLE), count(condition::PROGRESSING), count(condition::DEGRADED));
    let cond = |type_: &str, status: bool, reason: &str, message: String| {
        cond(type_, status, reason, message, generation, now)
    };
    let mut conditions = vec![
        cond(
            condition::AVAILABLE,
            matched > 0 && available == matched,
            if matched == 0 {
                "NoNodes"
            } else if available == matched {
                "AllNodesAvailable"
            } else {
                "NodesNotAvailable"
            },
            format!("{available} of {matched} nodes available"),
        ),
        cond(
            condition::PROGRESSING,
            progressing > 0,
            if progressing > 0 { "NodesRemediating" } else { "NothingInProgress" },
            format!("{progressing} of {matched} nodes remediating"),
        ),
        cond(
            condition::DEGRADED,
            degraded > 0,
            if degraded > 0 { "NodesDegraded" } else { "NoNodeDegraded" },
            format!("{degraded} of {matched} nodes degraded"),
        ),
    ];
    if let Some(p) = previous {
        keep_transition_times(&mut conditions, &p.conditions);
    }
    HostPolicyStatus {
        observed_generation: generation,
        matched_nodes: matched,
        available_nodes: available,
        progressing_nodes: progressing,
        degraded_nodes: degraded,
        enforcing_nodes: of(Standing::Enforcing),
        lagging_nodes: of(Standing::Lagging),
        failing_nodes: of(Standing::Failing),
        conditions,
    }
}

/// Whether two aggregates say the same, transition times aside (a condition that changes gets
/// the time of the round that computed it).
pub fn same_counts(a: &HostPolicyStatus, b: &HostPolicyStatus) -> bool {
    let strip = |s: &HostPolicyStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

/// This node's place among the policy's nodes (0 = the writer); after all of them if it has no
/// enactment yet.
pub fn rank(members: &[(&str, Option<&HostPolicyEnactmentStatus>)], me: &str) -> usize {
    members.iter().position(|(n, _)| *n == me).unwrap_or(members.len())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference};
    use virtwarden_crd::HostPolicyEnactmentSpec;

    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn status(true_type: &str) -> HostPolicyEnactmentStatus {
        HostPolicyEnactmentStatus {
            conditions: vec![Condition {
                type_: true_type.into(),
                status: "True".into(),
                reason: "X".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: t(0),
            }],
            ..Default::default()
        }
    }

    fn enactment(policy: &str, uid: &str, node: &str, s: HostPolicyEnactmentStatus) -> Arc<HostPolicyEnactment> {
        let mut e = HostPolicyEnactment::new(
            &format!("{policy}.{node}"),
            HostPolicyEnactmentSpec { policy: policy.into(), node: node.into() },
        );
        e.metadata.owner_references = Some(vec![OwnerReference { uid: uid.into(), ..Default::default() }]);
        e.status = Some(s);
        Arc::new(e)
    }

    #[test]
    fn counts_this_incarnations_nodes_with_my_own_latest_status() {
        let store = vec![
            enactment("web", "u2", "b", status("Degraded")),
            enactment("web", "u2", "a", status("Available")),
            enactment("web", "u1", "old", status("Available")),
            enactment("db", "u3", "a", status("Available")),
            enactment("web", "u2", "me", status("Progressing")),
        ];
        let mine = status("Available");
        let m = members(&store, "web", "u2", "me", Some(&mine));
        assert_eq!(m.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["a", "b", "me"]);
        let agg = aggregate(Some(4), &m, &|_| true, None, &t(100));
        assert_eq!((agg.matched_nodes, agg.available_nodes, agg.progressing_nodes, agg.degraded_nodes), (3, 2, 0, 1));
        assert_eq!(agg.observed_generation, Some(4));
        assert_eq!(rank(&m, "a"), 0);
        assert_eq!(rank(&m, "me"), 2);
        assert_eq!(rank(&m, "stranger"), 3);
        // Without a record of its own last write, the watched copy of its own counts.
        let m = members(&store, "web", "u2", "me", None);
        assert_eq!(m.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["a", "b", "me"]);
        assert_eq!(aggregate(Some(4), &m, &|_| true, None, &t(100)).progressing_nodes, 1);
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time_so_the_aggregate_compares_equal() {
        let store = vec![enactment("web", "u", "a", status("Available"))];
        let m = members(&store, "web", "u", "z", None);
        let first = aggregate(Some(1), &m, &|_| true, None, &t(100));
        let again = aggregate(Some(1), &m, &|_| true, Some(&first), &t(200));
        assert_eq!(again, first, "nothing changed: nothing to write");
        let store = vec![enactment("web", "u", "a", status("Degraded"))];
        let m = members(&store, "web", "u", "z", None);
        let changed = aggregate(Some(1), &m, &|_| true, Some(&first), &t(300));
        let time = |s: &HostPolicyStatus, c: &str| {
            s.conditions.iter().find(|x| x.type_ == c).unwrap().last_transition_time.clone()
        };
        assert_eq!(time(&changed, "Available"), t(300));
        assert_eq!(time(&changed, "Degraded"), t(300));
        assert_eq!(time(&changed, "Progressing"), t(100), "still False: its time stays");
    }

    #[test]
    fn nodes_are_enforcing_lagging_or_failing() {
        let at =
            |g: i64, true_type: &str| HostPolicyEnactmentStatus { observed_generation: Some(g), ..status(true_type) };
        let store = vec![
            enactment("web", "u", "current", at(3, "Available")),
            enactment("web", "u", "behind", at(2, "Available")),
            enactment("web", "u", "dead", at(3, "Available")),
            enactment("web", "u", "broken", at(3, "Degraded")),
            enactment("web", "u", "dead-broken", at(3, "Degraded")),
        ];
        let m = members(&store, "web", "u", "me", None);
        let alive = |n: &str| !n.starts_with("dead");
        let agg = aggregate(Some(3), &m, &alive, None, &t(100));
        assert_eq!((agg.enforcing_nodes, agg.lagging_nodes, agg.failing_nodes), (1, 3, 1));
        assert_eq!(agg.matched_nodes, 5);
        assert_eq!(standing(Some(3), None, true), Standing::Lagging, "no enactment yet: lagging");
    }
}
