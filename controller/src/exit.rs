//! Process exit codes, part of the command-line interface (documented in `--help` and the
//! docs/cli.md). Shared by the CLI and both front ends, so none of them imports another.

pub const OK: i32 = 0;
pub const RUNTIME: i32 = 1;
pub const INVALID_POLICY: i32 = 2;
pub const DRIFT: i32 = 3;
/// `diagnose` found problems (the same number as drift: "look at the output").
pub const PROBLEMS: i32 = 3;
