//! Who may have written what virtwarden acts on as root (policy files, hook executables), in the
//! manner of sshd's StrictModes: the file and every directory above it must be owned by root or
//! the service user and not writable by group or others. Symlinks are resolved before checking.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Writable by group or others.
const GROUP_OR_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// The owners virtwarden trusts: root and the user the service runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedOwners {
    service_uid: u32,
}

impl TrustedOwners {
    pub fn new(service_uid: u32) -> Self {
        TrustedOwners { service_uid }
    }

    /// Root and this process's effective user.
    pub fn of_this_process() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        TrustedOwners { service_uid: unsafe { libc::geteuid() } }
    }

    pub fn service_uid(&self) -> u32 {
        self.service_uid
    }

    pub fn trusts(&self, uid: u32) -> bool {
        uid == 0 || uid == self.service_uid
    }
}

/// How loading treats policy files that fail the ownership rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustMode {
    /// Not checked (files in memory, tests).
    Off,
    /// Reported as warnings; the policies still load (`check`, `plan`: they do not act).
    Warn(TrustedOwners),
    /// Loading fails naming the paths (`run`, `apply`: they act as root).
    Enforce(TrustedOwners),
}

impl TrustMode {
    pub fn owners(&self) -> Option<TrustedOwners> {
        match self {
            TrustMode::Off => None,
            TrustMode::Warn(o) | TrustMode::Enforce(o) => Some(*o),
        }
    }
}

/// Why a path is not trusted. Each names the offending path (a file or one of its directories).
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot resolve {}: {source}", path.display())]
    Resolve { path: PathBuf, source: std::io::Error },
    #[error("{} is owned by uid {uid}; only root or the service user (uid {service_uid}) may own it", path.display())]
    Owner { path: PathBuf, uid: u32, service_uid: u32 },
    #[error("{} is writable by {who} (mode {mode:04o})", path.display())]
    Writable { path: PathBuf, mode: u32, who: &'static str },
    #[error("{} is not a regular file", path.display())]
    NotRegular { path: PathBuf },
    #[error("{} is not a directory", path.display())]
    NotDirectory { path: PathBuf },
}

impl TrustError {
    /// The path that failed the rules.
    pub fn path(&self) -> &Path {
        match self {
            TrustError::Resolve { path, .. }
            | TrustError::Owner { path, .. }
            | TrustError::Writable { path, .. }
            | TrustError::NotRegular { path }
            | TrustError::NotDirectory { path } => path,
        }
    }

    /// A fixed word for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            TrustError::Resolve { .. } => "unresolvable",
            TrustError::Owner { .. } => "owner",
            TrustError::Writable { .. } => "writable",
            TrustError::NotRegular { .. } | TrustError::NotDirectory { .. } => "file-type",
        }
    }
}

/// Check one file system object's owner and mode (`meta` from `lstat` or `fstat`).
///
/// A directory with the sticky bit (like `/tmp`) may be writable by others when a trusted user
/// owns it: others can then add entries but cannot rename or remove the ones they do not own, so
/// nothing below it that passes these checks can be swapped by them.
pub fn check_metadata(path: &Path, meta: &Metadata, owners: TrustedOwners) -> Result<(), TrustError> {
    if !owners.trusts(meta.uid()) {
        return Err(TrustError::Owner { path: path.to_path_buf(), uid: meta.uid(), service_uid: owners.service_uid() });
    }
    let mode = meta.mode() & 0o7777;
    let sticky_dir = meta.is_dir() && mode & STICKY != 0;
    if mode & GROUP_OR_OTHER_WRITE != 0 && !sticky_dir {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "its group and others",
            (true, false) => "its group",
            _ => "others",
        };
        return Err(TrustError::Writable { path: path.to_path_buf(), mode, who });
    }
    Ok(())
}

/// Resolve every symlink in `path` (it must exist).
pub fn resolve(path: &Path) -> Result<PathBuf, TrustError> {
    std::fs::canonicalize(path).map_err(|source| TrustError::Resolve { path: path.to_path_buf(), source })
}

/// Check every directory above the already resolved `path`, from its parent up to `/`.
pub fn check_ancestors(resolved: &Path, owners: TrustedOwners) -> Result<(), TrustError> {
    for dir in resolved.ancestors().skip(1) {
        let meta = std::fs::symlink_metadata(dir).map_err(|source| TrustError::Resolve { path: dir.into(), source })?;
        if !meta.is_dir() {
            return Err(TrustError::NotDirectory { path: dir.into() });
        }
        check_metadata(dir, &meta, owners)?;
    }
    Ok(())
}

/// Resolve `path` and check the regular file it names and every directory above it. Returns the
/// resolved path: open or execute that one, so a symlink swapped after the check cannot redirect.
pub fn check_file(path: &Path, owners: TrustedOwners) -> Result<PathBuf, TrustError> {
    check_resolved(path, owners, false)
}

/// Resolve `path` and check the directory it names and every directory above it.
pub fn check_dir(path: &Path, owners: TrustedOwners) -> Result<PathBuf, TrustError> {
    check_resolved(path, owners, true)
}

fn check_resolved(path: &Path, owners: TrustedOwners, dir: bool) -> Result<PathBuf, TrustError> {
    let resolved = resolve(path)?;
    let meta = std::fs::metadata(&resolved).map_err(|source| TrustError::Resolve { path: resolved.clone(), source })?;
    match (dir, meta.is_dir(), meta.is_file()) {
        (true, false, _) => return Err(TrustError::NotDirectory { path: resolved }),
        (false, _, false) => return Err(TrustError::NotRegular { path: resolved }),
        _ => {}
    }
    check_metadata(&resolved, &meta, owners)?;
    check_ancestors(&resolved, owners)?;
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A private temporary directory, symlinks resolved (so paths compare equal).
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = resolve(dir.path()).unwrap();
        (dir, root)
    }

    fn me() -> TrustedOwners {
        TrustedOwners::of_this_process()
    }

    #[test]
    fn a_private_file_in_private_directories_is_trusted_and_resolved() {
        let (_d, root) = scratch();
        let file = root.join("p.yaml");
        std::fs::write(&file, "x").unwrap();
        chmod(&file, 0o644);
        let link = root.join("link.yaml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(check_file(&link, me()).unwrap(), file);
    }

    #[test]
    fn group_or_world_writable_files_and_directories_are_named() {
        let (_d, root) = scratch();
        let sub = root.join("policies");
        std::fs::create_dir(&sub).unwrap();
        let file = sub.join("p.yaml");
        std::fs::write(&file, "x").unwrap();
        chmod(&file, 0o664);
        let err = check_file(&file, me()).unwrap_err();
        assert!(matches!(&err, TrustError::Writable { path, who: "its group", .. } if *path == file), "{err}");
        chmod(&file, 0o644);
        chmod(&sub, 0o757);
        let err = check_file(&file, me()).unwrap_err();
        assert_eq!(err.path(), sub);
        assert_eq!(err.to_string(), format!("{} is writable by others (mode 0757)", sub.display()));
        // Sticky like /tmp: others may add entries but not replace ours.
        chmod(&sub, 0o1777);
        assert!(check_file(&file, me()).is_ok());
    }

    #[test]
    fn a_symlink_is_judged_by_its_target() {
        let (_d, root) = scratch();
        let open = root.join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let target = open.join("p.yaml");
        std::fs::write(&target, "x").unwrap();
        chmod(&target, 0o644);
        let link = root.join("p.yaml");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = check_file(&link, me()).unwrap_err();
        assert_eq!(err.path(), open);
    }

    #[test]
    fn a_foreign_owner_is_named() {
        let (_d, root) = scratch();
        let file = root.join("p.yaml");
        std::fs::write(&file, "x").unwrap();
        let owners = if me().service_uid() == 0 {
            std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
            me()
        } else {
            // Not root: trust some other user instead of ourselves.
            TrustedOwners::new(me().service_uid() + 1)
        };
        let err = check_file(&file, owners).unwrap_err();
        assert!(matches!(&err, TrustError::Owner { path, .. } if *path == file), "{err}");
        assert!(err.to_string().contains("only root or the service user"), "{err}");
    }
}
