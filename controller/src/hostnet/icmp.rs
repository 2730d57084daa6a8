//! One ICMP echo (ping) to an address: an unprivileged ICMP socket where the host allows it
//! (`net.ipv4.ping_group_range`), a raw socket otherwise (virtwarden runs as root).

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sockaddr(addr: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; we write the family's fields into it.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        IpAddr::V4(v4) => {
            let sin = &mut ss as *mut _ as *mut libc::sockaddr_in;
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe {
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_addr.s_addr = u32::from_ne_bytes(v4.octets());
            }
            std::mem::size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(v6) => {
            let sin6 = &mut ss as *mut _ as *mut libc::sockaddr_in6;
            // SAFETY: as above, for sockaddr_in6.
            unsafe {
                (*sin6).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*sin6).sin6_addr.s6_addr = v6.octets();
            }
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Whether `addr` answers one echo request within `timeout`.
pub fn echo(addr: IpAddr, timeout: Duration) -> bool {
    let (family, proto, request, reply) = match addr {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8, 0u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8, 129u8),
    };
    for kind in [libc::SOCK_DGRAM, libc::SOCK_RAW] {
        // SAFETY: socket() has no memory arguments; the fd is owned at once.
        let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            continue;
        }
        // SAFETY: fd is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        return exchange(&fd, addr, kind == libc::SOCK_RAW, request, reply, timeout);
    }
    false
}

fn exchange(fd: &OwnedFd, addr: IpAddr, raw: bool, request: u8, reply: u8, timeout: Duration) -> bool {
    let id = (std::process::id() as u16) ^ 0x5657;
    let mut packet = vec![request, 0, 0, 0];
    packet.extend(id.to_be_bytes());
    packet.extend(1u16.to_be_bytes());
    packet.extend(b"virtward");
    if addr.is_ipv4() {
        let c = checksum(&packet);
        packet[2..4].copy_from_slice(&c.to_be_bytes());
    }
    let (to, len) = sockaddr(addr);
    // SAFETY: packet and to outlive the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr() as *const libc::c_void,
            packet.len(),
            0,
            &to as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if sent < 0 {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if ready <= 0 {
            return false;
        }
        let mut from = sockaddr(addr).0;
        let mut from_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: buf and from are valid for the sizes given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut from as *mut _ as *mut libc::sockaddr,
                &mut from_len,
            )
        };
        if n <= 0 {
            continue;
        }
        let got = &buf[..n as usize];
        // A raw IPv4 socket hands us the IP header too.
        let icmp = if raw && addr.is_ipv4() { got.get(usize::from(got[0] & 0x0f) * 4..).unwrap_or(&[]) } else { got };
        let from_ip = match addr {
            IpAddr::V4(_) => {
                let sin = &from as *const _ as *const libc::sockaddr_in;
                // SAFETY: the kernel filled an AF_INET address.
                IpAddr::from(unsafe { (*sin).sin_addr.s_addr }.to_ne_bytes())
            }
            IpAddr::V6(_) => {
                let sin6 = &from as *const _ as *const libc::sockaddr_in6;
                // SAFETY: the kernel filled an AF_INET6 address.
                IpAddr::from(unsafe { (*sin6).sin6_addr.s6_addr })
            }
        };
        // The kernel picks the id of an unprivileged socket and filters replies itself.
        let id_ok = !raw || icmp.get(4..6) == Some(&id.to_be_bytes()[..]);
        if icmp.first() == Some(&reply) && id_ok && from_ip == addr {
            return true;
        }
    }
}
