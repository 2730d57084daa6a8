//! A guest's serial console log: what the firmware printed. Used as evidence that a guest has
//! nothing to boot (SeaBIOS, OVMF) by health checks and by `diagnose`. Pure text scanning plus
//! a bounded read of the log's tail.

use std::path::Path;

/// How much of a console log's end is read: firmware messages are short and recent.
pub const TAIL_BYTES: u64 = 64 * 1024;

/// Firmware messages that mean "nothing to boot", with the words shown to people.
const FIRMWARE_BOOT_FAILURES: &[(&str, &str)] = &[
    ("No bootable device", "SeaBIOS: No bootable device"),
    ("Boot failed", "SeaBIOS: Boot failed"),
    ("No bootable option or device", "OVMF: No bootable option or device"),
];

/// Messages after which the firmware halts: nothing more will be tried.
const FINAL: &[&str] = &["SeaBIOS: No bootable device", "OVMF: No bootable option or device"];

/// The firmware boot failure the text shows, if any (the last one printed wins). A device that
/// failed before the firmware went on to boot from another one (`Booting from …` printed after
/// it) is not a boot failure.
pub fn firmware_boot_failure(text: &str) -> Option<FirmwareFailure> {
    let mut found: Option<(usize, &str)> = None;
    let next_attempt = text.rfind("Booting from");
    for (needle, words) in FIRMWARE_BOOT_FAILURES {
        if let Some(at) = text.rfind(needle).filter(|at| next_attempt.is_none_or(|b| *at > b)) {
            if found.is_none_or(|(best, _)| at > best) {
                found = Some((at, words));
            }
        }
    }
    let (at, words) = found?;
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find(['\n', '\r']).map_or(text.len(), |i| at + i);
    let line = crate::guest_text::clean(&text[line_start..line_end], crate::guest_text::CONSOLE_EXCERPT);
    Some(FirmwareFailure { summary: words.to_string(), line })
}

/// A firmware boot failure found in a console log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareFailure {
    /// e.g. `SeaBIOS: No bootable device`.
    pub summary: String,
    /// The console line it was found on: the guest's text, cleaned and bounded
    /// ([`crate::guest_text::clean`]).
    pub line: String,
}

impl FirmwareFailure {
    /// The firmware gave up (it halts): no later device will be tried.
    pub fn is_final(&self) -> bool {
        FINAL.contains(&self.summary.as_str())
    }
}

/// The last [`TAIL_BYTES`] of a console log as text (invalid UTF-8 replaced). The path comes
/// from the domain's definition: a FIFO, device or socket there is an error, never opened.
/// The text is the guest's: clean it ([`crate::guest_text`]) before showing any of it.
pub fn read_tail(path: &Path) -> std::io::Result<String> {
    let f = super::guarded::open(path, false).map_err(|e| match e {
        super::guarded::GuardedError::Io { source, .. } => source,
        other => std::io::Error::new(std::io::ErrorKind::InvalidInput, other.to_string()),
    })?;
    let len = f.size()?;
    let start = len.saturating_sub(TAIL_BYTES);
    let buf = f.read_at(start, usize::try_from(len - start).unwrap_or(0))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seabios_and_ovmf_failures_are_recognised() {
        let seabios = "SeaBIOS (version 1.16)\r\nBooting from Hard Disk...\r\nBoot failed: could not read the boot disk\r\n\r\nNo bootable device.\r\n";
        let f = firmware_boot_failure(seabios).unwrap();
        assert_eq!(f.summary, "SeaBIOS: No bootable device");
        assert_eq!(f.line, "No bootable device.");
        let ovmf = "BdsDxe: No bootable option or device was found.\n";
        assert_eq!(firmware_boot_failure(ovmf).unwrap().summary, "OVMF: No bootable option or device");
        assert_eq!(firmware_boot_failure("Linux version 6.1\nlogin:"), None);
    }

    #[test]
    fn a_failed_device_followed_by_the_next_boot_attempt_is_not_a_failure_and_only_halts_are_final() {
        let cd_then_disk = "Booting from DVD/CD...\r\nBoot failed: Could not read from CDROM (code 0003)\r\nBooting from Hard Disk...\r\n";
        assert_eq!(firmware_boot_failure(cd_then_disk), None, "the disk boot is still going");
        let failed = format!("{cd_then_disk}Boot failed: could not read the boot disk\r\n");
        let f = firmware_boot_failure(&failed).unwrap();
        assert_eq!(f.summary, "SeaBIOS: Boot failed");
        assert!(!f.is_final(), "SeaBIOS may still try another device");
        let halted = format!("{failed}\r\nNo bootable device.\r\n");
        assert!(firmware_boot_failure(&halted).unwrap().is_final());
    }

    #[test]
    fn the_line_shown_is_cleaned_and_bounded() {
        let text = format!("\u{1b}]0;pwned\u{7}\u{1b}[31mNo bootable device.{}\u{1b}[0m\r\n", "A".repeat(1 << 20));
        let f = firmware_boot_failure(&text).unwrap();
        assert!(f.line.starts_with("No bootable device.AAA"), "{}", &f.line[..40]);
        assert_eq!(f.line.chars().count(), crate::guest_text::CONSOLE_EXCERPT);
        assert!(!f.line.contains('\u{1b}'));
    }

    #[test]
    fn reads_only_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        let mut text = "x".repeat(TAIL_BYTES as usize * 2);
        text.push_str("\nNo bootable device.\n");
        std::fs::write(&p, &text).unwrap();
        let tail = read_tail(&p).unwrap();
        assert_eq!(tail.len() as u64, TAIL_BYTES);
        assert!(firmware_boot_failure(&tail).is_some());
    }

    #[test]
    fn a_console_path_that_is_no_regular_file_is_an_error_not_an_open() {
        let e = read_tail(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e.to_string(), "/dev/zero is a character device, not a regular file; not opened");
    }
}
