//! libvirt's state reasons as one enum, in the words `virsh domstate --reason` prints, so the
//! planner, the engine and the durable memory compare variants instead of strings.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a domain is in its state. The same word can follow several states (`crashed` after
/// `running`, `paused` or `shut off`); the state itself is kept next to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum StateReason {
    // running
    Booted,
    Migrated,
    Restored,
    FromSnapshot,
    Unpaused,
    MigrationCanceled,
    SaveCanceled,
    Wakeup,
    PostCopy,
    PostCopyFailed,
    // paused
    User,
    Migrating,
    Saving,
    Dumping,
    IoError,
    Watchdog,
    ShuttingDown,
    CreatingSnapshot,
    StartingUp,
    ApiError,
    // shut off
    Shutdown,
    Destroyed,
    Saved,
    Failed,
    Daemon,
    // several states
    Crashed,
    Panicked,
    #[default]
    Unknown,
}

const WORDS: &[(StateReason, &str)] = &[
    (StateReason::Booted, "booted"),
    (StateReason::Migrated, "migrated"),
    (StateReason::Restored, "restored"),
    (StateReason::FromSnapshot, "from snapshot"),
    (StateReason::Unpaused, "unpaused"),
    (StateReason::MigrationCanceled, "migration canceled"),
    (StateReason::SaveCanceled, "save canceled"),
    (StateReason::Wakeup, "event wakeup"),
    (StateReason::PostCopy, "post-copy"),
    (StateReason::PostCopyFailed, "post-copy failed"),
    (StateReason::User, "user"),
    (StateReason::Migrating, "migrating"),
    (StateReason::Saving, "saving"),
    (StateReason::Dumping, "dumping"),
    (StateReason::IoError, "I/O error"),
    (StateReason::Watchdog, "watchdog"),
    (StateReason::ShuttingDown, "shutting down"),
    (StateReason::CreatingSnapshot, "creating snapshot"),
    (StateReason::StartingUp, "starting up"),
    (StateReason::ApiError, "api error"),
    (StateReason::Shutdown, "shutdown"),
    (StateReason::Destroyed, "destroyed"),
    (StateReason::Saved, "saved"),
    (StateReason::Failed, "failed"),
    (StateReason::Daemon, "daemon"),
    (StateReason::Crashed, "crashed"),
    (StateReason::Panicked, "panicked"),
    (StateReason::Unknown, "unknown"),
];

impl StateReason {
    /// The words virsh prints.
    pub fn as_str(self) -> &'static str {
        WORDS.iter().find(|(r, _)| *r == self).map_or("unknown", |(_, w)| w)
    }

    /// The reason for virsh's words; anything else is `Unknown`.
    pub fn from_words(words: &str) -> Self {
        WORDS.iter().find(|(_, w)| *w == words).map_or(StateReason::Unknown, |(r, _)| *r)
    }

    /// A shut-off reason that means the domain died rather than being stopped on purpose.
    pub fn is_failure(self) -> bool {
        matches!(self, StateReason::Crashed | StateReason::Failed | StateReason::Daemon | StateReason::Panicked)
    }

    /// A shut-off reason that says a guest or an admin stopped the domain on purpose.
    pub fn is_deliberate_stop(self) -> bool {
        matches!(self, StateReason::Shutdown | StateReason::Destroyed | StateReason::Saved)
    }

    /// A pause that is an operation in progress (migration, save, dump, snapshot, shutdown,
    /// start-up): it ends on its own and must be left alone.
    pub fn is_operation_in_progress(self) -> bool {
        matches!(
            self,
            StateReason::Migrating
                | StateReason::Saving
                | StateReason::Dumping
                | StateReason::ShuttingDown
                | StateReason::CreatingSnapshot
                | StateReason::StartingUp
                | StateReason::PostCopy
        )
    }
}

impl fmt::Display for StateReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for StateReason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for StateReason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let words = String::deserialize(d)?;
        match WORDS.iter().find(|(_, w)| *w == words) {
            Some((r, _)) => Ok(*r),
            None => Err(serde::de::Error::custom(format!("unknown state reason `{words}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        for (r, w) in WORDS {
            assert_eq!(r.as_str(), *w);
            assert_eq!(StateReason::from_words(w), *r);
        }
        assert_eq!(StateReason::from_words("something new"), StateReason::Unknown);
    }
}
