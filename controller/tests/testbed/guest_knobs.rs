//! Guests for health checks: the Linux test guest with its breakage knobs (control listener on
//! port 81, see tests/testbed/build-guest.sh), optionally with a QEMU guest-agent channel, and a
//! diskless firmware-only domain that has nothing to boot.

use std::path::PathBuf;
use std::time::Duration;

use virtwarden::libvirt::LibvirtHost;

use super::{domain_type, guest_dir};

/// Where a domain's serial console is written.
pub fn console_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/log/libvirt/{name}.console"))
}

/// The Linux guest serving HTTP on `ip` (e.g. `10.77.0.2/24`) through `bridge`, with `panic=0`
/// (a panicked kernel hangs instead of rebooting) and no pvpanic device (libvirt is not told),
/// a serial console to [`console_path`], and a guest-agent channel when `agent`.
pub fn define_health_guest(hv: &LibvirtHost, name: &str, bridge: &str, ip: &str, agent: bool) {
    define_guest_with(hv, name, bridge, ip, agent, false);
}

/// [`define_health_guest`] with a pvpanic device: a guest kernel panic is reported to libvirt
/// (CRASHED/PANICKED) and, with the default `on_crash` (destroy), the domain stops.
pub fn define_pvpanic_guest(hv: &LibvirtHost, name: &str, bridge: &str, ip: &str) {
    define_guest_with(hv, name, bridge, ip, false, true);
}

fn define_guest_with(hv: &LibvirtHost, name: &str, bridge: &str, ip: &str, agent: bool, pvpanic: bool) {
    let g = guest_dir();
    let agent_channel =
        if agent { "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>" } else { "" };
    let panic_device = if pvpanic { "<panic model='isa'><address type='isa' iobase='0x505'/></panic>" } else { "" };
    let channel = format!("{agent_channel}{panic_device}");
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>console=ttyS0 quiet panic=0 vw_ip={ip}</cmdline></os><features><acpi/></features>\
         <devices><interface type='bridge'><source bridge='{bridge}'/><model type='virtio'/></interface>\
         <serial type='file'><source path='{}'/></serial>{channel}</devices></domain>",
        g.join("vmlinuz").display(),
        g.join("initrd.gz").display(),
        console_path(name).display(),
    );
    hv.connection().define_domain_xml(&xml).expect("define health guest");
}

/// A diskless, NIC-less domain: SeaBIOS finds nothing to boot, says so on the serial console
/// (`<bios useserial='yes'/>`) and halts; libvirt keeps calling it running.
pub fn define_no_boot_domain(hv: &LibvirtHost, name: &str) {
    let xml = format!(
        "<domain type='{}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/><bios useserial='yes'/></os>\
         <features><acpi/></features>\
         <devices><serial type='file'><source path='{}'/></serial></devices></domain>",
        domain_type(),
        console_path(name).display(),
    );
    hv.connection().define_domain_xml(&xml).expect("define no-boot domain");
}

/// Turn a knob of the guest at `ip` (`kill-http`, `panic`, …); the guest's answer, if any.
pub fn knob(ip: &str, name: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{ip}:81").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET /cgi-bin/{name} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    Some(body)
}
