//! Loading policy files and directories into one [`DesiredState`], all or nothing.
//! Every problem is reported as `file:line:column: message` with a hint, never half-loaded.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::dependencies::check_dependencies;
use crate::desired::DesiredState;
use crate::locate::{index_documents, DocumentIndex, Position};
use crate::merge::{merge, Site};
use crate::trust::{self, TrustError, TrustMode, TrustedOwners};
use crate::types::HostPolicy;
use crate::validate::validate_document;

/// Files larger than this are refused rather than parsed (a policy is a few KiB).
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// All policy files of one load together.
pub const MAX_TOTAL_BYTES: u64 = 64 * 1024 * 1024;

/// One located problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub position: Position,
    pub message: String,
    pub hint: Option<String>,
    /// The offending source line, for a caret display.
    pub source_line: Option<String>,
}

impl Diagnostic {
    /// `file:line:column: message`, the first line of the display.
    pub fn headline(&self) -> String {
        format!("{}:{}:{}: {}", self.file.display(), self.position.line, self.position.column, self.message)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.headline())?;
        if let Some(line) = &self.source_line {
            let gutter = self.position.line.to_string().len();
            let caret_pad: String = line
                .chars()
                .take(self.position.column.saturating_sub(1) as usize)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            write!(f, "\n {:>gutter$} | {line}\n {:>gutter$} | {caret_pad}^", self.position.line, "")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Why loading failed. Nothing of a failed load is used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("{}", render_diagnostics(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("{}", render_untrusted(.0))]
    Untrusted(Vec<TrustError>),
    #[error("policy files hold more than {MAX_TOTAL_BYTES} bytes together; {} would exceed it", path.display())]
    TooLarge { path: PathBuf },
}

impl LoadError {
    /// The located problems, if this is a validation failure.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            LoadError::Invalid(d) => d,
            _ => &[],
        }
    }
}

/// The hint shown with ownership problems.
pub const TRUST_HINT: &str = "policy files and every directory above them must be owned by root (or the user virtwarden runs as) and not writable by group or others, because virtwarden acts on them as root: e.g. `chown root: PATH && chmod go-w PATH`";

fn render_untrusted(problems: &[TrustError]) -> String {
    let mut out = String::new();
    for p in problems {
        out.push_str(&format!("{p}\n"));
    }
    out.push_str(&format!("  hint: {TRUST_HINT}\nno policy was loaded"));
    out
}

fn render_diagnostics(diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diags {
        out.push_str(&d.to_string());
        out.push('\n');
    }
    let n = diags.len();
    out.push_str(&format!("{n} error{} found; no policy was loaded", if n == 1 { "" } else { "s" }));
    out
}

/// A parsed policy document and where it came from.
#[derive(Debug, Clone)]
pub struct SourcedPolicy {
    pub file: PathBuf,
    pub policy: HostPolicy,
    index: DocumentIndex,
    text_line: Vec<String>,
}

/// The result of a successful load.
#[derive(Debug, Clone)]
pub struct LoadedPolicies {
    pub desired: DesiredState,
    pub documents: Vec<SourcedPolicy>,
    pub files: Vec<PathBuf>,
    /// Ownership problems found under [`TrustMode::Warn`] (the load went ahead).
    pub warnings: Vec<String>,
}

/// The policy files named by `paths`: files as given, directories' `*.yaml`/`*.yml` (not
/// recursive, hidden files skipped) in name order. A directory entry that is a symlink is
/// followed (configuration tools link files into place); the ownership rules then apply to its
/// target and the target's directories.
pub fn policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => LoadError::Missing { path: path.clone() },
            _ => LoadError::Read { path: path.clone(), source },
        })?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|source| LoadError::Read { path: path.clone(), source })?;
            let mut found = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| LoadError::Read { path: path.clone(), source })?;
                let p = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
                if yaml && !name.starts_with('.') && p.is_file() {
                    found.push(p);
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Load, validate and merge every policy under `paths`. All or nothing. Ownership is not
/// checked; see [`load_paths_with`].
pub fn load_paths(paths: &[PathBuf]) -> Result<LoadedPolicies, LoadError> {
    load_paths_with(paths, TrustMode::Off)
}

/// [`load_paths`], checking first that the files and their directories pass the ownership rules
/// of [`crate::trust`] as `mode` says.
pub fn load_paths_with(paths: &[PathBuf], mode: TrustMode) -> Result<LoadedPolicies, LoadError> {
    let files = policy_files(paths)?;
    let mut untrusted = Vec::new();
    if let Some(owners) = mode.owners() {
        // A directory is checked even when it holds no policy yet: whoever can write it can add one.
        for dir in paths.iter().filter(|p| p.is_dir()) {
            if let Err(e) = trust::check_dir(dir, owners) {
                untrusted.push(e);
            }
        }
    }
    let mut texts = Vec::with_capacity(files.len());
    let mut total = 0u64;
    for file in &files {
        let text = read_policy_file(file, mode.owners(), &mut untrusted)?;
        total += text.len() as u64;
        if total > MAX_TOTAL_BYTES {
            return Err(LoadError::TooLarge { path: file.clone() });
        }
        texts.push((file.clone(), text));
    }
    // One problem per path: a shared directory is named once, not once per file in it.
    let mut seen = std::collections::HashSet::new();
    untrusted.retain(|e| seen.insert(e.path().to_path_buf()));
    if matches!(mode, TrustMode::Enforce(_)) && !untrusted.is_empty() {
        return Err(LoadError::Untrusted(untrusted));
    }
    let mut loaded = load_texts(texts.iter().map(|(f, t)| (f.as_path(), t.as_str())))?;
    loaded.warnings = untrusted.iter().map(ToString::to_string).collect();
    Ok(loaded)
}

/// Load from in-memory `(file name, text)` pairs; same rules as [`load_paths`].
pub fn load_texts<'a>(inputs: impl IntoIterator<Item = (&'a Path, &'a str)>) -> Result<LoadedPolicies, LoadError> {
    let mut diagnostics = Vec::new();
    let mut documents = Vec::new();
    let mut files = Vec::new();
    for (file, text) in inputs {
        files.push(file.to_path_buf());
        match parse_text(file, text) {
            Ok(docs) => documents.extend(docs),
            Err(d) => diagnostics.extend(d),
        }
    }
    for doc in &documents {
        for issue in validate_document(&doc.policy) {
            diagnostics.push(doc.diagnostic(&issue.path, issue.message, issue.hint));
        }
    }
    if !diagnostics.is_empty() {
        return Err(LoadError::Invalid(diagnostics));
    }
    let policies: Vec<HostPolicy> = documents.iter().map(|d| d.policy.clone()).collect();
    let (desired, conflicts) = merge(&policies);
    for c in conflicts {
        let first = locate(&documents, &c.first);
        let second = &documents[c.second.document];
        diagnostics.push(second.diagnostic(
            &c.second.path,
            format!("{} is already declared at {first}", c.subject),
            Some("each domain, bridge, port, forwarding switch and policy name may be declared once across all policy files".into()),
        ));
    }
    for issue in check_dependencies(&policies) {
        let doc = &documents[issue.site.document];
        diagnostics.push(doc.diagnostic(&issue.site.path, issue.message, Some(issue.hint)));
    }
    if !diagnostics.is_empty() {
        return Err(LoadError::Invalid(diagnostics));
    }
    Ok(LoadedPolicies { desired, documents, files, warnings: Vec::new() })
}

fn locate(documents: &[SourcedPolicy], site: &Site) -> String {
    let doc = &documents[site.document];
    let pos = doc.index.find(&site.path);
    format!("{}:{}:{}", doc.file.display(), pos.line, pos.column)
}

/// Read one policy file through a single descriptor: its ownership (when `owners` is set), its
/// type and its size are judged on the open file and the bytes read from that same file, so
/// nothing can be swapped or grown between the checks and the read.
fn read_policy_file(
    file: &Path,
    owners: Option<TrustedOwners>,
    untrusted: &mut Vec<TrustError>,
) -> Result<String, LoadError> {
    let read_err = |source| LoadError::Read { path: file.to_path_buf(), source };
    // With ownership checked, open the resolved path once its directories passed: nobody else
    // can then redirect it. Otherwise open as named.
    let mut open_path = file.to_path_buf();
    if let Some(owners) = owners {
        match trust::resolve(file).and_then(|r| trust::check_ancestors(&r, owners).map(|()| r)) {
            Ok(resolved) => open_path = resolved,
            Err(e) => untrusted.push(e),
        }
    }
    // O_NONBLOCK: a FIFO put in a file's place must not hang the load; it fails the type check.
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&open_path).map_err(read_err)?;
    let meta = f.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
    }
    if let Some(owners) = owners {
        if let Err(e) = trust::check_metadata(&open_path, &meta, owners) {
            untrusted.push(e);
        }
    }
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(LoadError::Invalid(vec![Diagnostic {
            file: file.to_path_buf(),
            position: Position { line: 1, column: 1 },
            message: format!("file is larger than {MAX_FILE_BYTES} bytes, the limit for a policy file"),
            hint: Some("split it into several files in a policy directory".into()),
            source_line: None,
        }]));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let text = String::from_utf8_lossy(valid);
        let line = text.matches('\n').count() as u64 + 1;
        let column = text.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u64 + 1;
        LoadError::Invalid(vec![Diagnostic {
            file: file.to_path_buf(),
            position: Position { line, column },
            message: "file is not valid UTF-8".into(),
            hint: Some("save the policy as UTF-8 text".into()),
            source_line: None,
        }])
    })
}

/// Parse one file's text into documents (no semantic validation).
pub fn parse_text(file: &Path, text: &str) -> Result<Vec<SourcedPolicy>, Vec<Diagnostic>> {
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let policies: Vec<HostPolicy> = match serde_saphyr::from_str_multiple(text) {
        Ok(p) => p,
        Err(err) => {
            let pos = err
                .location()
                .map(|l| Position { line: l.line(), column: l.column() })
                .unwrap_or(Position { line: 1, column: 1 });
            let message = bare_message(&err, pos);
            let hint = hint_for(&message);
            return Err(vec![Diagnostic {
                file: file.to_path_buf(),
                position: pos,
                source_line: lines.get(pos.line.saturating_sub(1) as usize).cloned(),
                message,
                hint,
            }]);
        }
    };
    let indexes = index_documents(text);
    Ok(policies
        .into_iter()
        .enumerate()
        .map(|(i, policy)| SourcedPolicy {
            file: file.to_path_buf(),
            policy,
            index: indexes.get(i).cloned().unwrap_or_default(),
            text_line: lines.clone(),
        })
        .collect())
}

impl SourcedPolicy {
    /// Where `path` (e.g. `spec.domains[0].name`) of this document sits.
    pub fn position(&self, path: &str) -> Position {
        self.index.find(path)
    }

    /// A located diagnostic for `path` in this document.
    pub fn diagnostic(&self, path: &str, message: String, hint: Option<String>) -> Diagnostic {
        let position = self.position(path);
        Diagnostic {
            file: self.file.clone(),
            position,
            message,
            hint,
            source_line: self.text_line.get(position.line.saturating_sub(1) as usize).cloned(),
        }
    }
}

/// serde-saphyr's message without its own location suffix.
fn bare_message(err: &serde_saphyr::Error, pos: Position) -> String {
    let text = err.without_snippet().to_string();
    let suffix = format!(" at line {}, column {}", pos.line, pos.column);
    let text = text.strip_suffix(&suffix).unwrap_or(&text).trim();
    // Reword the parser's terse or implementation-facing messages for people.
    let reworded = match text {
        "invalid u16" => "expected a whole number from 0 to 65535".to_string(),
        "invalid u32" => "expected a whole number from 0 to 4294967295".to_string(),
        "invalid boolean" => "expected true or false".to_string(),
        "expected sequence start" => "expected a list".to_string(),
        "expected mapping start" => "expected a mapping of `key: value` pairs".to_string(),
        other => match other.split_once(", set DuplicateKeyPolicy") {
            Some((head, _)) => head.to_string(),
            None => other.to_string(),
        },
    };
    reworded
}

/// A hint for the common serde errors, keyed on their stable wording.
fn hint_for(message: &str) -> Option<String> {
    let hint = if message.starts_with("unknown field") {
        "fix the spelling or remove the field; names are camelCase (e.g. forwardDelay); `virtwarden schema` prints every field"
    } else if message.starts_with("unknown variant") {
        "use one of the listed values"
    } else if message.starts_with("missing field") {
        "add the field; `virtwarden schema` shows which fields are required"
    } else if message.contains("durations are at most") {
        "no policy duration needs more than 100 years; each field has a much smaller bound (see docs/policy-reference.md, \"Bounds\")"
    } else if message.contains("invalid duration") {
        "write durations like 500ms, 30s, 5m, 1h or 1h30m"
    } else if message.starts_with("invalid type") || message.starts_with("expected") {
        "check the value's type against `virtwarden schema`"
    } else if message.contains("duplicate") {
        "remove one of the duplicate keys"
    } else {
        "check the YAML syntax near this position (indentation, quotes, brackets)"
    };
    Some(hint.to_string())
}
