//! One instance per host: an exclusive lock on `<state-dir>/virtwarden.lock` holding our pid.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another virtwarden is already running (pid {pid}); it holds {}", path.display())]
    Held { path: PathBuf, pid: String },
    #[error("cannot use lock file {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// Held for the life of the process; released when dropped or when the process dies.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

pub fn acquire(state_dir: &Path) -> Result<InstanceLock, LockError> {
    let path = state_dir.join("virtwarden.lock");
    let io = |source| LockError::Io { path: path.clone(), source };
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::Held {
                path: path.clone(),
                pid: if pid.is_empty() { "unknown".into() } else { pid.to_string() },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    file.flush().map_err(io)?;
    Ok(InstanceLock { _file: file })
}
