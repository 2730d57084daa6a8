//! End to end: `diagnose` on a private libvirtd whose QEMU runs as libvirt-qemu:kvm with
//! dynamic ownership, as on a real host. Broken domains — a missing image, qcow2 declared raw
//! and the reverse, an image behind a directory QEMU's user cannot search, an empty CD-ROM first
//! in the boot order, a missing bridge, a detached tap — are found with evidence, failed starts
//! are explained in one line (library and `apply`), and a sound running domain comes out clean.

mod testbed;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testbed::*;
use virtwarden::diagnose::{diagnose, explain_start_failure, DomainReport, Options, Target};
use virtwarden::hypervisor::DomainControl;
use virtwarden::libvirt::LibvirtHost;

const IMAGES: &str = "/var/lib/libvirt/images";
const T: Duration = Duration::from_secs(60);

fn images() -> PathBuf {
    let p = PathBuf::from(IMAGES);
    std::fs::create_dir_all(&p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A 1 MiB raw disk whose first sector boots and halts (cli; hlt; jmp $-1; 0x55aa). SeaBIOS
/// cannot read the boot sector of a much smaller disk.
fn bootable_raw(path: &Path) {
    let mut img = vec![0u8; 1024 * 1024];
    img[..4].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    img[510] = 0x55;
    img[511] = 0xaa;
    std::fs::write(path, img).unwrap();
}

fn console(name: &str) -> String {
    format!("/var/log/libvirt/{name}.console")
}

/// A TCG guest (QEMU as libvirt-qemu cannot open this host's /dev/kvm) whose SeaBIOS writes to
/// a serial console file.
fn define(hv: &LibvirtHost, name: &str, boot: &[&str], devices: &str) {
    let boot: String = boot.iter().map(|b| format!("<boot dev='{b}'/>")).collect();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type>{boot}<bios useserial='yes'/></os>\
         <devices>{devices}<serial type='file'><source path='{}'/></serial></devices></domain>",
        console(name)
    );
    hv.connection().define_domain_xml(&xml).expect("define");
}

fn disk(path: &Path, driver: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{driver}'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        path.display()
    )
}

const EMPTY_CDROM: &str =
    "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/></disk>";

fn nic(bridge: &str) -> String {
    format!("<interface type='bridge'><source bridge='{bridge}'/><model type='virtio'/><rom enabled='no'/></interface>")
}

fn report(hv: &LibvirtHost, name: &str) -> DomainReport {
    let r =
        diagnose(hv, &[Target { domain: name.into(), policy: None }], &Options::for_uri(URI, true)).expect("diagnose");
    r.domains.into_iter().next().unwrap()
}

/// `what: evidence` of every finding.
fn lines(r: &DomainReport) -> Vec<String> {
    r.findings.iter().map(|f| format!("{}: {}", f.what, f.evidence)).collect()
}

fn has(r: &DomainReport, needle: &str) -> bool {
    r.findings.iter().any(|f| f.what.contains(needle) || f.evidence.contains(needle))
}

fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_virtwarden")).args(args).output().expect("run virtwarden");
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

fn qemu_img(args: &[&str]) {
    sh(&[&["qemu-img"], args].concat());
}

/// The text a README shows, written where the parent can read it after the namespace is gone.
fn save_example(name: &str, text: &str) {
    let _ = std::fs::write(repo().join("target").join(name), text);
}

#[test]
fn e2e_diagnose_disk_problems_and_explains_failed_starts() {
    if !inside_unprivileged("e2e_diagnose_disk_problems_and_explains_failed_starts") {
        return;
    }
    let hv = connect();
    let img = images();

    // A missing image: the start fails, and the explanation names the file.
    define(&hv, "missing", &["hd"], &disk(&img.join("missing.qcow2"), "qcow2"));
    let err = hv.start("missing").expect_err("no image, no start");
    let why = explain_start_failure(&hv, "missing", Some(&err.detail()), true).expect("an explanation");
    assert!(
        why.starts_with("disk vda /var/lib/libvirt/images/missing.qcow2 does not exist"),
        "{why}\n(libvirt: {err})"
    );

    // qcow2 declared raw: QEMU starts, the guest sees the qcow2 header and SeaBIOS gives up.
    qemu_img(&["create", "-q", "-f", "qcow2", img.join("q.qcow2").to_str().unwrap(), "1M"]);
    define(&hv, "qcow2-as-raw", &["hd"], &disk(&img.join("q.qcow2"), "raw"));
    start(&hv, "qcow2-as-raw");
    wait("SeaBIOS gives up on the qcow2 header", T, || {
        std::fs::read_to_string(console("qcow2-as-raw")).is_ok_and(|t| t.contains("No bootable device"))
    });
    let r = report(&hv, "qcow2-as-raw");
    // The header of a raw disk is the guest's to write: reported, never advice to believe it.
    assert!(has(&r, "q.qcow2 is declared raw and starts with a qcow2 header"), "{:#?}", lines(&r));
    assert!(!has(&r, "51 46 49 fb"), "no bytes of the image are shown: {:#?}", lines(&r));
    assert!(
        r.findings.iter().all(|f| !f.fix.contains("<driver") && !f.fix.contains("type='qcow2'")),
        "no advice to change the driver type: {r:#?}"
    );
    assert!(r.findings.iter().any(|f| f.fix
        == "the guest wrote a header that looks like qcow2; libvirt never probes formats, do not change the driver type on this evidence"));
    assert!(has(&r, "the guest's firmware found nothing to boot (SeaBIOS: No bootable device)"), "{:#?}", lines(&r));

    // raw declared qcow2: QEMU refuses; its log line is the evidence of the failed start.
    bootable_raw(&img.join("raw.img"));
    define(&hv, "raw-as-qcow2", &["hd"], &disk(&img.join("raw.img"), "qcow2"));
    let err = hv.start("raw-as-qcow2").expect_err("QEMU refuses a raw file as qcow2");
    let r = report(&hv, "raw-as-qcow2");
    assert!(has(&r, "raw.img is raw but declared qcow2"), "{:#?}", lines(&r));
    assert!(has(&r, "Image is not in qcow2 format"), "the QEMU log is quoted: {:#?}", lines(&r));
    let why = explain_start_failure(&hv, "raw-as-qcow2", Some(&err.detail()), true).unwrap();
    assert!(why.starts_with("disk vda /var/lib/libvirt/images/raw.img is raw but declared qcow2"), "{why}");

    // An image behind a directory libvirt-qemu cannot search (libvirt chowns the file, never
    // its directories).
    let private = img.join("private");
    std::fs::create_dir(&private).unwrap();
    bootable_raw(&private.join("p.img"));
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    define(&hv, "unsearchable", &["hd"], &disk(&private.join("p.img"), "raw"));
    let err = hv.start("unsearchable").expect_err("QEMU cannot open the image");
    let why = explain_start_failure(&hv, "unsearchable", Some(&err.detail()), true).unwrap();
    assert!(
        why.starts_with(
            "disk vda /var/lib/libvirt/images/private/p.img not reachable by libvirt-qemu: \
             /var/lib/libvirt/images/private is 0700 root:root; libvirt-qemu:kvm needs search (x)"
        ),
        "{why}\n(libvirt: {err})"
    );

    // `apply` reports the same finding for the start it saw fail.
    let dir = work().join("apply");
    std::fs::create_dir_all(&dir).unwrap();
    let policy_file = dir.join("p.yaml");
    std::fs::write(&policy_file, policy("  domains:\n    - name: unsearchable\n      restart: always\n")).unwrap();
    let (code, out) = cli(&["apply", "--connect", URI, "--network", "off", policy_file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("why: disk vda /var/lib/libvirt/images/private/p.img not reachable by libvirt-qemu"), "{out}");
    save_example("diagnose-example-apply.txt", &out);

    // `run` puts the same finding where operators look: the failure reason in status.
    let d = Daemon::start(&policy("  domains:\n    - name: unsearchable\n      restart: always\n"));
    wait("the failed start is explained in status", T, || {
        d.domain("unsearchable").is_some_and(|s| {
            s["lastError"].as_str().unwrap_or("").starts_with(
                "start failed: disk vda /var/lib/libvirt/images/private/p.img not reachable by libvirt-qemu",
            )
        })
    });
    assert!(d.domain("unsearchable").unwrap()["diagnosis"].as_str().unwrap_or("").contains("needs search (x)"));
    d.stop();

    // The command itself: every broken domain, exit 3.
    let (code, out) = cli(&["diagnose", "--connect", URI, "missing", "qcow2-as-raw", "raw-as-qcow2", "unsearchable"]);
    assert_eq!(code, 3, "{out}");
    save_example("diagnose-example-disks.txt", &out);
}

#[test]
fn e2e_diagnose_boot_order_missing_bridge_and_detached_tap() {
    if !inside_unprivileged("e2e_diagnose_boot_order_missing_bridge_and_detached_tap") {
        return;
    }
    let hv = connect();
    let img = images();
    bridge("br0");

    // An empty CD-ROM first: the firmware moves on to the disk, which boots.
    bootable_raw(&img.join("cd.img"));
    define(&hv, "cdrom-first", &["cdrom", "hd"], &format!("{EMPTY_CDROM}{}", disk(&img.join("cd.img"), "raw")));
    start(&hv, "cdrom-first");
    wait("SeaBIOS tried the CD-ROM, then the disk", T, || {
        std::fs::read_to_string(console("cdrom-first")).is_ok_and(|t| t.contains("Booting from Hard Disk"))
    });
    let r = report(&hv, "cdrom-first");
    assert_eq!(
        lines(&r),
        vec!["boots from cdrom first, which is empty; the firmware moves on to hd: boot order [cdrom, hd]; the CD-ROM sda has no source (no medium)"],
        "SeaBIOS's \"Boot failed\" for the CD-ROM is followed by a boot from the disk: no firmware finding"
    );

    // A bridge that does not exist: the start fails, the explanation names the bridge.
    bootable_raw(&img.join("nobr.img"));
    define(&hv, "no-bridge", &["hd"], &format!("{}{}", disk(&img.join("nobr.img"), "raw"), nic("br9")));
    let err = hv.start("no-bridge").expect_err("no bridge, no start");
    let why = explain_start_failure(&hv, "no-bridge", Some(&err.detail()), true).unwrap();
    assert!(why.starts_with("bridge br9 does not exist"), "{why}\n(libvirt: {err})");

    // A detached tap.
    bootable_raw(&img.join("tap.img"));
    define(&hv, "tapped", &["hd"], &format!("{}{}", disk(&img.join("tap.img"), "raw"), nic("br0")));
    start(&hv, "tapped");
    assert_eq!(lines(&report(&hv, "tapped")), Vec::<String>::new());
    let tap = state(&hv, "tapped").unwrap().interfaces[0].target.clone().unwrap();
    sh(&["ip", "link", "set", &tap, "nomaster"]);
    let r = report(&hv, "tapped");
    assert_eq!(
        lines(&r),
        vec![format!("tap {tap} of tapped is not on bridge br0: {tap} is on no bridge; the interface's source is br0")]
    );
    let (code, out) = cli(&["diagnose", "--connect", URI, "cdrom-first", "no-bridge", "tapped"]);
    assert_eq!(code, 3, "{out}");
    save_example("diagnose-example-boot-net.txt", &out);
    sh(&["ip", "link", "set", &tap, "master", "br0"]);
    assert_eq!(lines(&report(&hv, "tapped")), Vec::<String>::new());
}

#[test]
fn e2e_diagnose_sound_domain_comes_out_clean() {
    if !inside_unprivileged("e2e_diagnose_sound_domain_comes_out_clean") {
        return;
    }
    let hv = connect();
    let img = images();
    bridge("br0");
    bootable_raw(&img.join("sound.img"));
    define(&hv, "sound", &["hd"], &format!("{}{}", disk(&img.join("sound.img"), "raw"), nic("br0")));
    let (code, out) = cli(&["diagnose", "--connect", URI, "sound"]);
    assert_eq!(code, 0, "defined, not started yet: {out}");
    start(&hv, "sound");
    wait("the disk boots", T, || {
        std::fs::read_to_string(console("sound")).is_ok_and(|t| t.contains("Booting from Hard Disk"))
    });
    let (code, out) = cli(&["diagnose", "--connect", URI, "sound"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "sound: running (booted), not managed: read only\n  ok: no problems found\nno problems found in 1 domain\n"
    );
    // libvirt chowned the image to QEMU's user, as on a real host.
    let owner = sh(&["stat", "-c", "%U:%G", &format!("{IMAGES}/sound.img")]);
    assert_eq!(owner.trim(), "libvirt-qemu:kvm");
    save_example("diagnose-example-sound.txt", &out);
}

/// Run the CLI, killing it after `limit`: `None` when it did not finish.
fn cli_within(args: &[&str], limit: Duration) -> Option<(i32, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run virtwarden");
    let t0 = std::time::Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            let out = child.wait_with_output().expect("output");
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return Some((out.status.code().unwrap_or(-1), text));
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn e2e_diagnose_fifo_and_character_device_disk_and_console_paths_are_reported_never_opened() {
    if !inside_unprivileged("e2e_diagnose_fifo_and_character_device_disk_and_console_paths_are_reported_never_opened") {
        return;
    }
    let hv = connect();
    let img = images();
    // A FIFO as disk and as console log: an open would wait for a writer for ever.
    let fifo = img.join("fifo.img");
    sh(&["mkfifo", fifo.to_str().unwrap(), &console("fifo")]);
    define(&hv, "fifo", &["hd"], &disk(&fifo, "raw"));
    // A character device as disk, and a console log that is a symlink to one (opening
    // /dev/watchdog would arm a hardware watchdog; /dev/zero stands in).
    std::os::unix::fs::symlink("/dev/zero", console("chardev")).unwrap();
    define(&hv, "chardev", &["hd"], &disk(Path::new("/dev/zero"), "raw"));

    // Each disk's checks have a 5 s deadline; a minute is "finished", not "hung".
    let (code, out) = cli_within(&["diagnose", "--connect", URI, "fifo", "chardev"], T).expect("diagnose finishes");
    assert_eq!(code, 3, "{out}");
    for want in [
        format!("disk vda {} is not a regular file", fifo.display()),
        "it is a FIFO (not opened)".to_string(),
        format!("console {} is not a regular file", console("fifo")),
        "disk vda /dev/zero is not a regular file".into(),
        "it is a character device (not opened)".into(),
        format!("console {} is not a regular file", console("chardev")),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
}
