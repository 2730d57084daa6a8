//! One writer per host: `run`, `operator` and `apply` hold an exclusive lock on one host-wide
//! file (not per state directory), so two of them never change the same host at once. A second
//! one exits naming the holder. `plan`, `check` and `status` never take it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The host-wide lock file (in /run, where only root creates files).
pub const DEFAULT_LOCK_FILE: &str = "/run/virtwarden.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another virtwarden is changing this host (pid {pid}, `{command}`); it holds {}", path.display())]
    Held { path: PathBuf, pid: String, command: String },
    #[error("cannot use lock file {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("lock file {} is not a regular file owned by this user; remove it", path.display())]
    Untrusted { path: PathBuf },
}

/// Held for the life of the process; released when dropped or when the process dies.
#[derive(Debug)]
pub struct HostLock {
    _file: File,
}

/// Take the host-wide lock for `command` (e.g. `run`), or say who holds it.
pub fn acquire(path: &Path, command: &str) -> Result<HostLock, LockError> {
    let io = |source| LockError::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // Never follow a symlink someone planted; the file is ours alone.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != euid {
        return Err(LockError::Untrusted { path: path.to_path_buf() });
    }
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let mut words = text.split_whitespace();
            let written = words.next().unwrap_or("unknown").to_string();
            let command = words.next().unwrap_or("unknown").to_string();
            // The pid the holder wrote is the one of its own pid namespace ("1" in a pod); the
            // kernel tells the holder's pid as this process sees it.
            let pid = match holder_pid(&file) {
                Some(seen) if seen.to_string() != written => format!("{seen}; {written} in its own pid namespace"),
                Some(seen) => seen.to_string(),
                None => written,
            };
            return Err(LockError::Held { path: path.to_path_buf(), pid, command });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    // A POSIX record lock beside the flock, only so that others can ask the kernel who holds
    // the file (F_GETLK answers with the pid in the asker's namespace). This process never
    // opens the file again, so the record lock lives as long as the flock.
    set_record_lock(&file);
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{} {command}", std::process::id()).map_err(io)?;
    file.flush().map_err(io)?;
    Ok(HostLock { _file: file })
}

fn flock_struct(type_: libc::c_int) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value (whole file from offset 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = type_ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

fn set_record_lock(file: &File) {
    use std::os::fd::AsRawFd;
    let fl = flock_struct(libc::F_WRLCK);
    // SAFETY: a valid open descriptor and a pointer to a live flock struct.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "no record lock: holders will be named by their own pid");
    }
}

/// The pid (in this process's pid namespace) of whoever holds the record lock, if anyone
/// visible does.
fn holder_pid(file: &File) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut fl = flock_struct(libc::F_WRLCK);
    // SAFETY: a valid open descriptor and a pointer to a live flock struct the kernel fills.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut fl) };
    (rc == 0 && fl.l_type != libc::F_UNLCK as libc::c_short && fl.l_pid > 0).then_some(fl.l_pid)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("virtwarden.lock");
        let _held = acquire(&path, "run").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        match acquire(&path, "apply") {
            Err(LockError::Held { pid, command, .. }) => {
                assert_eq!(pid, std::process::id().to_string());
                assert_eq!(command, "run");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "x").unwrap();
        let path = dir.path().join("virtwarden.lock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(acquire(&path, "run"), Err(LockError::Io { .. })));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "x");
    }
}
