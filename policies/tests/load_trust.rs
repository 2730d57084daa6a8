//! Loading policy files under the ownership rules (StrictModes) and the race-free size cap.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use virtwarden_policies::load::MAX_FILE_BYTES;
use virtwarden_policies::{load_paths_with, LoadError, TrustMode, TrustedOwners};

const POLICY: &str =
    "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: p\nspec:\n  domains:\n    - name: web1\n";

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A private policy directory (mode 0755) holding `p.yaml` (mode 0644); symlinks resolved.
fn policy_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap().join("policies");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    let file = dir.join("p.yaml");
    std::fs::write(&file, POLICY).unwrap();
    chmod(&file, 0o644);
    (tmp, dir, file)
}

fn enforce() -> TrustMode {
    TrustMode::Enforce(TrustedOwners::of_this_process())
}

fn untrusted_paths(err: LoadError) -> Vec<PathBuf> {
    match err {
        LoadError::Untrusted(problems) => problems.iter().map(|p| p.path().to_path_buf()).collect(),
        other => panic!("expected an ownership error, got: {other}"),
    }
}

#[test]
fn private_files_load_under_enforcement() {
    let (_t, dir, _file) = policy_dir();
    let loaded = load_paths_with(&[dir], enforce()).unwrap();
    assert_eq!(loaded.desired.domains.len(), 1);
    assert!(loaded.warnings.is_empty());
}

#[test]
fn a_group_writable_policy_file_is_refused_naming_it() {
    let (_t, dir, file) = policy_dir();
    chmod(&file, 0o664);
    let err = load_paths_with(std::slice::from_ref(&dir), enforce()).unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with(&format!("{} is writable by its group (mode 0664)", file.display())), "{text}");
    assert!(text.contains("hint: policy files and every directory above them must be owned by root"), "{text}");
    assert_eq!(untrusted_paths(err), std::slice::from_ref(&file));
    // `check` and `plan` only warn; without checks nothing is said.
    let warned =
        load_paths_with(std::slice::from_ref(&dir), TrustMode::Warn(TrustedOwners::of_this_process())).unwrap();
    assert_eq!(warned.warnings, [format!("{} is writable by its group (mode 0664)", file.display())]);
    assert!(load_paths_with(&[dir], TrustMode::Off).unwrap().warnings.is_empty());
}

#[test]
fn a_world_writable_policy_directory_is_refused_naming_it_even_when_empty() {
    let (_t, dir, file) = policy_dir();
    chmod(&dir, 0o777);
    assert_eq!(
        untrusted_paths(load_paths_with(std::slice::from_ref(&dir), enforce()).unwrap_err()),
        std::slice::from_ref(&dir)
    );
    // A file named directly is judged by its directory too.
    assert_eq!(
        untrusted_paths(load_paths_with(std::slice::from_ref(&file), enforce()).unwrap_err()),
        std::slice::from_ref(&dir)
    );
    std::fs::remove_file(&file).unwrap();
    assert_eq!(untrusted_paths(load_paths_with(std::slice::from_ref(&dir), enforce()).unwrap_err()), [dir]);
}

#[test]
fn a_policy_file_owned_by_another_user_is_refused() {
    let (_t, dir, file) = policy_dir();
    let owners = if TrustedOwners::of_this_process().service_uid() == 0 {
        std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
        TrustedOwners::of_this_process()
    } else {
        TrustedOwners::new(TrustedOwners::of_this_process().service_uid() + 1)
    };
    let err = load_paths_with(&[dir], TrustMode::Enforce(owners)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("{} is owned by uid", file.display())), "{text}");
    assert_eq!(untrusted_paths(err), [file]);
}

#[test]
fn a_linked_policy_is_judged_by_where_it_points() {
    let (tmp, dir, file) = policy_dir();
    std::fs::remove_file(&file).unwrap();
    let elsewhere = std::fs::canonicalize(tmp.path()).unwrap().join("drop");
    std::fs::create_dir(&elsewhere).unwrap();
    chmod(&elsewhere, 0o777);
    let target = elsewhere.join("p.yaml");
    std::fs::write(&target, POLICY).unwrap();
    chmod(&target, 0o644);
    std::os::unix::fs::symlink(&target, &file).unwrap();
    assert_eq!(
        untrusted_paths(load_paths_with(std::slice::from_ref(&dir), enforce()).unwrap_err()),
        std::slice::from_ref(&elsewhere)
    );
    chmod(&elsewhere, 0o755);
    assert_eq!(load_paths_with(&[dir], enforce()).unwrap().desired.domains.len(), 1);
}

#[test]
fn an_oversized_file_is_refused_by_what_is_read_not_by_its_stat() {
    let (_t, _dir, file) = policy_dir();
    // Sparse: no disk space used, but reading it yields more than the cap.
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(MAX_FILE_BYTES + 1).unwrap();
    let err = load_paths_with(std::slice::from_ref(&file), enforce()).unwrap_err();
    let d = &err.diagnostics()[0];
    assert_eq!(d.file, file);
    assert_eq!(d.message, format!("file is larger than {MAX_FILE_BYTES} bytes, the limit for a policy file"));
}

#[test]
fn a_fifo_in_place_of_a_policy_is_refused_without_hanging() {
    let (_t, dir, _file) = policy_dir();
    let fifo = dir.join("q.yaml");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    // In a directory it is not a policy file; named directly it is refused, not waited on.
    assert_eq!(load_paths_with(std::slice::from_ref(&dir), enforce()).unwrap().desired.domains.len(), 1);
    let err = load_paths_with(std::slice::from_ref(&fifo), TrustMode::Off).unwrap_err();
    assert_eq!(err.to_string(), format!("cannot read {}: not a regular file", fifo.display()));
}
