//! Boot checks: the first boot devices have media (a CD-ROM with a source, an interface for
//! network boot, a disk for `hd`), firmware loader, NVRAM and direct-boot kernel files exist,
//! and the serial console does not show the firmware giving up.

use std::path::Path;

use virtwarden_policies::BootDevice;

use super::model::{io_text, Check, DomainReport, Finding};
use crate::observe::console::{firmware_boot_failure, read_tail};
use crate::observe::domain_xml::DomainXmlFacts;

/// One step of the boot order and whether it has something to boot from.
struct Step {
    /// `cdrom`, `hd sda`, …
    name: String,
    media: bool,
    /// Why not, when it has none.
    why: String,
}

pub fn check(spec: &DomainXmlFacts, domain: &str, running: bool, out: &mut DomainReport) {
    if spec.os.kernel.is_some() {
        // Direct kernel boot: the firmware's boot order does not matter, the files do.
        for (what, path) in [("kernel", &spec.os.kernel), ("initrd", &spec.os.initrd)] {
            if let Some(p) = path {
                file_exists(what, p, domain, out);
            }
        }
    } else {
        boot_order(spec, domain, out);
    }
    if let Some(loader) = &spec.os.loader {
        file_exists("firmware loader", loader, domain, out);
    }
    if let Some(nvram) = &spec.os.nvram {
        // A missing NVRAM file is created from its template at start; only both missing fails.
        if !Path::new(nvram).exists() {
            if let Some(t) = &spec.os.nvram_template {
                if !Path::new(t).exists() {
                    out.findings.push(Finding::error(
                        Check::Boot,
                        format!("NVRAM {nvram} and its template {t} do not exist"),
                        format!("stat {nvram}: no such file; stat {t}: no such file"),
                        "install the firmware package that provides the template (ovmf), or fix <nvram template=…>",
                    ));
                }
            }
        }
    }
    for log in spec.console_logs() {
        console(log, running, out);
    }
}

fn file_exists(what: &str, path: &str, domain: &str, out: &mut DomainReport) {
    if let Err(e) = std::fs::metadata(path) {
        out.findings.push(Finding::error(
            Check::Boot,
            format!("{what} {path} does not exist"),
            format!("stat {path}: {}", io_text(&e)),
            format!("install it or point the domain at the right file (virsh edit {domain})"),
        ));
    }
}

/// The boot order as steps: per-device `<boot order>` when any device has one, else `<os><boot>`
/// (libvirt's default is `hd`).
fn steps(spec: &DomainXmlFacts) -> Vec<Step> {
    let mut per_device: Vec<(u32, Step)> = Vec::new();
    for d in &spec.disks {
        if let Some(o) = d.boot_order {
            let media = d.source.is_some();
            let why =
                if media { String::new() } else { format!("{} {} has no source (no medium)", d.device, d.label()) };
            per_device.push((o, Step { name: format!("{} {}", d.device, d.label()), media, why }));
        }
    }
    for i in &spec.interfaces {
        if let Some(o) = i.boot_order {
            let name = format!("network {}", i.mac.as_deref().or(i.source()).unwrap_or("interface"));
            per_device.push((o, Step { name, media: true, why: String::new() }));
        }
    }
    if !per_device.is_empty() {
        per_device.sort_by_key(|(o, _)| *o);
        return per_device.into_iter().map(|(_, s)| s).collect();
    }
    let order = if spec.os_boot.is_empty() { vec![BootDevice::Hd] } else { spec.os_boot.clone() };
    order.iter().map(|dev| class_step(spec, *dev)).collect()
}

fn class_step(spec: &DomainXmlFacts, dev: BootDevice) -> Step {
    let (devices, kind): (&[&str], &str) = match dev {
        BootDevice::Hd => (&["disk", "lun"], "disk"),
        BootDevice::Cdrom => (&["cdrom"], "CD-ROM"),
        BootDevice::Fd => (&["floppy"], "floppy"),
        BootDevice::Network => {
            let media = !spec.interfaces.is_empty();
            return Step {
                name: "network".into(),
                media,
                why: if media { String::new() } else { "network boot without an <interface>".into() },
            };
        }
    };
    let of_kind: Vec<_> = spec.disks.iter().filter(|d| devices.contains(&d.device.as_str())).collect();
    let media = of_kind.iter().any(|d| d.source.is_some());
    let why = match of_kind.as_slice() {
        [] => format!("<boot dev='{}'/> but the domain has no {kind}", dev.as_str()),
        [one] => format!("the {kind} {} has no source (no medium)", one.label()),
        many => format!("none of the {} {kind}s has a source", many.len()),
    };
    Step { name: dev.as_str().to_string(), media, why: if media { String::new() } else { why } }
}

fn boot_order(spec: &DomainXmlFacts, domain: &str, out: &mut DomainReport) {
    let steps = steps(spec);
    let order: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    let order = format!("boot order [{}]", order.join(", "));
    let first_bootable = steps.iter().position(|s| s.media);
    let empty: Vec<&Step> = steps.iter().take(first_bootable.unwrap_or(steps.len())).collect();
    let Some(first_empty) = empty.first() else { return };
    let evidence = format!("{order}; {}", empty.iter().map(|s| s.why.as_str()).collect::<Vec<_>>().join("; "));
    let fix = format!(
        "insert the medium, or put the device to boot from first (virsh edit {domain}, or `boot:` in the policy)"
    );
    out.findings.push(match first_bootable {
        None => Finding::error(Check::Boot, "nothing to boot from", evidence, fix),
        Some(i) => Finding::warning(
            Check::Boot,
            format!(
                "boots from {} first, which is empty; the firmware moves on to {}",
                first_empty.name, steps[i].name
            ),
            evidence,
            fix,
        ),
    });
}

fn console(path: &str, running: bool, out: &mut DomainReport) {
    let p = Path::new(path).to_path_buf();
    let read = crate::observe::guarded::with_deadline(crate::observe::guarded::READ_DEADLINE, move || read_tail(&p));
    let Some(read) = read else {
        out.findings.push(Finding::warning(
            Check::Boot,
            format!("console {path}: reading it did not finish in time"),
            "a read of the console log hangs (hung storage?)",
            "check the storage the log is on",
        ));
        return;
    };
    let text = match read {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        // A FIFO, socket or device (never opened): say so, it is not where output is kept.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            out.findings.push(Finding::warning(
                Check::Boot,
                format!("console {path} is not a regular file"),
                e.to_string(),
                "log the serial console to a file (<serial type='file'><source path='/var/log/libvirt/NAME.console'/>)",
            ));
            return;
        }
        Err(e) => {
            out.skipped.push(format!("console {path}: {e}"));
            return;
        }
    };
    // A device SeaBIOS gave up on before trying the next is not a failure: the shared scan
    // looks only after the last "Booting from".
    if let Some(f) = firmware_boot_failure(&text) {
        let when = if running { "the guest's firmware" } else { "at its last boot the firmware" };
        out.findings.push(Finding::error(
            Check::Boot,
            format!("{when} found nothing to boot ({})", f.summary),
            format!("{path}: {}", crate::guest_text::console_excerpt(&f.line)),
            "give the boot disk a bootable image in the declared format (see the disk findings) and fix the boot order",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::model::Severity;
    use crate::observe::domain_xml::parse_domain_xml as parse;

    fn run(xml: &str, running: bool) -> DomainReport {
        let spec = parse(xml).unwrap();
        let mut out = DomainReport::new("vm1", None, "shut off".into());
        check(&spec, "vm1", running, &mut out);
        out
    }

    #[test]
    fn empty_cdrom_first_then_a_disk_is_a_warning_and_nothing_bootable_an_error() {
        let r = run(
            "<domain><os><boot dev='cdrom'/><boot dev='hd'/></os><devices>\
             <disk device='cdrom'><target dev='sda'/></disk>\
             <disk device='disk'><source file='/x.img'/><target dev='vda'/></disk></devices></domain>",
            false,
        );
        assert_eq!(r.findings.len(), 1);
        let f = &r.findings[0];
        assert_eq!(f.severity, Severity::Warning);
        assert_eq!(f.what, "boots from cdrom first, which is empty; the firmware moves on to hd");
        assert_eq!(f.evidence, "boot order [cdrom, hd]; the CD-ROM sda has no source (no medium)");

        let r = run(
            "<domain><os><boot dev='cdrom'/><boot dev='network'/><boot dev='hd'/></os><devices>\
             <disk device='cdrom'><target dev='sda'/></disk></devices></domain>",
            false,
        );
        assert_eq!(r.findings[0].severity, Severity::Error);
        assert_eq!(r.findings[0].what, "nothing to boot from");
        assert_eq!(
            r.findings[0].evidence,
            "boot order [cdrom, network, hd]; the CD-ROM sda has no source (no medium); \
             network boot without an <interface>; <boot dev='hd'/> but the domain has no disk"
        );
    }

    #[test]
    fn per_device_order_uses_the_lowest_order_first() {
        let r = run(
            "<domain><os/><devices>\
             <disk device='disk'><source file='/x.img'/><target dev='vda'/><boot order='2'/></disk>\
             <disk device='cdrom'><target dev='sdb'/><boot order='1'/></disk></devices></domain>",
            false,
        );
        assert_eq!(r.findings[0].what, "boots from cdrom sdb first, which is empty; the firmware moves on to disk vda");
        assert!(run(
            "<domain><os/><devices><interface type='bridge'><boot order='1'/></interface></devices></domain>",
            false
        )
        .findings
        .is_empty());
    }

    #[test]
    fn direct_kernel_boot_and_firmware_files_must_exist() {
        let r = run(
            "<domain><os><kernel>/nonexistent/vmlinuz</kernel>\
             <loader type='pflash'>/nonexistent/OVMF_CODE.fd</loader>\
             <nvram template='/nonexistent/OVMF_VARS.fd'>/nonexistent/vm1_VARS.fd</nvram></os></domain>",
            false,
        );
        let whats: Vec<&str> = r.findings.iter().map(|f| f.what.as_str()).collect();
        assert_eq!(
            whats,
            vec![
                "kernel /nonexistent/vmlinuz does not exist",
                "firmware loader /nonexistent/OVMF_CODE.fd does not exist",
                "NVRAM /nonexistent/vm1_VARS.fd and its template /nonexistent/OVMF_VARS.fd do not exist",
            ]
        );
    }

    #[test]
    fn serial_console_showing_a_firmware_boot_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vm1.console");
        std::fs::write(&log, "SeaBIOS (version 1.16.2)\r\nBooting from Hard Disk...\r\nBoot failed: not a bootable disk\r\n\r\nNo bootable device.\r\n").unwrap();
        let xml = format!(
            "<domain><os><boot dev='hd'/></os><devices><disk device='disk'><source file='/x'/></disk>\
             <serial type='file'><source path='{}'/></serial></devices></domain>",
            log.display()
        );
        let r = run(&xml, true);
        assert_eq!(r.findings.len(), 1, "{r:#?}");
        assert_eq!(r.findings[0].what, "the guest's firmware found nothing to boot (SeaBIOS: No bootable device)");
        assert_eq!(r.findings[0].evidence, format!("{}: guest console: \"No bootable device.\"", log.display()));
        std::fs::write(&log, "SeaBIOS\r\nBooting from Hard Disk...\r\n").unwrap();
        assert!(run(&xml, true).findings.is_empty());
        // The CD-ROM failed, then the disk booted: not a failure.
        std::fs::write(&log, "Booting from DVD/CD...\r\nBoot failed: Could not read from CDROM (code 0003)\r\nBooting from Hard Disk...\r\n").unwrap();
        assert!(run(&xml, true).findings.is_empty());
    }
}
