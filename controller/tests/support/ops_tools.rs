//! The outside tools the operators'-view tests need (promtool, cockpit-ws, cockpit-bridge,
//! chromium, Playwright), found where `make deps-ops` puts them. A missing tool fails the test
//! with what to run: these tests are never skipped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("controller/ has a parent").to_path_buf()
}

/// The workspace's target directory (tools and test output live there).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"))
}

const HINT: &str = "run `make deps-ops` (installs cockpit-ws, cockpit-bridge, chromium and python3-venv, \
                    takes promtool out of Debian's prometheus package into target/tools, and Playwright \
                    into target/playwright-venv)";

fn first_existing(what: &str, candidates: &[PathBuf]) -> PathBuf {
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!("{what} not found (looked at {candidates:?}): {HINT}"),
    }
}

fn on_path(name: &str) -> Vec<PathBuf> {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect()).unwrap_or_default()
}

/// `$PROMTOOL`, then target/tools/promtool, then `promtool` on PATH.
pub fn promtool() -> PathBuf {
    let mut c: Vec<PathBuf> = std::env::var_os("PROMTOOL").map(PathBuf::from).into_iter().collect();
    c.push(target_dir().join("tools/promtool"));
    c.extend(on_path("promtool"));
    first_existing("promtool", &c)
}

/// Debian installs cockpit-ws outside PATH.
pub fn cockpit_ws() -> PathBuf {
    first_existing(
        "cockpit-ws",
        &[PathBuf::from("/usr/lib/cockpit/cockpit-ws"), PathBuf::from("/usr/libexec/cockpit-ws")],
    )
}

pub fn cockpit_bridge() -> PathBuf {
    let mut c = vec![PathBuf::from("/usr/bin/cockpit-bridge")];
    c.extend(on_path("cockpit-bridge"));
    first_existing("cockpit-bridge", &c)
}

/// cockpit.js, which the page loads from Cockpit's own `base1` package.
pub fn cockpit_base1() -> PathBuf {
    let dir = PathBuf::from("/usr/share/cockpit/base1");
    first_existing("Cockpit's base1 package (cockpit-bridge)", &[dir.join("cockpit.js.gz"), dir.join("cockpit.js")]);
    dir
}

/// Debian's chromium (`$CHROMIUM` to use another build).
pub fn chromium() -> PathBuf {
    let mut c: Vec<PathBuf> = std::env::var_os("CHROMIUM").map(PathBuf::from).into_iter().collect();
    c.push(PathBuf::from("/usr/bin/chromium"));
    c.extend(on_path("chromium"));
    first_existing("chromium", &c)
}

/// The venv's python, with Playwright importable.
pub fn playwright_python() -> PathBuf {
    let python = first_existing("Playwright's venv", &[target_dir().join("playwright-venv/bin/python")]);
    let ok = std::process::Command::new(&python)
        .args(["-c", "import playwright.sync_api"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{} cannot import playwright: {HINT}", python.display());
    python
}
