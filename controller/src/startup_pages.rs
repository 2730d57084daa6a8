//! Hand back the pages only start-up needed. What stays resident in an idle service is not its
//! heap (a few MiB) but file pages: the code of the binary and of libvirt's library chain
//! (libvirt, libxml2, gnutls, libcrypto, ICU, glib) that library constructors, argument parsing
//! and policy loading touched once, plus the kernel's fault-around of 64 KiB at every touch.
//! Once the first resync is done those pages are idle; `MADV_PAGEOUT` on the read-only file
//! mappings gives them back. They are clean: the kernel reads a page again if it is ever
//! needed, and pages other processes map (a shared libvirt under libvirtd) are left alone.
//! Writable mappings (data, heap, stacks) are never touched. (docs/benchmarks.md, idle memory.)

/// What was advised: the mappings and their total size (an upper bound of what the kernel
/// paged out: it skips pages other processes map).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HandedBack {
    pub mappings: usize,
    pub bytes: u64,
}

/// The read-only file mappings of `/proc/self/maps` text: `(start, end)` of each line whose
/// path is a file and whose permissions have no `w`.
pub fn read_only_file_mappings(maps: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let path = f.nth(3)?;
            if !path.starts_with('/') || !perms.starts_with('r') || perms.as_bytes().get(1) != Some(&b'-') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
            (b > a).then_some((a, b))
        })
        .collect()
}

/// Advise the kernel to page out this process's read-only file mappings. Best effort: a kernel
/// without `MADV_PAGEOUT` (before 5.4) or a refused range hands back less, never fails.
pub fn hand_back() -> HandedBack {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return HandedBack::default();
    };
    let mut done = HandedBack::default();
    for (start, end) in read_only_file_mappings(&maps) {
        if pageout(start, end - start) {
            done.mappings += 1;
            done.bytes += (end - start) as u64;
        }
    }
    done
}

#[cfg(target_os = "linux")]
fn pageout(start: usize, len: usize) -> bool {
    // SAFETY: MADV_PAGEOUT on a range of our own file-backed read-only mappings changes no
    // contents: clean pages are dropped from our page tables and read again when touched.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn pageout(_: usize, _: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_file_mappings_are_chosen() {
        let maps = "\
5562f2e2c000-5562f2f00000 r--p 00000000 fd:01 123 /usr/bin/virtwarden
5562f2f00000-5562f3a00000 r-xp 000d4000 fd:01 123 /usr/bin/virtwarden
5562f3a00000-5562f3a10000 rw-p 00bd4000 fd:01 123 /usr/bin/virtwarden
5562f4000000-5562f4100000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 r--p 00000000 00:00 0
7f0000001000-7f0000002000 r-xp 00000000 fd:01 9 /usr/lib/x86_64-linux-gnu/libvirt.so.0 (deleted)
7ffc0e400000-7ffc0e42a000 rw-p 00000000 00:00 0 [stack]
7ffc0e5fe000-7ffc0e600000 r-xp 00000000 00:00 0 [vdso]
garbage line
";
        assert_eq!(
            read_only_file_mappings(maps),
            vec![(0x5562f2e2c000, 0x5562f2f00000), (0x5562f2f00000, 0x5562f3a00000), (0x7f0000001000, 0x7f0000002000)]
        );
    }

    #[test]
    fn the_kernel_takes_the_advice_for_this_process() {
        // Linux 5.4+ (CI's kernel): every read-only file mapping of this test binary is advised;
        // the code paged out here is read again as the test goes on.
        let done = hand_back();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(done.mappings > 0, "{done:?}");
        assert!(done.mappings >= read_only_file_mappings(&maps).len() / 2, "{done:?}");
    }
}
