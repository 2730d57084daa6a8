//! Shared helpers for virtwarden's integration tests: fixture paths and test-driver URIs.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A path under the repository root.
pub fn repo_path(rel: &str) -> PathBuf {
    repo_root().join(rel)
}

/// The libvirt test-driver URI of the example node file (`examples/testbed/node.xml`).
pub fn testbed_uri() -> String {
    format!("test://{}", repo_path("examples/testbed/node.xml").display())
}

/// Sorted entries of a fixture directory.
pub fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.map(|e| e.path()).unwrap_or_else(|e| panic!("bad entry in {}: {e}", dir.display())))
        .collect();
    v.sort();
    v
}
