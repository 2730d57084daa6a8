//! Where log records go: the journal's native protocol when stderr is the journal (systemd sets
//! `JOURNAL_STREAM` to stderr's device and inode), plain text on stderr otherwise.
//!
//! Not tracing-journald: it sends only the event's message as `MESSAGE`, so `journalctl -u
//! virtwarden` would show "quarantined: no more automatic repairs" without the domain and
//! "policy reload rejected" without where. Here `MESSAGE` reads like the text log without its
//! timestamp and level (`quarantined: no more automatic repairs domain=vm1 reason=…`), and every
//! field is a journal field too (`DOMAIN=vm1`), with the priority of its level.

use std::fmt;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// journald's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

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

/// Sends each event as one journal entry.
pub struct JournalLayer {
    socket: UnixDatagram,
}

impl JournalLayer {
    /// Connect to journald's socket; the caller falls back to text on stderr when this fails.
    pub fn connect() -> std::io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(JOURNAL_SOCKET)?;
        Ok(JournalLayer { socket })
    }
}

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let entry = entry(*meta.level(), meta.target(), meta.file(), meta.line(), &fields);
        // Nothing sensible to do when the journal is gone: a log call must not fail the caller.
        let _ = self.socket.send(&entry);
    }
}

/// An event's message and its other fields, as text.
#[derive(Debug, Default)]
pub struct Fields {
    pub message: String,
    pub fields: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"))
    }
}

/// syslog priority of a level: error 3, warning 4, info 6, debug and trace 7.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// The journal entry (native protocol) for one event.
pub fn entry(level: Level, target: &str, file: Option<&str>, line: Option<u32>, f: &Fields) -> Vec<u8> {
    let mut text = f.message.clone();
    for (k, v) in &f.fields {
        if !text.is_empty() {
            text.push(' ');
        }
        if v.contains(char::is_whitespace) && !v.contains('\n') {
            text.push_str(&format!("{k}={v:?}"));
        } else {
            text.push_str(&format!("{k}={v}"));
        }
    }
    let mut buf = Vec::with_capacity(text.len() + 256);
    put(&mut buf, "MESSAGE", &text);
    put(&mut buf, "PRIORITY", &priority(level).to_string());
    put(&mut buf, "SYSLOG_IDENTIFIER", "virtwarden");
    put(&mut buf, "TARGET", target);
    if let Some(file) = file {
        put(&mut buf, "CODE_FILE", file);
    }
    if let Some(line) = line {
        put(&mut buf, "CODE_LINE", &line.to_string());
    }
    for (k, v) in &f.fields {
        if let Some(name) = field_name(k) {
            put(&mut buf, &name, v);
        }
    }
    buf
}

/// A journal field name: upper case letters, digits and `_`, not starting with `_` or a digit
/// (journald drops others); names of the entry's own fields get an `F_` prefix.
pub fn field_name(name: &str) -> Option<String> {
    let upper: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    let trimmed = upper.trim_start_matches(|c: char| c == '_' || c.is_ascii_digit());
    if trimmed.is_empty() {
        return None;
    }
    let own = ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "TARGET", "CODE_FILE", "CODE_LINE"];
    Some(if own.contains(&trimmed) { format!("F_{trimmed}") } else { trimmed.to_string() })
}

/// `NAME=value\n`, or for a value with a newline the binary form `NAME\n<u64 LE length>value\n`.
fn put(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
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

    #[test]
    fn an_entry_has_the_priority_the_fields_and_a_message_naming_them() {
        let f = Fields {
            message: "quarantined: no more automatic repairs".into(),
            fields: vec![("domain".into(), "vm1".into()), ("reason".into(), "3 restarts in 10m".into())],
        };
        let e = String::from_utf8(entry(Level::ERROR, "virtwarden::engine", Some("w.rs"), Some(7), &f)).unwrap();
        let lines: Vec<&str> = e.lines().collect();
        assert!(
            lines.contains(&"MESSAGE=quarantined: no more automatic repairs domain=vm1 reason=\"3 restarts in 10m\""),
            "{e}"
        );
        for want in
            ["PRIORITY=3", "DOMAIN=vm1", "REASON=3 restarts in 10m", "SYSLOG_IDENTIFIER=virtwarden", "CODE_LINE=7"]
        {
            assert!(lines.contains(&want), "{want} missing: {e}");
        }
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
    }

    #[test]
    fn a_value_with_newlines_uses_the_binary_form() {
        let value = "a.yaml:1:2: x\n  | y";
        let f = Fields { message: "rejected".into(), fields: vec![("error".into(), value.into())] };
        let e = entry(Level::ERROR, "t", None, None, &f);
        let mut want = b"ERROR\n".to_vec();
        want.extend_from_slice(&(value.len() as u64).to_le_bytes());
        want.extend_from_slice(b"a.yaml:1:2: x\n  | y\n");
        assert!(e.windows(want.len()).any(|w| w == want.as_slice()), "{:?}", String::from_utf8_lossy(&e));
    }

    #[test]
    fn field_names_follow_journald_rules() {
        assert_eq!(field_name("domain").as_deref(), Some("DOMAIN"));
        assert_eq!(field_name("state_dir").as_deref(), Some("STATE_DIR"));
        assert_eq!(field_name("_x.y").as_deref(), Some("X_Y"));
        assert_eq!(field_name("message").as_deref(), Some("F_MESSAGE"));
        assert_eq!(field_name("__"), None);
    }
}
