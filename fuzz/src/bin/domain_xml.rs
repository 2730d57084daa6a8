//! Fuzz target: reading boot order, interfaces and disks out of a domain XML document. It must
//! never panic, whatever libvirt (or anything posing as it) hands over.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(xml) = std::str::from_utf8(data) else { return };
        let _ = virtwarden::observe::domain_xml::parse_domain_xml(xml);
    });
}
