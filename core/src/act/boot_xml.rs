//! Rewriting only the boot order of a persistent domain definition. Edits are spliced into the
//! original text at the byte ranges roxmltree reports, so nothing else in the XML changes.
//! The domain's notation is kept: `<os><boot dev=…/>` or per-device `<boot order=…/>`.

use roxmltree::{Document, Node};
use virtwarden_policies::BootDevice;

use crate::observe::domain_xml::{child, device_boot_class, per_device_boot};

#[derive(Debug, thiserror::Error)]
pub enum BootXmlError {
    #[error("domain XML is not well-formed: {0}")]
    Parse(#[from] roxmltree::Error),
    #[error("domain XML has no <os> element")]
    NoOs,
    #[error("boot order wants `{0}` but the domain has no such device (it uses per-device boot order)")]
    NoDevice(BootDevice),
}

struct Edit {
    range: std::ops::Range<usize>,
    text: String,
}

/// `xml` with its boot order replaced by `order`.
pub fn rewrite_boot_order(xml: &str, order: &[BootDevice]) -> Result<String, BootXmlError> {
    let doc = Document::parse(xml)?;
    let root = doc.root_element();
    let per_device = per_device_boot(root);
    let edits = if per_device.is_empty() {
        os_style_edits(xml, root, order)?
    } else {
        per_device_edits(xml, root, &per_device, order)?
    };
    Ok(apply(xml, edits))
}

fn apply(xml: &str, mut edits: Vec<Edit>) -> String {
    edits.sort_by_key(|e| std::cmp::Reverse(e.range.start));
    let mut out = xml.to_string();
    for e in edits {
        out.replace_range(e.range, &e.text);
    }
    out
}

/// The whitespace between the previous sibling and `node` (its indentation line).
fn leading_ws(xml: &str, node: Node) -> std::ops::Range<usize> {
    let start = node.range().start;
    let ws = xml[..start].len() - xml[..start].trim_end_matches([' ', '\t', '\n', '\r']).len();
    start - ws..start
}

/// The indentation of `node`'s own line, e.g. `\n    `.
fn indent_of(xml: &str, node: Node) -> String {
    let ws = &xml[leading_ws(xml, node)];
    match ws.rfind('\n') {
        Some(i) => ws[i..].to_string(),
        None => String::new(),
    }
}

/// Indentation for a new child of `parent`: that of its first element child, or one level
/// deeper than the parent.
fn child_indent(xml: &str, parent: Node) -> String {
    match parent.children().find(Node::is_element) {
        Some(c) => indent_of(xml, c),
        None => format!("{}  ", indent_of(xml, parent)),
    }
}

/// Where to insert before `parent`'s closing tag (after trailing whitespace of the last child).
fn before_close(xml: &str, parent: Node) -> usize {
    let end = parent.range().end;
    let close = xml[..end].rfind("</").unwrap_or(end);
    close - (xml[..close].len() - xml[..close].trim_end_matches([' ', '\t', '\n', '\r']).len())
}

fn os_style_edits(xml: &str, root: Node, order: &[BootDevice]) -> Result<Vec<Edit>, BootXmlError> {
    let os = child(root, "os").ok_or(BootXmlError::NoOs)?;
    if xml[os.range()].trim_end().ends_with("/>") {
        return Err(BootXmlError::NoOs);
    }
    let boots: Vec<Node> = os.children().filter(|n| n.is_element() && n.tag_name().name() == "boot").collect();
    let indent = child_indent(xml, os);
    let new_text: String = order.iter().map(|d| format!("{indent}<boot dev='{d}'/>")).collect();
    let mut edits = Vec::new();
    match boots.first() {
        Some(first) => {
            // Replace the first boot element (with its indentation) by the new list; drop the rest.
            let lead = leading_ws(xml, *first);
            edits.push(Edit { range: lead.start..first.range().end, text: new_text });
            for b in &boots[1..] {
                edits.push(Edit { range: leading_ws(xml, *b).start..b.range().end, text: String::new() });
            }
        }
        None => {
            let at = before_close(xml, os);
            edits.push(Edit { range: at..at, text: new_text });
        }
    }
    Ok(edits)
}

fn per_device_edits(
    xml: &str,
    root: Node,
    current: &[(Node, u32)],
    order: &[BootDevice],
) -> Result<Vec<Edit>, BootXmlError> {
    let devices: Vec<Node> =
        child(root, "devices").map(|d| d.children().filter(Node::is_element).collect()).unwrap_or_default();
    // For each wanted class: the device of that class that already boots first, else the first one.
    let mut chosen: Vec<Node> = Vec::new();
    for class in order {
        let mut with_order: Vec<&(Node, u32)> =
            current.iter().filter(|(d, _)| device_boot_class(*d) == Some(*class)).collect();
        with_order.sort_by_key(|(_, o)| *o);
        let pick = with_order
            .first()
            .map(|(d, _)| *d)
            .or_else(|| devices.iter().copied().find(|d| device_boot_class(*d) == Some(*class)))
            .ok_or(BootXmlError::NoDevice(*class))?;
        chosen.push(pick);
    }
    let mut edits = Vec::new();
    for (dev, _) in current {
        if !chosen.iter().any(|c| c.id() == dev.id()) {
            if let Some(boot) = child(*dev, "boot") {
                edits.push(Edit { range: leading_ws(xml, boot).start..boot.range().end, text: String::new() });
            }
        }
    }
    for (i, dev) in chosen.iter().enumerate() {
        let n = i + 1;
        match child(*dev, "boot") {
            Some(boot) => edits.push(Edit { range: boot.range(), text: format!("<boot order='{n}'/>") }),
            None if xml[dev.range()].ends_with("/>") => {
                // `<interface …/>` has no closing tag to insert before: open it up.
                let end = dev.range().end;
                let tag =
                    &xml[dev.range().start + 1..].split([' ', '\t', '\n', '\r', '/', '>']).next().unwrap_or_default();
                let text = format!(">{}<boot order='{n}'/>{}</{tag}>", child_indent(xml, *dev), indent_of(xml, *dev));
                edits.push(Edit { range: end - 2..end, text });
            }
            None => {
                let at = before_close(xml, *dev);
                edits.push(Edit { range: at..at, text: format!("{}<boot order='{n}'/>", child_indent(xml, *dev)) });
            }
        }
    }
    Ok(edits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::domain_xml::parse_domain_xml;
    use crate::observe::BootStyle;
    use BootDevice::*;

    const OS: &str = "<domain type='kvm'>\n  <name>a</name>\n  <os>\n    <type arch='x86_64'>hvm</type>\n    <boot dev='network'/>\n    <boot dev='hd'/>\n  </os>\n  <devices/>\n</domain>\n";

    #[test]
    fn os_style_replaces_only_boot_lines() {
        let out = rewrite_boot_order(OS, &[Hd, Cdrom]).unwrap();
        assert_eq!(
            out,
            OS.replace("<boot dev='network'/>\n    <boot dev='hd'/>", "<boot dev='hd'/>\n    <boot dev='cdrom'/>")
        );
    }

    #[test]
    fn os_style_inserts_when_absent() {
        let xml = "<domain>\n  <os>\n    <type>hvm</type>\n  </os>\n</domain>";
        let out = rewrite_boot_order(xml, &[Hd]).unwrap();
        assert_eq!(out, "<domain>\n  <os>\n    <type>hvm</type>\n    <boot dev='hd'/>\n  </os>\n</domain>");
    }

    #[test]
    fn per_device_style_is_kept_and_renumbered() {
        let xml = "<domain>\n  <os>\n    <type>hvm</type>\n  </os>\n  <devices>\n    <disk type='file' device='disk'>\n      <target dev='vda'/>\n      <boot order='2'/>\n    </disk>\n    <disk type='file' device='cdrom'>\n      <target dev='sda'/>\n    </disk>\n    <interface type='network'>\n      <source network='default'/>\n      <boot order='1'/>\n    </interface>\n  </devices>\n</domain>";
        let out = rewrite_boot_order(xml, &[Hd, Cdrom]).unwrap();
        let facts = parse_domain_xml(&out).unwrap();
        assert_eq!(facts.boot.style, BootStyle::PerDevice);
        assert_eq!(facts.boot.order, vec![Hd, Cdrom]);
        assert!(out.contains("<target dev='sda'/>\n      <boot order='2'/>\n    </disk>"), "{out}");
        assert!(out.contains("<source network='default'/>\n    </interface>"), "{out}");
        assert!(!out.contains("<os>\n    <type>hvm</type>\n    <boot"), "must not add os-style boot: {out}");
    }

    /// Found while writing the boot_xml fuzz target's invariant (rewritten XML must boot in the
    /// wanted order): the new `<boot>` of a self-closing device went before the previous
    /// element's closing tag, into another device. fuzz/regressions/boot_xml/ keeps the input.
    #[test]
    fn a_self_closing_device_gets_its_boot_element_inside_it() {
        let xml = "<domain>\n  <os><type>hvm</type></os>\n  <devices>\n    <disk device='cdrom'>\n      <boot order='1'/>\n    </disk>\n    <interface type='network'/>\n  </devices>\n</domain>";
        let out = rewrite_boot_order(xml, &[Network, Cdrom]).unwrap();
        assert_eq!(parse_domain_xml(&out).unwrap().boot.order, vec![Network, Cdrom], "{out}");
        assert!(out.contains("<interface type='network'>\n      <boot order='1'/>\n    </interface>"), "{out}");
        assert!(out.contains("<disk device='cdrom'>\n      <boot order='2'/>\n    </disk>"), "{out}");
    }

    #[test]
    fn per_device_without_such_device_is_an_error() {
        let xml =
            "<domain><os><type>hvm</type></os><devices><disk device='disk'><boot order='1'/></disk></devices></domain>";
        assert!(matches!(rewrite_boot_order(xml, &[Network]), Err(BootXmlError::NoDevice(Network))));
    }
}
