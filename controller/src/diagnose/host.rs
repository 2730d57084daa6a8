//! Host checks: enough free memory to start the domain (MemAvailable in /proc/meminfo), and
//! /dev/kvm usable by QEMU's user for a `kvm` domain.

use std::path::Path;

use super::access::{FileFacts, READ, WRITE};
use super::identity::{Accounts, QemuUser};
use super::model::{io_text, Check, DomainReport, Finding};
use crate::observe::domain_xml::DomainXmlFacts;

/// `MemAvailable` in KiB from /proc/meminfo's text.
pub fn mem_available_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Memory: only for a domain that would start (a running one has its memory already).
pub fn check_memory(spec: &DomainXmlFacts, domain: &str, running: bool, meminfo: &Path, out: &mut DomainReport) {
    if running || spec.memory_kib == 0 {
        return;
    }
    let Some(avail) = std::fs::read_to_string(meminfo).ok().as_deref().and_then(mem_available_kib) else {
        out.skipped.push(format!("host memory: cannot read MemAvailable from {}", meminfo.display()));
        return;
    };
    if avail < spec.memory_kib {
        out.findings.push(Finding::error(
            Check::Host,
            format!("not enough free memory to start {domain}"),
            format!(
                "{}: MemAvailable {} MiB; the domain needs {} MiB",
                meminfo.display(),
                avail / 1024,
                spec.memory_kib / 1024
            ),
            format!("free memory on the host (stop other guests), or lower <currentMemory> of {domain}"),
        ));
    }
}

/// /dev/kvm: exists, is a character device, and QEMU's user can open it read-write.
pub fn check_kvm(spec: &DomainXmlFacts, kvm: &Path, who: &QemuUser, accounts: &Accounts, out: &mut DomainReport) {
    if spec.domain_type != "kvm" {
        return;
    }
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(kvm) {
        Err(e) => out.findings.push(Finding::error(
            Check::Host,
            format!("{} is missing: a kvm domain cannot start", kvm.display()),
            format!("stat {}: {}", kvm.display(), io_text(&e)),
            "enable virtualisation in the firmware and load kvm_intel or kvm_amd, or use <domain type='qemu'> (slow)",
        )),
        Ok(m) if !m.file_type().is_char_device() && kvm.starts_with("/dev") => out.findings.push(Finding::error(
            Check::Host,
            format!("{} is not a character device", kvm.display()),
            format!("{} has file type {:?}", kvm.display(), m.file_type()),
            "recreate it: mknod /dev/kvm c 10 232 (udev does this when kvm loads)",
        )),
        Ok(_) => {
            let Ok(facts) = FileFacts::read(kvm) else { return };
            if !facts.allows(who.uid, &who.groups, READ | WRITE) {
                out.findings.push(Finding::error(
                    Check::Host,
                    format!("{} is not usable by {}: a kvm domain cannot start", kvm.display(), who.display()),
                    facts.describe(accounts),
                    format!(
                        "chgrp kvm {0}; chmod 0660 {0} (udev rule), and make {1} a member of kvm",
                        kvm.display(),
                        who.user_name
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn memory_below_the_domain_is_an_error_only_for_a_start() {
        let dir = tempfile::tempdir().unwrap();
        let mi = dir.path().join("meminfo");
        std::fs::write(&mi, "MemTotal:  1000000 kB\nMemFree:  50000 kB\nMemAvailable:   102400 kB\n").unwrap();
        assert_eq!(mem_available_kib(&std::fs::read_to_string(&mi).unwrap()), Some(102400));
        let spec = DomainXmlFacts { memory_kib: 2 * 1024 * 1024, ..Default::default() };
        let mut out = DomainReport::new("big", None, String::new());
        check_memory(&spec, "big", false, &mi, &mut out);
        assert_eq!(
            out.findings[0].evidence,
            format!("{}: MemAvailable 100 MiB; the domain needs 2048 MiB", mi.display())
        );
        let mut out = DomainReport::new("big", None, String::new());
        check_memory(&spec, "big", true, &mi, &mut out);
        assert!(out.findings.is_empty());
    }

    #[test]
    fn kvm_device_not_usable_by_the_qemu_user() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in with /dev/kvm's usual wrong mode: the access rules are the same.
        let kvm = dir.path().join("kvm");
        std::fs::write(&kvm, b"").unwrap();
        std::fs::set_permissions(&kvm, std::fs::Permissions::from_mode(0o600)).unwrap();
        let spec = DomainXmlFacts { domain_type: "kvm".into(), ..Default::default() };
        let who = QemuUser {
            uid: 64055,
            gid: 994,
            groups: vec![994],
            user_name: "libvirt-qemu".into(),
            group_name: "kvm".into(),
            dynamic_ownership: true,
            source: "test".into(),
        };
        let accounts = Accounts::parse("root:x:0:0::/:/bin/sh\n", "root:x:0:\nkvm:x:994:\n");
        let mut out = DomainReport::new("k", None, String::new());
        check_kvm(&spec, &kvm, &who, &accounts, &mut out);
        assert_eq!(out.findings[0].evidence, format!("{} is 0600 root:root", kvm.display()));
        std::os::unix::fs::chown(&kvm, None, Some(994)).unwrap();
        std::fs::set_permissions(&kvm, std::fs::Permissions::from_mode(0o660)).unwrap();
        let mut out = DomainReport::new("k", None, String::new());
        check_kvm(&spec, &kvm, &who, &accounts, &mut out);
        assert!(out.findings.is_empty(), "{out:#?}");
        let mut out = DomainReport::new("k", None, String::new());
        check_kvm(&spec, &dir.path().join("nokvm"), &who, &accounts, &mut out);
        assert!(out.findings[0].what.ends_with("is missing: a kvm domain cannot start"));
    }
}
