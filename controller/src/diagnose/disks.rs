//! Disk checks: the source exists and is not empty, its header matches `<driver type>`, every
//! file of a qcow2 backing chain exists, and QEMU's user can open it (directories, mode, ACL,
//! with a hint for NFS root-squash). Reads metadata and the first bytes only, through
//! [`crate::observe::guarded`]: a FIFO, socket or character device is reported, never opened;
//! each disk's checks run against a deadline, so hung storage costs only that disk's findings.
//! A header is evidence of what the image holds, never of what libvirt should be told: the
//! guest writes a raw disk's first bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::observe::guarded::{self, GuardedError};

use super::access::{can_open, FileFacts, READ, WRITE};
use super::identity::{Accounts, QemuUser};
use super::image::{detect, qcow2_backing, read_head, Format, HEAD_BYTES};
use super::model::{io_text, Check, DomainReport, Finding};
use crate::observe::domain_xml::{DiskXml, DomainXmlFacts};

/// A qcow2 chain deeper than this is reported as-is rather than followed.
const MAX_CHAIN: usize = 16;

/// What the disk checks need besides the definition (owned: each disk is checked on a thread
/// of its own).
#[derive(Clone)]
pub struct DiskEnv {
    pub domain: String,
    pub who: QemuUser,
    pub accounts: Accounts,
    /// Whether a path is on NFS (statfs; tests substitute it).
    pub is_nfs: Arc<dyn Fn(&Path) -> bool + Send + Sync>,
    /// False when QEMU's user is unknown (not in passwd): access is then not evaluated.
    pub check_access: bool,
    /// How long one disk's checks may take.
    pub deadline: Duration,
}

pub fn check(spec: &DomainXmlFacts, env: &DiskEnv, out: &mut DomainReport) {
    for disk in &spec.disks {
        match disk.kind.as_str() {
            "network" | "volume" | "nvme" | "vhostuser" => {
                out.skipped.push(format!("disk {}: {} source not checked", disk.label(), disk.kind));
                continue;
            }
            _ => {}
        }
        let Some(source) = &disk.source else {
            if matches!(disk.device.as_str(), "disk" | "lun") {
                out.findings.push(Finding::error(
                    Check::Disk,
                    format!("disk {} has no source", disk.label()),
                    "<disk device='disk'> without <source>",
                    format!("add the image as <source file=…/> (virsh edit {})", env.domain),
                ));
            }
            continue;
        };
        let source = source.as_str();
        let (d, path, e) = (disk.clone(), PathBuf::from(source), env.clone());
        let name = out.domain.clone();
        let checked = guarded::with_deadline(env.deadline, move || {
            let mut r = DomainReport::new(&name, None, String::new());
            check_image(&d, &path, &e, &mut r);
            r
        });
        match checked {
            Some(r) => {
                out.findings.extend(r.findings);
                out.skipped.extend(r.skipped);
            }
            None => out.findings.push(Finding::warning(
                Check::Disk,
                format!("disk {}: checks of {source} did not finish within {}", disk.label(), secs(env.deadline)),
                "a stat, open or read of the image or a directory above it hangs (hung NFS or FUSE mount?)",
                "check the storage the image is on (mount, NFS server); the other checks went on without it",
            )),
        }
    }
}

fn secs(d: Duration) -> String {
    virtwarden_policies::Duration(d).to_string()
}

fn check_image(disk: &DiskXml, path: &Path, env: &DiskEnv, out: &mut DomainReport) {
    let label = disk.label();
    if !exists(
        path,
        &format!("disk {label} {}", path.display()),
        &format!("restore the image, or point the disk at it (virsh edit {})", env.domain),
        out,
    ) {
        return;
    }
    let Ok(meta) = std::fs::metadata(path) else { return };
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_fifo() || t.is_socket() || t.is_char_device() {
        out.findings.push(Finding::error(
            Check::Disk,
            format!("disk {label} {} is not a regular file", path.display()),
            format!("it is {} (not opened)", guarded::kind_words(&meta)),
            format!("point the disk at an image file or a block device (virsh edit {})", env.domain),
        ));
        return;
    }
    if disk.kind == "block" && !meta.file_type().is_block_device() {
        out.findings.push(Finding::error(
            Check::Disk,
            format!("disk {label} {} is not a block device", path.display()),
            "<disk type='block'> needs a block device",
            format!("use <disk type='file'> for an image file (virsh edit {})", env.domain),
        ));
        return;
    }
    if meta.is_dir() && disk.kind != "dir" {
        out.findings.push(Finding::error(
            Check::Disk,
            format!("disk {label} {} is a directory", path.display()),
            "a disk source must be a file or a block device",
            format!("point the disk at the image file (virsh edit {})", env.domain),
        ));
        return;
    }
    if disk.kind == "dir" {
        return;
    }
    let opened = match guarded::open(path, true) {
        Ok(f) => f,
        Err(e @ (GuardedError::NotRegular { .. } | GuardedError::Changed { .. })) => {
            out.findings.push(Finding::error(
                Check::Disk,
                format!("disk {label} {} is not a regular file", path.display()),
                e.to_string(),
                format!("point the disk at an image file or a block device (virsh edit {})", env.domain),
            ));
            return;
        }
        Err(e) => {
            out.skipped.push(format!("disk {label}: cannot read {e}"));
            return;
        }
    };
    match opened.size() {
        Ok(0) => {
            out.findings.push(Finding::error(
                Check::Disk,
                format!("disk {label} {} is empty", path.display()),
                "size 0 bytes",
                "restore the image from a backup, or recreate it (qemu-img create)",
            ));
            return;
        }
        Ok(_) => {}
        Err(e) => {
            out.skipped.push(format!("disk {label}: cannot read {}: {e}", path.display()));
            return;
        }
    }
    let declared = disk.driver_type.clone().unwrap_or_else(|| "raw".into());
    let head = match opened.read_at(0, HEAD_BYTES) {
        Ok(h) => h,
        Err(e) => {
            out.skipped.push(format!("disk {label}: cannot read {}: {e}", path.display()));
            return;
        }
    };
    drop(opened);
    let (found, words) = detect(&head);
    if found.as_str() != declared {
        out.findings.push(format_mismatch(disk, path, &declared, found, words, &env.domain));
    }
    let want = if disk.is_readonly() { READ } else { READ | WRITE };
    access(path, &format!("disk {label} {}", path.display()), want, !disk.no_relabel, env, out);
    // Only a chain QEMU reads as qcow2 is followed: declared raw, the header is guest data.
    if found == Format::Qcow2 && declared == "qcow2" {
        backing_chain(path, env, out);
    }
}

/// True when `path` exists; otherwise a finding naming the nearest directory that does.
fn exists(path: &Path, what: &str, fix: &str, out: &mut DomainReport) -> bool {
    match std::fs::metadata(path) {
        Ok(_) => true,
        Err(e) => {
            let nearest = path.ancestors().skip(1).find(|a| a.exists()).map(|a| a.display().to_string());
            let evidence = match nearest {
                Some(a) if a != "/" || path.parent() == Some(Path::new("/")) => {
                    format!("stat {}: {}; {a} exists", path.display(), io_text(&e))
                }
                _ => format!("stat {}: {}", path.display(), io_text(&e)),
            };
            let not = if e.kind() == std::io::ErrorKind::NotFound { "does not exist" } else { "cannot be read" };
            out.findings.push(Finding::error(Check::Disk, format!("{what} {not}"), evidence, fix));
            false
        }
    }
}

fn format_mismatch(disk: &DiskXml, path: &Path, declared: &str, found: Format, words: &str, domain: &str) -> Finding {
    // No bytes of the image are shown: only which signature matched.
    let evidence = format!("header: {words}; <driver type='{declared}'>");
    if declared == "raw" {
        // A raw disk's first bytes are whatever the guest wrote there. Reading it as another
        // format would let the guest name a backing file on the host (why libvirt never probes
        // formats): not a fix to offer on this evidence.
        let what = format!(
            "disk {} {} is declared raw and starts with a {} header",
            disk.label(),
            path.display(),
            found.as_str()
        );
        let note = format!(
            "the guest wrote a header that looks like {}; libvirt never probes formats, do not change the driver type on this evidence",
            found.as_str()
        );
        return Finding::warning(Check::Disk, what, evidence, note);
    }
    let what = format!("disk {} {} is {} but declared {declared}", disk.label(), path.display(), found.as_str());
    let fix = {
        format!(
            "set <driver name='qemu' type='{}'/> (virsh edit {domain}), or convert the image: qemu-img convert -f {} -O {declared} …",
            found.as_str(),
            found.as_str()
        )
    };
    Finding::error(Check::Disk, what, evidence, fix)
}

/// QEMU's user can open `path` for `want`; with dynamic ownership (and `relabel`) libvirt
/// chowns the file at start, so only the directories on the way count.
fn access(path: &Path, what: &str, want: u32, relabel: bool, env: &DiskEnv, out: &mut DomainReport) {
    if !env.check_access {
        return;
    }
    let who = &env.who;
    let nfs = (env.is_nfs)(path);
    let chowned = who.dynamic_ownership && relabel;
    // Root-squash: on NFS root is nobody, and libvirt's chown as root fails.
    let squashed;
    let as_user = if who.is_root() && nfs {
        squashed = QemuUser {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
            user_name: "nobody (root, squashed by NFS)".into(),
            ..who.clone()
        };
        &squashed
    } else {
        who
    };
    let result = match can_open(path, as_user, want, !chowned || nfs) {
        Ok(r) => r,
        Err(e) => {
            out.skipped.push(format!("{what}: access not checked: {e}"));
            return;
        }
    };
    match result {
        Ok(()) => {
            if nfs && chowned {
                if let Ok(f) = FileFacts::read(path) {
                    if f.uid != who.uid {
                        out.findings.push(Finding::warning(
                            Check::Disk,
                            format!("{what} is on NFS and libvirt must chown it to {} at start", who.display()),
                            format!("{}; filesystem nfs (root-squash refuses root's chown)", f.describe(&env.accounts)),
                            format!(
                                "chown {} {} on the NFS server, or set dynamic_ownership = 0 in qemu.conf",
                                who.display(),
                                path.display()
                            ),
                        ));
                    }
                }
            }
        }
        Err(denied) => {
            let verb = if denied.facts.is_dir {
                "not reachable"
            } else if want & WRITE != 0 {
                "not readable and writable"
            } else {
                "not readable"
            };
            let mut fix = denied.fix(as_user);
            if nfs {
                fix.push_str("; it is on NFS: change it on the server (root-squash maps root to nobody)");
            }
            out.findings.push(Finding::error(
                Check::Disk,
                format!("{what} {verb} by {}", as_user.user_name),
                denied.evidence(as_user, &env.accounts),
                fix,
            ));
        }
    }
}

/// Every file of the qcow2 chain under `top` exists, has the format its child declares, and is
/// readable by QEMU's user.
fn backing_chain(top: &Path, env: &DiskEnv, out: &mut DomainReport) {
    let mut seen: Vec<PathBuf> = vec![top.to_path_buf()];
    let mut image = top.to_path_buf();
    for _ in 0..MAX_CHAIN {
        let backing = match qcow2_backing(&image) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                out.skipped.push(format!("backing chain of {}: {e}", image.display()));
                return;
            }
        };
        let what = format!("backing file {} of {}", clean_path(&backing.path), image.display());
        let fix = format!(
            "restore it, or point the image at the right one: qemu-img rebase -u -b NEW -F FORMAT {}",
            image.display()
        );
        if !exists(&backing.path, &what, &fix, out) {
            return;
        }
        let head = match read_head(&backing.path, HEAD_BYTES) {
            Ok(h) => h,
            Err(e) => {
                out.skipped.push(format!("{what}: {e}"));
                return;
            }
        };
        let (found, words) = detect(&head);
        if let Some(declared) = &backing.format {
            if declared != found.as_str() {
                out.findings.push(Finding::error(
                    Check::Disk,
                    format!("{what} is {} but declared {declared}", found.as_str()),
                    format!("header: {words}; backing format {declared} in {}", image.display()),
                    format!(
                        "qemu-img rebase -u -b {} -F {} {}",
                        clean_path(&backing.path),
                        found.as_str(),
                        image.display()
                    ),
                ));
            }
        }
        access(&backing.path, &what, READ, true, env, out);
        if found != Format::Qcow2 || seen.contains(&backing.path) {
            return;
        }
        seen.push(backing.path.clone());
        image = backing.path;
    }
}

/// A path read from an image header, for display: bounded, no control characters.
fn clean_path(p: &Path) -> String {
    crate::guest_text::clean(&p.display().to_string(), 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::model::Severity;
    use crate::observe::domain_xml::DiskSource;
    use std::os::unix::fs::PermissionsExt;

    fn who(uid: u32, dynamic: bool) -> QemuUser {
        QemuUser {
            uid,
            gid: 994,
            groups: vec![994],
            user_name: if uid == 0 { "root".into() } else { "libvirt-qemu".into() },
            group_name: "kvm".into(),
            dynamic_ownership: dynamic,
            source: "test".into(),
        }
    }

    fn run(disks: Vec<DiskXml>, who: &QemuUser, nfs: bool) -> DomainReport {
        let spec = DomainXmlFacts { disks, ..Default::default() };
        let accounts = Accounts::parse("root:x:0:0::/:/bin/sh\n", "root:x:0:\n");
        let env = DiskEnv {
            domain: "vm1".into(),
            who: who.clone(),
            accounts,
            is_nfs: Arc::new(move |_: &Path| nfs),
            check_access: true,
            deadline: Duration::from_secs(60),
        };
        let mut out = DomainReport::new("vm1", None, "shut off".into());
        check(&spec, &env, &mut out);
        out
    }

    fn disk(path: &Path, driver: &str) -> DiskXml {
        DiskXml {
            device: "disk".into(),
            kind: "file".into(),
            source: Some(DiskSource::File(path.display().to_string())),
            driver_type: Some(driver.into()),
            target: Some("vda".into()),
            ..Default::default()
        }
    }

    fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    fn tmp() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn missing_image_names_the_nearest_directory() {
        let d = tmp();
        let p = d.path().join("gone.qcow2");
        let r = run(vec![disk(&p, "qcow2")], &who(64055, true), false);
        assert_eq!(r.findings.len(), 1, "{r:#?}");
        let f = &r.findings[0];
        assert_eq!(f.what, format!("disk vda {} does not exist", p.display()));
        assert!(f.evidence.ends_with(&format!("{} exists", d.path().display())), "{}", f.evidence);
    }

    #[test]
    fn empty_image_is_an_error() {
        let d = tmp();
        let p = d.path().join("empty.img");
        std::fs::write(&p, b"").unwrap();
        let r = run(vec![disk(&p, "raw")], &who(0, true), false);
        assert_eq!(r.findings[0].what, format!("disk vda {} is empty", p.display()));
    }

    #[test]
    fn qcow2_declared_raw_and_raw_declared_qcow2() {
        let d = tmp();
        let q = d.path().join("a.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"]);
        let r = run(vec![disk(&q, "raw")], &who(0, true), false);
        assert_eq!(r.findings.len(), 1, "{r:#?}");
        let f = &r.findings[0];
        assert_eq!(f.severity, Severity::Warning);
        assert_eq!(f.what, format!("disk vda {} is declared raw and starts with a qcow2 header", q.display()));
        assert_eq!(f.evidence, "header: QFI\\xfb: qcow2; <driver type='raw'>", "no bytes of the image are shown");
        assert_eq!(
            f.fix,
            "the guest wrote a header that looks like qcow2; libvirt never probes formats, do not change the driver type on this evidence"
        );

        let raw = d.path().join("b.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let r = run(vec![disk(&raw, "qcow2")], &who(0, true), false);
        assert_eq!(r.findings[0].what, format!("disk vda {} is raw but declared qcow2", raw.display()));
        assert!(run(vec![disk(&raw, "raw")], &who(0, true), false).findings.is_empty());
    }

    #[test]
    fn fifo_socket_and_character_device_disks_are_not_regular_files_and_never_opened() {
        let d = tmp();
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let sock = d.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for (p, kind) in
            [(fifo.as_path(), "a FIFO"), (sock.as_path(), "a socket"), (Path::new("/dev/zero"), "a character device")]
        {
            let r = run(vec![disk(p, "raw")], &who(0, true), false);
            assert_eq!(r.findings.len(), 1, "{r:#?}");
            assert_eq!(r.findings[0].what, format!("disk vda {} is not a regular file", p.display()));
            assert_eq!(r.findings[0].evidence, format!("it is {kind} (not opened)"));
        }
    }

    #[test]
    fn a_disk_whose_checks_hang_costs_only_its_finding() {
        let d = tmp();
        let ok = d.path().join("ok.img");
        std::fs::write(&ok, vec![0u8; 4096]).unwrap();
        let spec = DomainXmlFacts { disks: vec![disk(&ok, "raw"), disk(&ok, "qcow2")], ..Default::default() };
        let accounts = Accounts::parse("root:x:0:0::/:/bin/sh\n", "root:x:0:\n");
        // statfs standing in for a hung NFS server, on the second disk only.
        let (hold, release) = std::sync::mpsc::channel::<()>();
        let hold = std::sync::Mutex::new(hold);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        let release = std::sync::Mutex::new(release);
        let env = DiskEnv {
            domain: "vm1".into(),
            who: who(0, true),
            accounts,
            is_nfs: Arc::new(move |_: &Path| {
                if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1 {
                    let _ = release.lock().unwrap().recv();
                }
                false
            }),
            check_access: true,
            deadline: Duration::from_millis(300),
        };
        let mut out = DomainReport::new("vm1", None, "shut off".into());
        check(&spec, &env, &mut out);
        let hung: Vec<&Finding> = out.findings.iter().filter(|f| f.what.contains("did not finish")).collect();
        assert_eq!(hung.len(), 1, "{out:#?}");
        assert_eq!(hung[0].what, format!("disk vda: checks of {} did not finish within 300ms", ok.display()));
        drop(hold);
    }

    #[test]
    fn backing_chain_missing_and_wrong_backing_format() {
        let d = tmp();
        let base = d.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
        let top = d.path().join("top.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "raw", top.to_str().unwrap()]);
        let r = run(vec![disk(&top, "qcow2")], &who(0, true), false);
        assert_eq!(r.findings.len(), 1, "{r:#?}");
        assert_eq!(
            r.findings[0].what,
            format!("backing file {} of {} is qcow2 but declared raw", base.display(), top.display())
        );
        std::fs::remove_file(&base).unwrap();
        let r = run(vec![disk(&top, "qcow2")], &who(0, true), false);
        assert_eq!(r.findings[0].what, format!("backing file {} of {} does not exist", base.display(), top.display()));
    }

    #[test]
    fn directory_qemu_cannot_search_blocks_even_with_dynamic_ownership() {
        let d = tmp();
        let vm = d.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        std::fs::set_permissions(&vm, std::fs::Permissions::from_mode(0o700)).unwrap();
        let img = vm.join("a.img");
        std::fs::write(&img, vec![1u8; 512]).unwrap();
        let r = run(vec![disk(&img, "raw")], &who(64055, true), false);
        assert_eq!(r.findings.len(), 1, "{r:#?}");
        let f = &r.findings[0];
        assert_eq!(f.severity, Severity::Error);
        assert_eq!(f.what, format!("disk vda {} not reachable by libvirt-qemu", img.display()));
        assert!(f.evidence.starts_with(&format!("{} is 0700 root:root", vm.display())), "{}", f.evidence);
        // Root (QEMU as root) passes on a local filesystem.
        assert!(run(vec![disk(&img, "raw")], &who(0, true), false).findings.is_empty());
    }

    #[test]
    fn without_dynamic_ownership_the_file_mode_counts_and_readonly_needs_only_read() {
        let d = tmp();
        let img = d.path().join("a.img");
        std::fs::write(&img, vec![1u8; 512]).unwrap();
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = run(vec![disk(&img, "raw")], &who(64055, false), false);
        assert_eq!(r.findings[0].what, format!("disk vda {} not readable and writable by libvirt-qemu", img.display()));
        let mut ro = disk(&img, "raw");
        ro.readonly = true;
        assert!(run(vec![ro], &who(64055, false), false).findings.is_empty());
        assert!(run(vec![disk(&img, "raw")], &who(64055, true), false).findings.is_empty(), "libvirt chowns it");
    }

    #[test]
    fn nfs_root_squash_is_hinted() {
        let d = tmp();
        let img = d.path().join("a.img");
        std::fs::write(&img, vec![1u8; 512]).unwrap();
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o600)).unwrap();
        // QEMU as root on NFS: squashed to nobody, who cannot read a 0600 root file.
        let r = run(vec![disk(&img, "raw")], &who(0, false), true);
        assert!(r.findings[0].what.contains("by nobody (root, squashed by NFS)"), "{r:#?}");
        assert!(r.findings[0].fix.contains("root-squash"));
        // Unprivileged QEMU with dynamic ownership: libvirt's chown will be refused.
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o666)).unwrap();
        let r = run(vec![disk(&img, "raw")], &who(64055, true), true);
        assert_eq!(r.findings[0].severity, Severity::Warning);
        assert!(
            r.findings[0].what.ends_with("is on NFS and libvirt must chown it to libvirt-qemu:kvm at start"),
            "{r:#?}"
        );
    }

    #[test]
    fn empty_cdrom_is_not_a_disk_problem_but_a_sourceless_disk_is() {
        let cd =
            DiskXml { device: "cdrom".into(), kind: "file".into(), target: Some("sda".into()), ..Default::default() };
        assert!(run(vec![cd], &who(0, true), false).findings.is_empty());
        let hd =
            DiskXml { device: "disk".into(), kind: "file".into(), target: Some("vda".into()), ..Default::default() };
        assert_eq!(run(vec![hd], &who(0, true), false).findings[0].what, "disk vda has no source");
    }
}
