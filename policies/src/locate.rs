//! Where each value of a YAML stream sits, by document and path (`spec.domains[0].name`), so
//! semantic errors found after deserialization still point at `file:line:column`.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

/// Value positions of one YAML document, keyed by dotted path.
#[derive(Debug, Default, Clone)]
pub struct DocumentIndex {
    positions: HashMap<String, Position>,
    /// Where the document's root node starts.
    pub start: Position,
}

impl DocumentIndex {
    /// The position of `path`, or of its closest ancestor that was written out.
    pub fn find(&self, path: &str) -> Position {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(cut) => p = &p[..cut],
                None => return self.start,
            }
        }
    }
}

enum Frame {
    Map { key: Option<String> },
    Seq { next: usize },
}

/// Index every non-empty document in `text`, in the order serde-saphyr yields them
/// (empty and null documents are skipped, as the deserializer skips them).
/// A syntax error simply ends the index; the deserializer reports it with its own location.
pub fn index_documents(text: &str) -> Vec<DocumentIndex> {
    let mut docs = Vec::new();
    let mut current: Option<DocumentIndex> = None;
    let mut stack: Vec<Frame> = Vec::new();
    let mut path: Vec<String> = Vec::new();
    let mut root_is_null = false;

    for item in Parser::new_from_str(text) {
        let Ok((event, span)) = item else { break };
        let pos = Position { line: span.start.line() as u64, column: span.start.col() as u64 + 1 };
        match event {
            Event::DocumentStart(..) => {
                current = Some(DocumentIndex::default());
                stack.clear();
                path.clear();
                root_is_null = false;
            }
            Event::DocumentEnd => {
                if let Some(doc) = current.take() {
                    if !root_is_null {
                        docs.push(doc);
                    }
                }
            }
            Event::Scalar(value, style, ..) => {
                let Some(doc) = current.as_mut() else {
                    continue;
                };
                if let Some(Frame::Map { key }) = stack.last_mut() {
                    if key.is_none() {
                        *key = Some(value.into_owned());
                        continue;
                    }
                }
                if stack.is_empty() {
                    doc.start = pos;
                    root_is_null =
                        style == ScalarStyle::Plain && matches!(value.as_ref(), "" | "~" | "null" | "Null" | "NULL");
                }
                record(doc, &mut stack, &path, pos);
            }
            Event::Alias(..) => {
                let Some(doc) = current.as_mut() else {
                    continue;
                };
                record(doc, &mut stack, &path, pos);
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                let Some(doc) = current.as_mut() else {
                    continue;
                };
                if let Some(Frame::Map { key: None }) = stack.last() {
                    // A collection used as a mapping key: not something a policy has.
                    // Track it so the structure stays balanced.
                    path.push("?".to_string());
                } else {
                    if stack.is_empty() {
                        doc.start = pos;
                    }
                    let segment = child_segment(&mut stack);
                    let full = join(&path, segment.as_deref());
                    doc.positions.entry(full).or_insert(pos);
                    path.push(segment.unwrap_or_default());
                }
                stack.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Map { key: None }
                } else {
                    Frame::Seq { next: 0 }
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                stack.pop();
                path.pop();
                // The collection we closed was the value of its parent's pending key.
                if let Some(Frame::Map { key }) = stack.last_mut() {
                    *key = None;
                }
            }
            _ => {}
        }
    }
    docs
}

/// The path segment for the next child of the innermost collection, advancing it.
fn child_segment(stack: &mut [Frame]) -> Option<String> {
    match stack.last_mut() {
        Some(Frame::Map { key }) => key.clone().map(|k| format!(".{k}")),
        Some(Frame::Seq { next }) => {
            let seg = format!("[{next}]");
            *next += 1;
            Some(seg)
        }
        None => None,
    }
}

fn record(doc: &mut DocumentIndex, stack: &mut [Frame], path: &[String], pos: Position) {
    let segment = child_segment(stack);
    doc.positions.entry(join(path, segment.as_deref())).or_insert(pos);
    if let Some(Frame::Map { key }) = stack.last_mut() {
        *key = None;
    }
}

fn join(path: &[String], last: Option<&str>) -> String {
    let mut out: String = path.concat();
    if let Some(seg) = last {
        out.push_str(seg);
    }
    out.trim_start_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
apiVersion: virtwarden.io/v1alpha1
spec:
  domains:
    - name: web1
      boot: [hd, usb]
    - name: web2
---
---
metadata: {name: b}
";

    #[test]
    fn finds_nested_values_and_skips_empty_documents() {
        let docs = index_documents(TEXT);
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.find("apiVersion"), Position { line: 1, column: 13 });
        assert_eq!(d.find("spec.domains[0].name"), Position { line: 4, column: 13 });
        assert_eq!(d.find("spec.domains[0].boot[1]"), Position { line: 5, column: 18 });
        assert_eq!(d.find("spec.domains[1].name"), Position { line: 6, column: 13 });
        assert_eq!(docs[1].find("metadata.name"), Position { line: 9, column: 18 });
    }

    #[test]
    fn falls_back_to_the_closest_written_ancestor() {
        let docs = index_documents(TEXT);
        assert_eq!(docs[0].find("spec.domains[1].restart"), Position { line: 6, column: 7 });
        assert_eq!(docs[0].find("nothing.here"), docs[0].start);
    }
}
