//! Where log records go: the journal's native protocol when stderr is the journal (systemd sets
//! `JOURNAL_STREAM` to stderr's device and inode), plain text on stderr otherwise.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_journald::{Priority, PriorityMappings};

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`) names this process's stderr. A child that
/// inherited the variable but writes elsewhere (a pipe, a terminal) gets plain text.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(stderr).metadata() else {
        return false;
    };
    journal_stream_matches(&value, meta.dev(), meta.ino())
}

/// `JOURNAL_STREAM`'s `DEVICE:INODE` (both decimal) against a file's device and inode.
pub fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// The journal layer: error → 3, warning → 4, info → 6, debug → 7; fields keep their names
/// upper-cased (`domain` → `DOMAIN`), without the crate's default `F_` prefix. `None` when the
/// journal socket cannot be opened (the caller falls back to text on stderr).
pub fn journald_layer() -> Option<tracing_journald::Layer> {
    let layer = tracing_journald::layer().ok()?;
    Some(layer.with_field_prefix(None).with_syslog_identifier("virtwarden".into()).with_priority_mappings(
        PriorityMappings {
            error: Priority::Error,
            warn: Priority::Warning,
            info: Priority::Informational,
            debug: Priority::Debug,
            trace: Priority::Debug,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_this_very_file() {
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(journal_stream_matches("8:1234\n", 8, 1234));
        assert!(!journal_stream_matches("8:1235", 8, 1234));
        assert!(!journal_stream_matches("9:1234", 8, 1234));
        assert!(!journal_stream_matches("garbage", 8, 1234));
        assert!(!journal_stream_matches("", 8, 1234));
    }
}
