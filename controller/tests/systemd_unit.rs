//! The shipped systemd unit and its hooks drop-in pass `systemd-analyze verify` (Debian package
//! `systemd`, installed by `make deps`) with the binary just built, and keep the limits the
//! README promises.

use std::path::{Path, PathBuf};
use std::process::Command;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("examples/systemd")
}

/// Copy the unit and its drop-in into `dir`, pointing at the binary under test.
fn install(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(examples().join("virtwarden.service")).unwrap();
    let unit = unit.replace("/usr/bin/virtwarden", env!("CARGO_BIN_EXE_virtwarden"));
    std::fs::write(dir.join("virtwarden.service"), unit).unwrap();
    let dropins = dir.join("virtwarden.service.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::copy(examples().join("virtwarden.service.d/hooks.conf"), dropins.join("hooks.conf")).unwrap();
    dir.join("virtwarden.service")
}

/// `systemd-analyze verify`: its exit code and what it complained about (it exits 0 on
/// unknown keys and bad values, and only says so on stderr).
fn verify(unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(unit).output().unwrap_or_else(|e| {
        panic!("cannot run systemd-analyze ({e}): install the Debian package `systemd` (make deps)")
    });
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_unit_and_its_hooks_drop_in_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = install(dir.path());
    let (ok, complaints) = verify(&unit);
    assert!(ok && complaints.is_empty(), "systemd-analyze verify:\n{complaints}");

    // The drop-in is read: a mistake in it is reported.
    let dropin = dir.path().join("virtwarden.service.d/hooks.conf");
    let text = std::fs::read_to_string(&dropin).unwrap();
    std::fs::write(&dropin, text.replace("ReadWritePaths=-/var/lib/libvirt/images", "ReadWritePaths=images")).unwrap();
    let (_, complaints) = verify(&unit);
    assert!(complaints.contains("ReadWritePaths= path is not absolute"), "{complaints}");
}

#[test]
fn the_unit_keeps_the_documented_limits() {
    let unit = std::fs::read_to_string(examples().join("virtwarden.service")).unwrap();
    let keys: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
    for want in [
        "StateDirectory=virtwarden",
        "StateDirectoryMode=0700",
        "RuntimeDirectoryMode=0700",
        "UMask=0077",
        "SystemCallFilter=@system-service",
        "LimitNOFILE=4096",
        "MemoryMax=512M",
        "RestartPreventExitStatus=2",
    ] {
        assert!(keys.contains(&want), "the unit lacks `{want}`");
    }
}
