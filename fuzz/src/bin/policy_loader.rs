//! Fuzz target: the policy loader on arbitrary text (YAML parsing, schema decoding, validation,
//! merging) and the rendering of its located diagnostics. It must never panic.

use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else { return };
        if let Err(e) = virtwarden_policies::load::load_texts([(Path::new("fuzz.yaml"), text)]) {
            // Rendering slices the source at the reported line and column.
            let _ = e.to_string();
        }
    });
}
