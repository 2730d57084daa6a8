//! An uplink change as one transaction: checkpoint → apply → verify → commit or roll back.
//! The checkpoint is written to the durable memory before anything changes, so a virtwarden
//! killed mid-change restores it at its next start ([`restore_pending`]). A takeover whose
//! verification fails is rolled back and held until the policy changes or an admin releases it.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtwarden_policies::VerifyProbe;

use crate::hostnet::uplink::{Checkpoint, UplinkNet};
use crate::memory::MemoryStore;
use crate::observe::{HeldUplink, ObservedNet, UplinkPort};
use crate::plan::network::Takeover;
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

/// The verdict of one takeover.
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
}

/// Take `port` over into `bridge` as planned; roll back and hold on any failure.
pub async fn take_over<N: UplinkNet>(
    net: &N,
    journal: &dyn UplinkJournal,
    port: &str,
    bridge: &str,
    plan: &Takeover,
) -> TakeoverResult {
    let cp = match net.checkpoint(bridge, port).await {
        Ok(cp) => Checkpoint { fingerprint: plan.fingerprint.clone(), ..cp },
        Err(e) => return failed(format!("cannot take a checkpoint: {e}; nothing changed")),
    };
    if let Err(e) = journal.change(&mut |u| u.pending.push(cp.clone())) {
        return failed(format!("cannot record the checkpoint in the durable memory ({e}); nothing changed"));
    }
    let started = Instant::now();
    let applied = net.take_over(&cp).await;
    let verdict = match applied {
        Err(e) => Err(format!("applying failed: {e}")),
        Ok(()) => verify(net, bridge, &net.describe(&cp).gateways, &plan.probes, plan.verify_timeout.as_std()).await,
    };
    let verify_millis = started.elapsed().as_millis();
    match verdict {
        Ok(passed) => {
            let _ = journal.change(&mut |u| {
                u.pending.retain(|p| p != &cp);
                u.committed.retain(|p| !(p.port == cp.port && p.bridge == cp.bridge));
                u.committed.push(cp.clone());
            });
            tracing::info!(port, bridge, verify_millis, "uplink taken over and verified");
            TakeoverResult {
                verified: true,
                detail: format!("verified in {verify_millis} ms: {passed}"),
                verify_millis,
                rollback_millis: None,
            }
        }
        Err(why) => {
            let t = Instant::now();
            let restored = net.restore(&cp).await;
            let rollback_millis = t.elapsed().as_millis();
            let held = HeldUplink {
                bridge: bridge.into(),
                port: port.into(),
                reason: why.clone(),
                at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                fingerprint: plan.fingerprint.clone(),
            };
            let _ = journal.change(&mut |u| {
                if restored.is_ok() {
                    u.pending.retain(|p| p != &cp);
                }
                u.held.retain(|h| !(h.port == held.port && h.bridge == held.bridge));
                u.held.push(held.clone());
            });
            let detail = match restored {
                Ok(()) => format!(
                    "verification failed after {verify_millis} ms: {why}; rolled back in {rollback_millis} ms; held until the policy changes or `virtwarden release {bridge}`"
                ),
                Err(e) => format!("verification failed: {why}; ROLLBACK FAILED: {e} (the checkpoint stays in the durable memory and is restored at the next start)"),
            };
            tracing::warn!(port, bridge, %detail, "uplink change rolled back");
            TakeoverResult { verified: false, detail, verify_millis, rollback_millis: Some(rollback_millis) }
        }
    }
}

fn failed(detail: String) -> TakeoverResult {
    TakeoverResult { verified: false, detail, verify_millis: 0, rollback_millis: None }
}

/// Poll every decider until all passed (the text says which) or `timeout` ran out (the text
/// says which did not).
pub async fn verify<N: UplinkNet>(
    net: &N,
    bridge: &str,
    gateways: &[IpAddr],
    probes: &[VerifyProbe],
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut gw_left: Vec<IpAddr> = gateways.to_vec();
    let mut probes_left: Vec<VerifyProbe> = probes.to_vec();
    let mut passed = Vec::new();
    loop {
        let mut still = Vec::new();
        for gw in gw_left {
            match net.neighbour_reachable(bridge, gw).await {
                Ok(true) => passed.push(format!("gateway {gw} answers ARP/NDP on {bridge}")),
                _ => still.push(gw),
            }
        }
        gw_left = still;
        let mut still = Vec::new();
        for p in probes_left {
            let budget = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(500));
            if net.probe(&p, budget).await {
                passed.push(p.to_string());
            } else {
                still.push(p);
            }
        }
        probes_left = still;
        if gw_left.is_empty() && probes_left.is_empty() {
            return Ok(if passed.is_empty() { "nothing to probe".into() } else { passed.join(", ") });
        }
        if Instant::now() >= deadline {
            let mut why: Vec<String> =
                gw_left.iter().map(|g| format!("gateway {g} did not answer ARP/NDP on {bridge}")).collect();
            why.extend(probes_left.iter().map(|p| format!("{p} did not answer")));
            return Err(format!(
                "{} within {}",
                why.join(", "),
                virtwarden_policies::Duration::from_millis(timeout.as_millis() as u64)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// At start, before anything else: restore every checkpoint of a change that was in flight
/// when virtwarden stopped, and hold that change. Returns what it restored.
pub async fn restore_pending<N: UplinkNet>(net: &N, journal: &dyn UplinkJournal) -> Vec<String> {
    let pending = journal.load().pending;
    let mut done = Vec::new();
    for cp in pending {
        match net.restore(&cp).await {
            Ok(()) => {
                tracing::warn!(port = %cp.port, bridge = %cp.bridge, "restored the checkpoint of an uplink change interrupted by a stop");
                let held = HeldUplink {
                    bridge: cp.bridge.clone(),
                    port: cp.port.clone(),
                    reason: "virtwarden stopped during the change; its checkpoint was restored at start".into(),
                    at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    fingerprint: cp.fingerprint.clone(),
                };
                let _ = journal.change(&mut |u| {
                    u.pending.retain(|p| p != &cp);
                    u.held.retain(|h| !(h.port == held.port && h.bridge == held.bridge));
                    u.held.push(held.clone());
                });
                done.push(format!("{} → {}", cp.port, cp.bridge));
            }
            Err(e) => {
                tracing::error!(port = %cp.port, bridge = %cp.bridge, %e, "cannot restore an interrupted uplink change")
            }
        }
    }
    done
}

/// Give a taken-over uplink back: everything the takeover moved goes back to the port, which
/// leaves the bridge. Then its default gateways must answer on the port again; a failure is
/// reported (the port has its original configuration back, so nothing is rolled forward).
pub async fn give_back<N: UplinkNet>(net: &N, journal: &dyn UplinkJournal, port: &str, bridge: &str) -> TakeoverResult {
    let Some(cp) = journal.load().committed.into_iter().find(|c| c.port == port && c.bridge == bridge) else {
        return failed(format!("no record of taking {port} over into {bridge}; nothing changed"));
    };
    let started = Instant::now();
    if let Err(e) = net.restore(&cp).await {
        return failed(format!("giving {port} back failed: {e}"));
    }
    let _ = journal.change(&mut |u| u.committed.retain(|c| !(c.port == port && c.bridge == bridge)));
    let verdict = verify(net, port, &net.describe(&cp).gateways, &[], Duration::from_secs(10)).await;
    let verify_millis = started.elapsed().as_millis();
    match verdict {
        Ok(passed) => TakeoverResult {
            verified: true,
            detail: format!("given back and verified in {verify_millis} ms: {passed}"),
            verify_millis,
            rollback_millis: None,
        },
        Err(why) => TakeoverResult {
            verified: false,
            detail: format!("given back, but {why}"),
            verify_millis,
            rollback_millis: None,
        },
    }
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
