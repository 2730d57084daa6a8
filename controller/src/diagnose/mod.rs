//! `virtwarden diagnose`: why a domain cannot boot or be reached — disks, boot, libvirt,
//! network, host — each finding with its evidence and the fix. Read only: nothing here changes
//! the host. Also explains a failed start in one line for the engine and `apply`.

pub mod access;
pub mod boot;
pub mod disks;
pub mod firewall;
pub mod host;
pub mod identity;
pub mod image;
pub mod libvirt;
pub mod model;
pub mod netfacts;
pub mod network;
pub mod source;
pub mod xml;

use std::path::PathBuf;

pub use model::{render_text, Check, DomainReport, Finding, Report, Severity};
pub use source::{DiagnoseSource, HypervisorSource};

use crate::hypervisor::{Hypervisor, HypervisorError};
use identity::{Accounts, QemuConf};
use netfacts::NetFacts;

/// A diagnosis that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiagnoseError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("domain {domain}: {source}")]
    Xml { domain: String, source: crate::observe::domain_xml::XmlError },
    #[error("cannot read {}: {source}", path.display())]
    QemuConf { path: PathBuf, source: std::io::Error },
}

/// The host files diagnose reads; the defaults are the real ones.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub qemu_conf: PathBuf,
    pub passwd: PathBuf,
    pub group: PathBuf,
    pub meminfo: PathBuf,
    pub dev_kvm: PathBuf,
    /// `/proc/sys`, or `$VIRTWARDEN_PROC_SYS` (containers).
    pub proc_sys: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            qemu_conf: "/etc/libvirt/qemu.conf".into(),
            passwd: "/etc/passwd".into(),
            group: "/etc/group".into(),
            meminfo: "/proc/meminfo".into(),
            dev_kvm: "/dev/kvm".into(),
            proc_sys: crate::hostnet::sysctl::proc_sys(),
        }
    }
}

/// How to diagnose.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Check the host network (off for libvirt's test driver, whose domains have no taps).
    pub network: bool,
    pub paths: HostPaths,
    /// Where the QEMU logs are (`None`: not a QEMU connection).
    pub qemu_log_dir: Option<PathBuf>,
}

impl Options {
    /// The usual options for a connect URI.
    pub fn for_uri(uri: &str, network: bool) -> Options {
        Options { network, paths: HostPaths::default(), qemu_log_dir: libvirt::qemu_log_dir(uri) }
    }
}

/// One domain to diagnose and the policy that manages it (`None`: read only, it was named).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub domain: String,
    pub policy: Option<String>,
}

/// Diagnose every target. Host facts (qemu.conf, accounts, network) are read once.
pub fn diagnose(source: &dyn DiagnoseSource, targets: &[Target], opts: &Options) -> Result<Report, DiagnoseError> {
    let conf = identity::read_qemu_conf(&opts.paths.qemu_conf)
        .map_err(|source| DiagnoseError::QemuConf { path: opts.paths.qemu_conf.clone(), source })?;
    let accounts = Accounts::read(&opts.paths.passwd, &opts.paths.group);
    let (net, networks) = if opts.network {
        (Some(NetFacts::read(&opts.paths.proc_sys)), source.networks()?)
    } else {
        (None, Vec::new())
    };
    let ctx = Ctx { source, opts, conf, accounts, net, networks };
    let mut report = Report::default();
    for t in targets {
        report.domains.push(ctx.one(t)?);
    }
    Ok(report)
}

struct Ctx<'a> {
    source: &'a dyn DiagnoseSource,
    opts: &'a Options,
    conf: QemuConf,
    accounts: Accounts,
    net: Option<NetFacts>,
    networks: Vec<source::NetworkFacts>,
}

impl Ctx<'_> {
    fn one(&self, target: &Target) -> Result<DomainReport, DiagnoseError> {
        let name = target.domain.as_str();
        let Some(facts) = self.source.domain(name)? else {
            let mut r = DomainReport::new(name, target.policy.clone(), "not defined".into());
            r.findings.push(Finding::error(
                Check::Libvirt,
                format!("domain {name} is not defined"),
                format!("libvirt has no domain named {name}"),
                "define it (virsh define FILE), or remove it from the policy",
            ));
            return Ok(r);
        };
        let mut r =
            DomainReport::new(name, target.policy.clone(), format!("{} ({})", facts.state.as_str(), facts.reason));
        let spec = crate::observe::domain_xml::parse_domain_xml(&facts.xml)
            .map_err(|source| DiagnoseError::Xml { domain: name.to_string(), source })?;
        let running = facts.state.is_active();
        let base_label = self.source.dac_base_label(&spec.domain_type);
        let who = identity::qemu_user(&spec, base_label.as_deref(), &self.conf, &self.accounts);
        let known_user = who.uid != u32::MAX && who.gid != u32::MAX;
        if !known_user {
            r.skipped.push(format!(
                "access checks: QEMU's user {} is not in {}",
                who.display(),
                self.opts.paths.passwd.display()
            ));
        }
        let env = disks::DiskEnv {
            domain: name.to_string(),
            who: who.clone(),
            accounts: self.accounts.clone(),
            is_nfs: std::sync::Arc::new(access::is_nfs),
            check_access: known_user,
            deadline: crate::observe::guarded::READ_DEADLINE,
        };
        disks::check(&spec, &env, &mut r);
        boot::check(&spec, name, running, &mut r);
        libvirt::check(name, &facts, self.opts.qemu_log_dir.as_deref(), &mut r);
        if let Some(net) = &self.net {
            if !spec.interfaces.is_empty() {
                r.skipped.extend(net.unavailable.iter().cloned());
            }
            network::check(&spec, name, running, net, &self.networks, &mut r);
        }
        host::check_memory(&spec, name, running, &self.opts.paths.meminfo, &mut r);
        if known_user {
            host::check_kvm(&spec, &self.opts.paths.dev_kvm, &who, &self.accounts, &mut r);
        }
        r.sort();
        Ok(r)
    }
}

/// The finding that best explains a failed start: one naming something the libvirt error
/// quotes (a path, a bridge), else the first error other than "the last start failed" (which
/// only repeats it), else the first finding.
pub fn explain<'r>(report: &'r DomainReport, libvirt_error: Option<&str>) -> Option<&'r Finding> {
    let quoted = libvirt_error.map(quoted_words).unwrap_or_default();
    let restates = |f: &Finding| f.check == Check::Libvirt && f.what == "the last start failed";
    report
        .findings
        .iter()
        .find(|f| !restates(f) && quoted.iter().any(|q| f.what.contains(q.as_str())))
        .or_else(|| report.findings.iter().find(|f| f.severity == Severity::Error && !restates(f)))
        .or_else(|| report.findings.first())
}

/// Words of a libvirt/QEMU error worth matching: quoted ones and absolute paths.
fn quoted_words(error: &str) -> Vec<String> {
    let mut words: Vec<String> =
        error.split(['\'', '"']).skip(1).step_by(2).filter(|w| w.len() > 1).map(str::to_string).collect();
    words.extend(
        error
            .split(|c: char| c.is_whitespace() || c == ',' || c == ':')
            .filter(|w| w.starts_with('/') && w.len() > 1)
            .map(|w| w.trim_end_matches(['\'', '"', ')', '.']).to_string()),
    );
    words
}

/// For the engine: why starting (or repairing) `name` failed, in one line, or `None` when
/// nothing was found. Reads the persistent definition and the host; changes nothing.
/// `network`: whether the host network is real (false for libvirt's test driver).
pub fn explain_start_failure(
    hv: &dyn Hypervisor,
    name: &str,
    libvirt_error: Option<&str>,
    network: bool,
) -> Option<String> {
    let source = HypervisorSource(hv);
    let opts = Options::for_uri("", network);
    let target = Target { domain: name.to_string(), policy: None };
    match diagnose(&source, &[target], &opts) {
        Ok(report) => report.domains.first().and_then(|d| explain(d, libvirt_error)).map(Finding::line),
        Err(e) => {
            tracing::debug!(domain = name, %e, "diagnosis of a failed start not possible");
            None
        }
    }
}

/// [`explain_start_failure`] as the engine's [`Explain`](crate::engine::Explain) backend.
pub struct StartFailureExplainer {
    /// Whether the host network is real (false for libvirt's test driver).
    pub network: bool,
}

impl crate::engine::Explain for StartFailureExplainer {
    fn explain(&self, hv: &dyn Hypervisor, domain: &str, error: &str) -> Option<String> {
        explain_start_failure(hv, domain, Some(error), self.network)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(findings: Vec<Finding>) -> DomainReport {
        DomainReport { findings, ..DomainReport::new("vm1", None, String::new()) }
    }

    #[test]
    fn explanation_prefers_what_the_error_names() {
        let r = report(vec![
            Finding::error(Check::Disk, "disk vda /srv/a.qcow2 does not exist", "e", "f"),
            Finding::error(Check::Libvirt, "the last start failed", "e", "f"),
            Finding::error(Check::Network, "bridge br0 does not exist", "e", "f"),
        ]);
        let e = "Cannot get interface MTU on 'br0': No such device";
        assert_eq!(explain(&r, Some(e)).unwrap().what, "bridge br0 does not exist");
        let e = "qemu-system-x86_64: -blockdev {\"driver\":\"file\",\"filename\":\"/srv/a.qcow2\"}: Could not open '/srv/a.qcow2': No such file";
        assert_eq!(explain(&r, Some(e)).unwrap().what, "disk vda /srv/a.qcow2 does not exist");
        assert_eq!(explain(&r, None).unwrap().what, "disk vda /srv/a.qcow2 does not exist");
        let only = report(vec![Finding::error(Check::Libvirt, "the last start failed", "e", "f")]);
        assert_eq!(explain(&only, None).unwrap().what, "the last start failed");
        assert!(explain(&report(vec![]), None).is_none());
    }
}
