//! A guarded change as one transaction: checkpoint → apply → verify → commit or roll back.
//! Guarded are the changes that can cut the host off: an uplink takeover and its release, STP
//! on a bridge that carries an uplink, another port attached to such a bridge, forwarding while
//! the default route goes through a managed bridge. The checkpoint is written to the durable memory before anything changes, so
//! a virtwarden killed mid-change restores it at its next start ([`restore_pending`]). A change
//! whose verification fails is rolled back and held until the policy changes or an admin
//! releases it.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtwarden_policies::VerifyProbe;

use crate::hostnet::uplink::{Checkpoint, Neighbour, SysctlValue, UplinkNet};
use crate::hostnet::{Forwarding, HostNet, NetError};
use crate::memory::MemoryStore;
use crate::observe::{
    BridgeAttrs, DefaultGateway, GuardedChange, HeldUplink, ObservedNet, StpSettings, Sysctl, UplinkPort,
};
use crate::plan::network::{Guard, Takeover};
use virtwarden_policies::DesiredState;

/// What the durable memory keeps about uplinks (`uplinks` of the memory file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UplinkMemory {
    /// Checkpoints of changes in flight: restored first at start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Checkpoint>,
    /// Verified takeovers, with what was there before (a release puts it back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub committed: Vec<Checkpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldUplink>,
}

/// Where takeovers are recorded.
pub trait UplinkJournal: Send + Sync {
    fn load(&self) -> UplinkMemory;
    /// Record `f`'s change, on disk before returning (a checkpoint must be there before the
    /// change it guards).
    fn change(&self, f: &mut dyn FnMut(&mut UplinkMemory)) -> Result<(), String>;
}

impl UplinkJournal for MemoryStore {
    fn load(&self) -> UplinkMemory {
        self.read(|m| serde_json::from_value(m.uplinks.clone()).unwrap_or_default())
    }

    fn change(&self, f: &mut dyn FnMut(&mut UplinkMemory)) -> Result<(), String> {
        self.update(|m| {
            let mut u: UplinkMemory = serde_json::from_value(m.uplinks.clone()).unwrap_or_default();
            f(&mut u);
            m.uplinks = serde_json::to_value(&u).unwrap_or_default();
        });
        self.write_now().map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Fill `observed` with what a takeover of each listed uplink port would move, who else
/// manages it, and the held takeovers.
pub async fn observe_uplinks<N: UplinkNet>(
    net: &N,
    observed: &mut ObservedNet,
    desired: &DesiredState,
    journal: &dyn UplinkJournal,
) {
    let memory = journal.load();
    observed.held_uplinks = memory.held;
    match net.default_gateways().await {
        Ok(gws) => {
            observed.default_gateways = gws
                .into_iter()
                .filter_map(|(index, address)| {
                    let link = observed.links.iter().find(|l| l.index == index)?.name.clone();
                    Some(DefaultGateway { link, address })
                })
                .collect()
        }
        Err(e) => tracing::warn!(%e, "cannot read the default gateways"),
    }
    observed.taken_over = memory.committed.iter().map(|c| (c.port.clone(), c.bridge.clone())).collect();
    for b in desired.bridges.iter().filter(|b| b.spec.allow_uplink_change.allowed()) {
        for port in &b.spec.ports {
            let Some(link) = observed.link(port) else { continue };
            if link.master.as_deref() == Some(b.spec.name.as_str()) || observed.uplink_reason(port).is_none() {
                continue;
            }
            let index = link.index;
            match net.checkpoint(&b.spec.name, port).await {
                Ok(cp) => {
                    let moves = net.describe(&cp);
                    observed.uplink_ports.push(UplinkPort {
                        name: port.clone(),
                        bridge: b.spec.name.clone(),
                        mac: cp.port_mac.clone(),
                        mtu: cp.port_mtu,
                        addresses: moves.addresses,
                        routes: moves.routes,
                        rules: moves.rules,
                        gateways: moves.gateways,
                        managers: net.managers(port, index),
                    })
                }
                Err(e) => tracing::warn!(port = %port, %e, "cannot read what a takeover would move"),
            }
        }
    }
}

/// The verdict of one guarded change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TakeoverResult {
    pub verified: bool,
    /// `verified in 412 ms: gateway 198.51.100.1 answers ARP/NDP on br0` or the failure and
    /// the rollback.
    pub detail: String,
    pub verify_millis: u128,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_millis: Option<u128>,
    /// The rollback itself failed: the host's network is in no known state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback_failed: bool,
}

/// What a guarded change does between its checkpoint and its verification.
enum Step<'a> {
    /// Move the checkpoint's addresses, routes and rules into the bridge, enslave the port.
    TakeOver,
    /// Move them back to the port, detach it.
    GiveBack,
    Stp(StpSettings),
    /// Make the port a port of the bridge.
    Attach,
    /// `accept_ra = 2` on `keep_ra` first, then the forwarding switch.
    Forwarding {
        ipv6: bool,
        on: bool,
        keep_ra: &'a [String],
    },
}

/// What decides a guarded change: default gateways (each on the link it must answer on), the
/// policy's probes, and the time they have.
struct Deciders<'a> {
    gateways: Vec<(String, IpAddr)>,
    probes: &'a [VerifyProbe],
    timeout: Duration,
    /// They must still pass when `timeout` has run, not only once (see [`verify_on`]).
    throughout: bool,
}

impl<'a> Deciders<'a> {
    fn of(guard: &'a Guard) -> Self {
        Deciders {
            gateways: guard.gateways.iter().map(|g| (g.link.clone(), g.address)).collect(),
            probes: &guard.probes,
            timeout: guard.verify_timeout.as_std(),
            throughout: false,
        }
    }
}

/// Take `port` over into `bridge` as planned; roll back and hold on any failure.
pub async fn take_over<N: HostNet + UplinkNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    journal: &dyn UplinkJournal,
    port: &str,
    bridge: &str,
    plan: &Takeover,
) -> TakeoverResult {
    let cp = match net.checkpoint(bridge, port).await {
        Ok(cp) => Checkpoint { fingerprint: plan.fingerprint.clone(), ..cp },
        Err(e) => return failed(format!("cannot take a checkpoint: {e}; nothing changed")),
    };
    let deciders = Deciders {
        gateways: net.describe(&cp).gateways.into_iter().map(|g| (bridge.to_string(), g)).collect(),
        probes: &plan.probes,
        timeout: plan.verify_timeout.as_std(),
        throughout: false,
    };
    transaction(net, fwd, journal, cp, Step::TakeOver, deciders).await
}

/// Give a taken-over uplink back: everything the takeover moved goes back to the port, which
/// leaves the bridge; then the guard's gateways must answer on the port. If they do not, the
/// bridge takes the uplink over again (the state before the release) and the release is held.
pub async fn give_back<N: HostNet + UplinkNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    journal: &dyn UplinkJournal,
    port: &str,
    bridge: &str,
    guard: &Guard,
) -> TakeoverResult {
    let Some(committed) = journal.load().committed.into_iter().find(|c| c.port == port && c.bridge == bridge) else {
        return failed(format!("no record of taking {port} over into {bridge}; nothing changed"));
    };
    let cp = Checkpoint { change: GuardedChange::Release, fingerprint: guard.fingerprint.clone(), ..committed };
    // The gateways the plan saw through the bridge, and those of the routes that move back.
    let mut deciders = Deciders::of(guard);
    for gw in net.describe(&cp).gateways {
        if !deciders.gateways.iter().any(|(_, g)| *g == gw) {
            deciders.gateways.push((port.to_string(), gw));
        }
    }
    transaction(net, fwd, journal, cp, Step::GiveBack, deciders).await
}

/// STP settings `stp` on `bridge`, which carries an uplink: its STP settings are the checkpoint.
pub async fn set_stp<N: HostNet + UplinkNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    journal: &dyn UplinkJournal,
    bridge: &str,
    stp: StpSettings,
    guard: &Guard,
) -> TakeoverResult {
    let before = match bridge_stp(net, bridge).await {
        Ok(b) => b,
        Err(e) => return failed(format!("cannot take a checkpoint: {e}; nothing changed")),
    };
    let cp = Checkpoint {
        bridge: bridge.into(),
        change: GuardedChange::Stp,
        fingerprint: guard.fingerprint.clone(),
        bridge_stp: Some(before),
        ..Default::default()
    };
    transaction(net, fwd, journal, cp, Step::Stp(stp), Deciders::of(guard)).await
}

/// `port`, another host interface, into `bridge`, which carries an uplink: the checkpoint is
/// that the port is in no bridge (the plan attaches no port that is in one); a rollback detaches
/// it again.
pub async fn attach_port<N: HostNet + UplinkNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    journal: &dyn UplinkJournal,
    port: &str,
    bridge: &str,
    guard: &Guard,
) -> TakeoverResult {
    let cp = Checkpoint {
        bridge: bridge.into(),
        port: port.into(),
        change: GuardedChange::Port,
        fingerprint: guard.fingerprint.clone(),
        ..Default::default()
    };
    // A new port's effect (a loop, a wrong LAN) shows after its first frames, and with STP only
    // once it forwards: the deciders must still pass when the verify time is over.
    let deciders = Deciders { throughout: true, ..Deciders::of(guard) };
    transaction(net, fwd, journal, cp, Step::Attach, deciders).await
}

/// IP forwarding of `family` while the default route depends on a managed bridge: the
/// forwarding switch and the `accept_ra` of every interface with an RA-learned default route
/// are the checkpoint.
pub async fn set_forwarding<N: HostNet + UplinkNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    journal: &dyn UplinkJournal,
    family: &str,
    on: bool,
    guard: &Guard,
) -> TakeoverResult {
    // The forwarding switch first: a rollback writes them back in this order.
    let mut held: Vec<Sysctl> = guard.sysctls.clone();
    for iface in &guard.keep_ra {
        let s = Sysctl::AcceptRa { iface: iface.clone() };
        if !held.contains(&s) {
            held.push(s);
        }
    }
    let mut sysctls = Vec::new();
    for s in held {
        match read_sysctl(fwd, &s) {
            Ok(value) => sysctls.push(SysctlValue { sysctl: s, value }),
            Err(e) => return failed(format!("cannot take a checkpoint: {e}; nothing changed")),
        }
    }
    let cp = Checkpoint {
        bridge: "forwarding".into(),
        port: family.into(),
        change: GuardedChange::Forwarding,
        fingerprint: guard.fingerprint.clone(),
        sysctls,
        ..Default::default()
    };
    let step = Step::Forwarding { ipv6: family == "ipv6", on, keep_ra: &guard.keep_ra };
    transaction(net, fwd, journal, cp, step, Deciders::of(guard)).await
}

/// Point each gateway at the link its default route uses now (unchanged when it has none, or
/// when the host cannot be read: verification then says what did not answer where).
async fn gateways_where_routed_now<N: HostNet + UplinkNet>(net: &N, gateways: &mut [(String, IpAddr)]) {
    let (Ok(routed), Ok(links)) = (net.default_gateways().await, net.links().await) else {
        return;
    };
    for (link, gw) in gateways.iter_mut() {
        let now = routed.iter().find(|(_, g)| g == gw).and_then(|(index, _)| links.iter().find(|l| l.index == *index));
        if let Some(l) = now {
            link.clone_from(&l.name);
        }
    }
}

/// The transaction: `cp` into the durable memory, `step`, verification, then commit — or roll
/// back to `cp` and hold the change.
async fn transaction<N: HostNet + UplinkNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    journal: &dyn UplinkJournal,
    cp: Checkpoint,
    step: Step<'_>,
    mut deciders: Deciders<'_>,
) -> TakeoverResult {
    if matches!(cp.change, GuardedChange::Stp | GuardedChange::Forwarding | GuardedChange::Port) {
        // Planned with the others in one pass, a takeover before this change may have moved the
        // default route: each gateway answers where its route goes now.
        gateways_where_routed_now(net, &mut deciders.gateways).await;
    }
    if let Err(e) = record(journal, &mut |u| u.pending.push(cp.clone())) {
        return failed(format!("cannot record the checkpoint in the durable memory ({e}); nothing changed"));
    }
    let (change, what) = (cp.change, describe(&cp));
    let started = Instant::now();
    let verdict = match apply_step(net, fwd, &cp, &step).await {
        Err(e) => Err(format!("applying failed: {e}")),
        Ok(()) => verify_on(net, &deciders.gateways, deciders.probes, deciders.timeout, deciders.throughout).await,
    };
    let verify_millis = started.elapsed().as_millis();
    match verdict {
        Ok(passed) => {
            let _ = record(journal, &mut |u| {
                // Every checkpoint of this change goes, older ones left by a failed restore too:
                // restored at a later start, they would undo what was just verified.
                u.pending.retain(|p| !(p.change == change && p.port == cp.port && p.bridge == cp.bridge));
                u.held.retain(|h| !(h.change == change && h.port == cp.port && h.bridge == cp.bridge));
                let same = |p: &Checkpoint| p.port == cp.port && p.bridge == cp.bridge;
                match change {
                    GuardedChange::Takeover => {
                        u.committed.retain(|p| !same(p));
                        u.committed.push(cp.clone());
                    }
                    GuardedChange::Release => u.committed.retain(|p| !same(p)),
                    GuardedChange::Stp | GuardedChange::Forwarding | GuardedChange::Port => {}
                }
            });
            tracing::info!(change = %what, verify_millis, "guarded network change verified");
            let verb = if change == GuardedChange::Release { "given back and verified" } else { "verified" };
            TakeoverResult {
                verified: true,
                detail: format!("{verb} in {verify_millis} ms: {passed}"),
                verify_millis,
                rollback_millis: None,
                rollback_failed: false,
            }
        }
        Err(why) => {
            let t = Instant::now();
            let restored = roll_back(net, fwd, &cp).await;
            let rollback_millis = t.elapsed().as_millis();
            let held = HeldUplink {
                bridge: cp.bridge.clone(),
                port: cp.port.clone(),
                reason: why.clone(),
                at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                fingerprint: cp.fingerprint.clone(),
                change,
            };
            let _ = record(journal, &mut |u| {
                if restored.is_ok() {
                    u.pending.retain(|p| p != &cp);
                }
                u.held.retain(|h| !(h.change == change && h.port == held.port && h.bridge == held.bridge));
                u.held.push(held.clone());
            });
            let release = if change == GuardedChange::Forwarding { "forwarding" } else { cp.bridge.as_str() };
            let undone = match change {
                GuardedChange::Release => format!("put back into {} in {rollback_millis} ms", cp.bridge),
                GuardedChange::Port => format!("detached again in {rollback_millis} ms"),
                _ => format!("rolled back in {rollback_millis} ms"),
            };
            let rollback_failed = restored.is_err();
            let detail = match restored {
                Ok(()) => format!(
                    "verification failed after {verify_millis} ms: {why}; {undone}; held until the policy changes or `virtwarden release {release}`"
                ),
                Err(e) => format!("verification failed: {why}; ROLLBACK FAILED: {e} (the checkpoint stays in the durable memory and is restored at the next start)"),
            };
            tracing::warn!(change = %what, %detail, "guarded network change rolled back");
            TakeoverResult {
                verified: false,
                detail,
                verify_millis,
                rollback_millis: Some(rollback_millis),
                rollback_failed,
            }
        }
    }
}

/// `up0 → br0`, `release of up0 from br0`, `STP of br0`, `ipv4 forwarding`.
fn describe(cp: &Checkpoint) -> String {
    HeldUplink { bridge: cp.bridge.clone(), port: cp.port.clone(), change: cp.change, ..Default::default() }.what()
}

async fn apply_step<N: HostNet + UplinkNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    cp: &Checkpoint,
    step: &Step<'_>,
) -> Result<(), NetError> {
    match step {
        Step::TakeOver => net.take_over(cp).await,
        Step::GiveBack => net.restore(cp).await,
        Step::Stp(stp) => net.set_stp(&cp.bridge, *stp).await,
        Step::Attach => net.attach(&cp.port, &cp.bridge).await,
        Step::Forwarding { ipv6, on, keep_ra } => {
            for iface in keep_ra.iter() {
                fwd.set_accept_ra(iface, 2)?;
            }
            if *ipv6 {
                fwd.set_ipv6(*on)
            } else {
                fwd.set_ipv4(*on)
            }
        }
    }
}

/// Put back what `cp` holds: links (a takeover undone, a release re-done), the bridge's STP
/// settings, the sysctls — each only where it differs now, so it is safe to repeat. Every part
/// is tried; the first failure is returned.
async fn roll_back<N: HostNet + UplinkNet, F: Forwarding>(net: &N, fwd: &F, cp: &Checkpoint) -> Result<(), String> {
    let links = match cp.change {
        GuardedChange::Takeover => net.restore(cp).await,
        GuardedChange::Release => net.take_over(cp).await,
        // The port was in no bridge: detached again (when it still is this bridge's port), and
        // nothing else touched.
        GuardedChange::Port => net.detach(&cp.port, &cp.bridge).await,
        GuardedChange::Stp | GuardedChange::Forwarding => Ok(()),
    };
    let stp = match &cp.bridge_stp {
        Some(before) => restore_stp(net, &cp.bridge, before).await,
        None => Ok(()),
    };
    let mut sysctls = Ok(());
    for s in &cp.sysctls {
        let result = match read_sysctl(fwd, &s.sysctl) {
            Ok(now) if now == s.value => Ok(()),
            _ => write_sysctl(fwd, &s.sysctl, s.value),
        };
        if sysctls.is_ok() {
            sysctls = result;
        }
    }
    links.and(stp).and(sysctls).map_err(|e| e.to_string())
}

async fn bridge_stp<N: HostNet>(net: &N, bridge: &str) -> Result<BridgeAttrs, NetError> {
    net.links()
        .await?
        .into_iter()
        .find(|l| l.name == bridge)
        .and_then(|l| l.bridge)
        .ok_or_else(|| NetError::NoSuchLink { op: "read stp", object: bridge.into() })
}

/// The bridge's STP state first, then its timers: the kernel checks timer ranges against the
/// state the bridge is in.
async fn restore_stp<N: HostNet>(net: &N, bridge: &str, before: &BridgeAttrs) -> Result<(), NetError> {
    if bridge_stp(net, bridge).await.ok().as_ref() == Some(before) {
        return Ok(());
    }
    let state =
        StpSettings { enabled: before.stp, forward_delay: None, hello_time: None, max_age: None, priority: None };
    net.set_stp(bridge, state).await?;
    net.set_stp(
        bridge,
        StpSettings {
            forward_delay: Some(before.forward_delay),
            hello_time: Some(before.hello_time),
            max_age: Some(before.max_age),
            priority: Some(before.priority),
            ..state
        },
    )
    .await
}

fn read_sysctl<F: Forwarding>(fwd: &F, s: &Sysctl) -> Result<u8, NetError> {
    match s {
        Sysctl::Ipv4Forwarding => fwd.ipv4().map(u8::from),
        Sysctl::Ipv6Forwarding => fwd.ipv6().map(u8::from),
        Sysctl::AcceptRa { iface } => fwd.accept_ra(iface),
    }
}

fn write_sysctl<F: Forwarding>(fwd: &F, s: &Sysctl, value: u8) -> Result<(), NetError> {
    match s {
        Sysctl::Ipv4Forwarding => fwd.set_ipv4(value != 0),
        Sysctl::Ipv6Forwarding => fwd.set_ipv6(value != 0),
        Sysctl::AcceptRa { iface } => fwd.set_accept_ra(iface, value),
    }
}

/// Write to the durable memory from the network task: the write is fsynced, so on the
/// service's multi-thread runtime it runs with the worker handed over to other tasks
/// (`block_in_place`) instead of holding events up behind the disk; a current-thread runtime
/// (one-shot `apply`) has nothing else to run meanwhile.
fn record(journal: &dyn UplinkJournal, f: &mut dyn FnMut(&mut UplinkMemory)) -> Result<(), String> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| journal.change(f))
        }
        _ => journal.change(f),
    }
}

fn failed(detail: String) -> TakeoverResult {
    TakeoverResult { verified: false, detail, verify_millis: 0, rollback_millis: None, rollback_failed: false }
}

/// How often a gateway must answer afresh while verification runs: one that goes away during
/// verification is noticed within this.
const REASK: Duration = Duration::from_secs(1);

/// Poll every decider until all passed (the text says which) or `timeout` ran out (the text
/// says which did not). A gateway counts only with an answer given after the change (its
/// neighbour entry is forgotten first) and asked again every [`REASK`]; all gateways must
/// answer in the same round. A probe that passed stays passed. `throughout`: passing early is
/// not enough, they must still pass once `timeout` has run (a round caught between a re-ask and
/// its answer gets up to [`REASK`] more).
pub async fn verify_on<N: UplinkNet>(
    net: &N,
    gateways: &[(String, IpAddr)],
    probes: &[VerifyProbe],
    timeout: Duration,
    throughout: bool,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let give_up = if throughout { deadline + REASK } else { deadline };
    let mut passed_once = false;
    let mut asked = Vec::with_capacity(gateways.len());
    for (link, gw) in gateways {
        let _ = net.forget_neighbour(link, *gw).await;
        asked.push(Instant::now());
    }
    let mut probes_left: Vec<VerifyProbe> = probes.to_vec();
    let mut passed_probes = Vec::new();
    // Gateways whose neighbour entry an admin set: the kernel never asks them, so they decide
    // nothing; when nothing else could decide, the change is not verified (name probes).
    let mut set_by_admin = vec![false; gateways.len()];
    loop {
        let mut gw_down = Vec::new();
        for (((link, gw), asked_at), admin) in gateways.iter().zip(asked.iter_mut()).zip(set_by_admin.iter_mut()) {
            if *admin {
                continue;
            }
            match net.neighbour_reachable(link, *gw).await {
                Ok(Neighbour::SetByAdmin) => *admin = true,
                Ok(Neighbour::Reachable) if asked_at.elapsed() >= REASK => {
                    let _ = net.forget_neighbour(link, *gw).await;
                    *asked_at = Instant::now();
                }
                Ok(Neighbour::Reachable) => {}
                _ => gw_down.push(format!("gateway {gw} did not answer ARP/NDP on {link}")),
            }
        }
        let unchecked: Vec<String> = gateways
            .iter()
            .zip(&set_by_admin)
            .filter(|(_, admin)| **admin)
            .map(|((link, gw), _)| format!("gateway {gw} on {link}"))
            .collect();
        if !unchecked.is_empty() && set_by_admin.iter().all(|a| *a) && probes.is_empty() {
            return Err(format!(
                "{} has a neighbour entry set by an admin (permanent or NOARP), which the kernel never asks, so \
                 nothing can show the host still reaches its LAN: name `verify` probes for this bridge",
                unchecked.join(", ")
            ));
        }
        let mut still = Vec::new();
        for p in probes_left {
            let budget = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(500));
            if net.probe(&p, budget).await {
                passed_probes.push(p.to_string());
            } else {
                still.push(p);
            }
        }
        probes_left = still;
        let all = gw_down.is_empty() && probes_left.is_empty();
        passed_once |= all;
        if all && (!throughout || Instant::now() >= deadline) {
            let mut passed: Vec<String> = gateways
                .iter()
                .zip(&set_by_admin)
                .filter(|(_, admin)| !**admin)
                .map(|((link, gw), _)| format!("gateway {gw} answers ARP/NDP on {link}"))
                .collect();
            passed.extend(passed_probes);
            let mut text = if passed.is_empty() { "nothing to probe".into() } else { passed.join(", ") };
            if !unchecked.is_empty() {
                text.push_str(&format!(" (not asked, its neighbour entry set by an admin: {})", unchecked.join(", ")));
            }
            return Ok(text);
        }
        if Instant::now() >= give_up {
            let mut why = gw_down;
            why.extend(probes_left.iter().map(|p| format!("{p} did not answer")));
            // Throughout: all had answered once, so something stopped answering since.
            return Err(format!(
                "{} {} {}",
                why.join(", "),
                if passed_once { "any more at the end of" } else { "within" },
                virtwarden_policies::Duration::from_millis(timeout.as_millis() as u64)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// At start, before anything else: restore every checkpoint of a change that was in flight
/// when virtwarden stopped, and hold that change. Returns what it restored.
pub async fn restore_pending<N: HostNet + UplinkNet, F: Forwarding>(
    net: &N,
    fwd: &F,
    journal: &dyn UplinkJournal,
) -> Vec<String> {
    let pending = journal.load().pending;
    let mut done = Vec::new();
    for cp in pending {
        match roll_back(net, fwd, &cp).await {
            Ok(()) => {
                tracing::warn!(change = %describe(&cp), "restored the checkpoint of a guarded network change interrupted by a stop");
                let held = HeldUplink {
                    bridge: cp.bridge.clone(),
                    port: cp.port.clone(),
                    reason: "virtwarden stopped during the change; its checkpoint was restored at start".into(),
                    at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    fingerprint: cp.fingerprint.clone(),
                    change: cp.change,
                };
                let _ = record(journal, &mut |u| {
                    u.pending.retain(|p| p != &cp);
                    u.held.retain(|h| !(h.change == held.change && h.port == held.port && h.bridge == held.bridge));
                    u.held.push(held.clone());
                });
                done.push(describe(&cp));
            }
            Err(e) => {
                tracing::error!(change = %describe(&cp), %e, "cannot restore an interrupted guarded network change");
                // Held, so no pass plans the change again on top of a half-restored host; the
                // checkpoint stays and the next start tries again.
                let held = HeldUplink {
                    bridge: cp.bridge.clone(),
                    port: cp.port.clone(),
                    reason: format!(
                        "virtwarden stopped during the change and restoring its checkpoint at start failed: {e}"
                    ),
                    at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    fingerprint: cp.fingerprint.clone(),
                    change: cp.change,
                };
                let _ = record(journal, &mut |u| {
                    u.held.retain(|h| !(h.change == held.change && h.port == held.port && h.bridge == held.bridge));
                    u.held.push(held.clone());
                });
            }
        }
    }
    done
}

/// Lift the hold on `bridge`'s takeovers. Returns what was held.
pub fn release(journal: &dyn UplinkJournal, bridge: &str) -> Result<Vec<HeldUplink>, String> {
    let mut released = Vec::new();
    journal.change(&mut |u| {
        released = u.held.iter().filter(|h| h.bridge == bridge || h.port == bridge).cloned().collect();
        u.held.retain(|h| !(h.bridge == bridge || h.port == bridge));
    })?;
    Ok(released)
}
