//! Reading files that a domain's definition names (disk images, console logs): the path is not
//! ours, so it may be a FIFO (an open would wait for a writer for ever), a character device
//! (opening `/dev/watchdog` arms it), a socket, or on hung storage. Such files are looked at
//! with `stat` only and reported as "not a regular file"; others are opened
//! `O_NONBLOCK|O_NOFOLLOW` (after resolving symlinks, so the open itself follows none),
//! checked again with `fstat`, and read with a bounded `pread`. [`with_deadline`] runs a read
//! on its own thread so a hung one costs only its finding.

use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one file's checks may take before they are given up as hung.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum GuardedError {
    #[error("{} is {kind}, not a regular file{}; not opened", path.display(), if *block_ok { " or a block device" } else { "" })]
    NotRegular { path: PathBuf, kind: &'static str, block_ok: bool },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} changed while it was opened; not read", path.display())]
    Changed { path: PathBuf },
}

impl GuardedError {
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            GuardedError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// What a file is, in words for findings: `a FIFO`, `a character device`, …
pub fn kind_words(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// An open file that is a regular file (or a block device when allowed), with its metadata.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub meta: Metadata,
    /// The path with symlinks resolved.
    pub real: PathBuf,
}

impl Opened {
    /// Size in bytes (a block device's from its end).
    pub fn size(&self) -> std::io::Result<u64> {
        if self.meta.file_type().is_block_device() {
            use std::io::{Seek, SeekFrom};
            (&self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.meta.len())
        }
    }

    /// Up to `n` bytes from `offset` (pread; never more than `n`).
    pub fn read_at(&self, offset: u64, n: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match self.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }
}

/// Open `path` for reading as described in the module doc. `block_ok`: a block device is
/// acceptable (disks).
pub fn open(path: &Path, block_ok: bool) -> Result<Opened, GuardedError> {
    let io = |source| GuardedError::Io { path: path.to_path_buf(), source };
    let real = std::fs::canonicalize(path).map_err(io)?;
    let before = std::fs::metadata(&real).map_err(io)?;
    let acceptable = |m: &Metadata| m.file_type().is_file() || (block_ok && m.file_type().is_block_device());
    if !acceptable(&before) {
        return Err(GuardedError::NotRegular { path: path.to_path_buf(), kind: kind_words(&before), block_ok });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&real)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !acceptable(&meta) {
        return Err(GuardedError::NotRegular { path: path.to_path_buf(), kind: kind_words(&meta), block_ok });
    }
    if (meta.dev(), meta.ino()) != (before.dev(), before.ino()) {
        return Err(GuardedError::Changed { path: path.to_path_buf() });
    }
    Ok(Opened { file, meta, real })
}

/// Run `f` on a thread of its own; `None` when it has not finished after `deadline` (the
/// thread is left to finish, or hang, alone: only its answer is given up).
pub fn with_deadline<T: Send + 'static>(deadline: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("guarded-read".into()).spawn(move || {
        let _ = tx.send(f());
    });
    if spawned.is_err() {
        return None;
    }
    rx.recv_timeout(deadline).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn fifos_and_character_devices_are_reported_never_opened() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        mkfifo(&fifo);
        // An open of a FIFO without a writer would block this test for ever.
        let e = open(&fifo, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} is a FIFO, not a regular file or a block device; not opened", fifo.display())
        );
        let e = open(Path::new("/dev/zero"), false).unwrap_err();
        assert_eq!(e.to_string(), "/dev/zero is a character device, not a regular file; not opened");
        let link = d.path().join("link");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        assert!(matches!(open(&link, true), Err(GuardedError::NotRegular { kind: "a character device", .. })));
        assert!(matches!(open(d.path(), true), Err(GuardedError::NotRegular { kind: "a directory", .. })));
    }

    #[test]
    fn regular_files_through_symlinks_are_read_within_bounds() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("img");
        std::fs::write(&f, b"0123456789").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let o = open(&link, false).unwrap();
        assert_eq!(o.real, f);
        assert_eq!(o.size().unwrap(), 10);
        assert_eq!(o.read_at(0, 4).unwrap(), b"0123");
        assert_eq!(o.read_at(8, 4).unwrap(), b"89");
    }

    #[test]
    fn a_read_that_hangs_costs_only_its_answer() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        mkfifo(&fifo);
        let p = fifo.clone();
        // A plain blocking open of a FIFO: hangs until a writer comes.
        let got = with_deadline(Duration::from_millis(200), move || std::fs::File::open(&p).is_ok());
        assert_eq!(got, None);
        assert_eq!(with_deadline(Duration::from_secs(30), || 7), Some(7));
        // Let the hung thread finish.
        let _w = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&fifo);
    }
}
