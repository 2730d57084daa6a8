//! Which paths that domains' `startup.requires.paths` name are missing on this host (storage
//! not mounted yet). The planner gets the answer as a value.

use std::collections::HashSet;
use std::path::Path;

use virtwarden_policies::DesiredState;

/// The required paths of `desired` that do not exist now. A path that cannot be checked
/// (permission denied, I/O error) counts as missing: a start waits rather than fail.
pub fn missing_paths(desired: &DesiredState) -> HashSet<String> {
    desired
        .domains
        .iter()
        .filter_map(|d| d.spec.startup.as_ref()?.requires.as_ref())
        .flat_map(|r| r.paths.iter())
        .filter(|p| !exists(p))
        .cloned()
        .collect()
}

/// Whether `path` exists; one that cannot be checked (permission denied, I/O error) does not.
pub fn exists(path: &str) -> bool {
    Path::new(path).try_exists().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use virtwarden_policies::{load_texts, DesiredState};

    use super::*;

    #[test]
    fn reports_only_missing_required_paths() {
        let dir = tempfile::tempdir().unwrap();
        let here = dir.path().join("images");
        std::fs::create_dir(&here).unwrap();
        let gone = dir.path().join("nfs/disk.img");
        let text = format!(
            "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {{name: t}}\nspec:\n  domains:\n    - name: a\n      startup: {{requires: {{paths: [{}, {}]}}}}\n",
            here.display(),
            gone.display()
        );
        let desired: DesiredState = load_texts([(Path::new("t.yaml"), text.as_str())]).unwrap().desired;
        assert_eq!(missing_paths(&desired), HashSet::from([gone.display().to_string()]));
    }
}
