//! What diagnose reads from libvirt, behind one small read-only trait: a domain's state, XML,
//! control and job info; the libvirt networks; the DAC base label. Implemented for a
//! [`LibvirtHost`] (everything) and for any [`Hypervisor`] (definition and state only, for the
//! engine's failure explanations).

use std::time::Duration;

use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::libvirt::backend_error;
use crate::libvirt::LibvirtHost;
use crate::observe::DomainState;

/// libvirt's view of one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainFacts {
    pub state: DomainState,
    /// `virsh domstate --reason` words.
    pub reason: String,
    /// The live XML when running (it names the taps and the DAC label in use), else the
    /// persistent definition.
    pub xml: String,
    pub control: Option<ControlInfo>,
    pub job: Option<JobInfo>,
}

/// `virsh domcontrol`: what libvirt's control of the domain is doing, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlInfo {
    pub state: ControlState,
    pub since: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlState {
    Ok,
    /// A job holds the domain (others wait for its state change lock).
    Job,
    /// QEMU's monitor is busy with a command.
    Occupied,
    /// libvirt lost control (the reason in words: `monitor`, `internal`, `unknown`).
    Error(String),
}

/// `virsh domjobinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// `bounded`, `unbounded`, …
    pub kind: String,
    pub elapsed: Duration,
}

/// A libvirt network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkFacts {
    pub name: String,
    pub active: bool,
    pub bridge: Option<String>,
    /// `<forward mode>`: `nat`, `route`, `bridge`, `open`, …; `None`: isolated.
    pub forward: Option<String>,
}

/// Read-only access to what libvirt knows.
pub trait DiagnoseSource {
    /// The connect URI (decides where QEMU logs are).
    fn uri(&self) -> String;
    /// `None` when no such domain is defined.
    fn domain(&self, name: &str) -> Result<Option<DomainFacts>, HypervisorError>;
    fn networks(&self) -> Result<Vec<NetworkFacts>, HypervisorError>;
    /// libvirt's DAC base label for a virtualisation type (`+64055:+994`), from the capabilities.
    fn dac_base_label(&self, virt_type: &str) -> Option<String>;
}

/// A pool diagnoses through its first connection.
impl DiagnoseSource for crate::libvirt::pool::LibvirtPool {
    fn uri(&self) -> String {
        DiagnoseSource::uri(self.first())
    }
    fn domain(&self, name: &str) -> Result<Option<DomainFacts>, HypervisorError> {
        self.first().domain(name)
    }
    fn networks(&self) -> Result<Vec<NetworkFacts>, HypervisorError> {
        self.first().networks()
    }
    fn dac_base_label(&self, virt_type: &str) -> Option<String> {
        self.first().dac_base_label(virt_type)
    }
}

impl DiagnoseSource for LibvirtHost {
    fn uri(&self) -> String {
        LibvirtHost::uri(self).to_string()
    }

    fn domain(&self, name: &str) -> Result<Option<DomainFacts>, HypervisorError> {
        use crate::hypervisor::DomainReader;
        let Some(observed) = self.observe_domain(name)? else { return Ok(None) };
        let dom = match self.connection().lookup_domain_by_name(name) {
            Ok(d) => d,
            Err(_) => return Ok(None),
        };
        let call = |op: &'static str| {
            move |source| HypervisorError::Call { op, domain: name.to_string(), source: backend_error(source) }
        };
        let active = observed.state.is_active();
        let xml = if active || !observed.persistent {
            dom.xml_desc(0).map_err(call("dumpxml"))?
        } else {
            dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE).map_err(call("dumpxml --inactive"))?
        };
        let control = if active { control_info(&dom) } else { None };
        let job = if matches!(control, Some(ControlInfo { state: ControlState::Job, .. })) {
            dom.job_info().ok().map(|j| JobInfo {
                kind: match j.r#type as u32 {
                    virt::sys::VIR_DOMAIN_JOB_BOUNDED => "bounded".into(),
                    virt::sys::VIR_DOMAIN_JOB_UNBOUNDED => "unbounded".into(),
                    virt::sys::VIR_DOMAIN_JOB_NONE => "none".into(),
                    other => format!("type {other}"),
                },
                elapsed: Duration::from_millis(j.time_elapsed.unwrap_or(0)),
            })
        } else {
            None
        };
        Ok(Some(DomainFacts { state: observed.state, reason: observed.reason.as_str().to_string(), xml, control, job }))
    }

    fn networks(&self) -> Result<Vec<NetworkFacts>, HypervisorError> {
        let nets = self
            .connection()
            .list_all_networks(0)
            .map_err(|source| HypervisorError::Host { op: "list networks", source: backend_error(source) })?;
        let mut out = Vec::new();
        for n in &nets {
            let Ok(name) = n.name() else { continue };
            let xml = n.xml_desc(0).unwrap_or_default();
            let mut facts = network_facts(&xml);
            facts.name = name;
            facts.active = n.is_active().unwrap_or(false);
            if facts.bridge.is_none() {
                facts.bridge = n.bridge_name().ok();
            }
            out.push(facts);
        }
        Ok(out)
    }

    fn dac_base_label(&self, virt_type: &str) -> Option<String> {
        let caps = self.connection().capabilities().ok()?;
        super::identity::dac_base_label(&caps, virt_type)
    }
}

/// `virDomainGetControlInfo` (virt 0.5 has no wrapper).
fn control_info(dom: &virt::domain::Domain) -> Option<ControlInfo> {
    let mut info = virt::sys::virDomainControlInfo { state: 0, details: 0, stateTime: 0 };
    // SAFETY: dom is a live domain handle; info is a valid out-pointer for the call.
    let rc = unsafe { virt::sys::virDomainGetControlInfo(dom.as_ptr(), &mut info, 0) };
    if rc < 0 {
        return None;
    }
    let state = match info.state {
        virt::sys::VIR_DOMAIN_CONTROL_OK => ControlState::Ok,
        virt::sys::VIR_DOMAIN_CONTROL_JOB => ControlState::Job,
        virt::sys::VIR_DOMAIN_CONTROL_OCCUPIED => ControlState::Occupied,
        _ => ControlState::Error(
            match info.details {
                virt::sys::VIR_DOMAIN_CONTROL_ERROR_REASON_MONITOR => "monitor",
                virt::sys::VIR_DOMAIN_CONTROL_ERROR_REASON_INTERNAL => "internal",
                _ => "unknown",
            }
            .into(),
        ),
    };
    Some(ControlInfo { state, since: Duration::from_millis(info.stateTime) })
}

/// The bridge and forward mode a network definition names.
pub fn network_facts(xml: &str) -> NetworkFacts {
    let mut f = NetworkFacts::default();
    if let Ok(doc) = roxmltree::Document::parse(xml) {
        let root = doc.root_element();
        for n in root.children().filter(|n| n.is_element()) {
            match n.tag_name().name() {
                "bridge" => f.bridge = n.attribute("name").map(str::to_string),
                "forward" => f.forward = Some(n.attribute("mode").unwrap_or("nat").to_string()),
                _ => {}
            }
        }
    }
    f
}

/// Any [`Hypervisor`]: the persistent definition and the state, nothing else (no control
/// info, networks or capabilities). What the engine has when a start fails.
pub struct HypervisorSource<'a>(pub &'a dyn Hypervisor);

impl DiagnoseSource for HypervisorSource<'_> {
    fn uri(&self) -> String {
        String::new()
    }

    fn domain(&self, name: &str) -> Result<Option<DomainFacts>, HypervisorError> {
        let Some(observed) = self.0.observe_domain(name)? else { return Ok(None) };
        let xml = self.0.persistent_xml(name)?;
        Ok(Some(DomainFacts {
            state: observed.state,
            reason: observed.reason.as_str().to_string(),
            xml,
            control: None,
            job: None,
        }))
    }

    fn networks(&self) -> Result<Vec<NetworkFacts>, HypervisorError> {
        Ok(Vec::new())
    }

    fn dac_base_label(&self, _virt_type: &str) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_bridge_and_forward_mode() {
        let f = network_facts(
            "<network><name>default</name><forward mode='nat'/><bridge name='virbr0' stp='on'/></network>",
        );
        assert_eq!((f.bridge.as_deref(), f.forward.as_deref()), (Some("virbr0"), Some("nat")));
        let f = network_facts("<network><name>iso</name><bridge name='virbr9'/></network>");
        assert_eq!(f.forward, None);
    }
}
