//! Diagnose reads a domain definition only through the one reader, [`crate::observe::domain_xml`].
//! The test here feeds one document to every consumer of that reader (observe's model, guest
//! health's devices, diagnose's checks) and holds them to one answer.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use crate::diagnose::disks::{self, DiskEnv};
    use crate::diagnose::identity::{Accounts, QemuUser};
    use crate::diagnose::{boot, DomainReport};
    use crate::observe::domain_xml::parse_domain_xml;
    use crate::observe::guest_devices::parse_guest_devices;
    use crate::observe::{paths, Disk, Interface, ObservedHost};

    fn diagnose_disks_and_boot(xml: &str) -> DomainReport {
        let spec = parse_domain_xml(xml).unwrap();
        let who = QemuUser {
            uid: 0,
            gid: 0,
            groups: vec![0],
            user_name: "root".into(),
            group_name: "root".into(),
            dynamic_ownership: true,
            source: "test".into(),
        };
        let env = DiskEnv {
            domain: "vm1".into(),
            who,
            accounts: Accounts::parse("root:x:0:0::/:/bin/sh\n", "root:x:0:\n"),
            is_nfs: Arc::new(|_: &Path| false),
            check_access: true,
            deadline: Duration::from_secs(60),
        };
        let mut out = DomainReport::new("vm1", None, "shut off".into());
        disks::check(&spec, &env, &mut out);
        boot::check(&spec, "vm1", false, &mut out);
        out
    }

    #[test]
    fn observe_guest_health_and_diagnose_agree_on_one_definition() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.img");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let gone = dir.path().join("gone");
        let console = dir.path().join("vm1.console");
        let xml = format!(
            "<domain type='kvm'><name>vm1</name><os><type>hvm</type><boot dev='cdrom'/><boot dev='hd'/></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda'/></disk>\
             <disk type='dir' device='disk'><source dir='{}'/><target dev='vdb'/></disk>\
             <disk type='block' device='disk'><source dev='{}'/><target dev='vdc'/></disk>\
             <disk type='network' device='disk'><source protocol='nbd' name='export'><host name='nbd.example'/></source>\
               <target dev='vdd'/></disk>\
             <disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>\
             <interface type='bridge'><mac address='52:54:00:AA:00:01'/><source bridge='br0'/><target dev='vnet0'/></interface>\
             <serial type='file'><source path='{}'/></serial>\
             </devices></domain>",
            image.display(),
            share.display(),
            gone.display(),
            console.display()
        );
        let parsed = parse_domain_xml(&xml).unwrap();

        // Observe: every source form is a source; the empty CD-ROM has none.
        let observed: Vec<Disk> = parsed.disks.iter().map(Disk::from).collect();
        let sources: Vec<Option<&str>> = observed.iter().map(|d| d.source.as_deref()).collect();
        let (image_s, share_s, gone_s) =
            (image.display().to_string(), share.display().to_string(), gone.display().to_string());
        assert_eq!(sources, [Some(image_s.as_str()), Some(&share_s), Some(&gone_s), Some("export"), None]);

        // Diagnose: what has a host path is checked there, and found exactly when the path
        // check finds it; the directory-backed disk is a directory by design, not a mistake.
        let report = diagnose_disks_and_boot(&xml);
        let about = |label: &str| -> Vec<String> {
            report
                .findings
                .iter()
                .filter(|f| f.what.starts_with(&format!("disk {label} ")))
                .map(|f| f.what.clone())
                .collect()
        };
        for (disk, obs) in parsed.disks.iter().zip(&observed) {
            let label = disk.label();
            match disk.source.as_ref().and_then(|s| s.host_path()) {
                Some(path) if paths::exists(path) => assert_eq!(about(&label), Vec::<String>::new(), "{label}"),
                Some(path) => assert_eq!(about(&label), [format!("disk {label} {path} does not exist")]),
                None if obs.source.is_some() => {
                    assert!(report.skipped.contains(&format!("disk {label}: network source not checked")), "{label}")
                }
                // No medium: fine for a CD-ROM (the boot check says so when it is first).
                None => assert_eq!(about(&label), Vec::<String>::new(), "{label}"),
            }
        }
        let boot = report.findings.iter().find(|f| f.what.starts_with("boots from cdrom first")).expect("boot finding");
        assert_eq!(boot.evidence, "boot order [cdrom, hd]; the CD-ROM sda has no source (no medium)");

        // Guest health: the same NIC (MAC lowercased), tap and bridge, and the console file
        // diagnose reads.
        let devices = parse_guest_devices(&xml).unwrap();
        let iface = Interface::from(&parsed.interfaces[0]);
        let host = ObservedHost::default();
        assert_eq!(devices.macs, [iface.mac.as_deref().unwrap().to_ascii_lowercase()]);
        assert_eq!(devices.nics[0].tap, iface.target);
        assert_eq!(devices.nics[0].bridge, host.bridge_of(&iface));
        assert_eq!(devices.console_log, parsed.console_logs().first().map(PathBuf::from));
        assert_eq!(devices.console_log, Some(console));
    }
}
