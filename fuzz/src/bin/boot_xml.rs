//! Fuzz target: the boot-order rewrite. The first byte picks the wanted order (distinct devices,
//! as validation guarantees), the rest is the domain XML. A successful rewrite must still be
//! well-formed XML and, read back, boot in exactly the wanted order.

use virtwarden::act::boot_xml::rewrite_boot_order;
use virtwarden::observe::domain_xml::parse_domain_xml;
use virtwarden_policies::BootDevice;

/// A non-empty order of distinct devices from one byte: a permutation index and a length.
fn order_from(byte: u8) -> Vec<BootDevice> {
    let mut pool = vec![BootDevice::Hd, BootDevice::Cdrom, BootDevice::Network, BootDevice::Fd];
    let len = 1 + (byte as usize >> 6);
    let mut pick = byte as usize & 0x3f;
    let mut order = Vec::with_capacity(len);
    for _ in 0..len {
        let i = pick % pool.len();
        pick /= pool.len();
        order.push(pool.remove(i));
    }
    order
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&first, rest)) = data.split_first() else { return };
        let Ok(xml) = std::str::from_utf8(rest) else { return };
        let order = order_from(first);
        let Ok(out) = rewrite_boot_order(xml, &order) else { return };
        let facts = match parse_domain_xml(&out) {
            Ok(f) => f,
            Err(e) => panic!("the rewrite produced XML that does not parse: {e}\n{out}"),
        };
        assert_eq!(facts.boot.order, order, "rewritten boot order differs\n--- in\n{xml}\n--- out\n{out}");
    });
}
