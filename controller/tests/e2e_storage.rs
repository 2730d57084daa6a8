//! End to end on the private libvirtd with real QEMU: hung storage costs only its domain. 16
//! domains require paths on a FUSE mount whose server answers nothing after FUSE_INIT (every
//! `stat` under it blocks, like a dead NFS server); a domain that needs none of it still starts
//! at once, the status file keeps being written and `/healthz` stays ok (the engine makes
//! progress). The mount lives in the testbed's private mount namespace; the test aborts the
//! FUSE connection (closing its device) and unmounts it, and the namespace dies with the test.

mod testbed;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testbed::*;

const T: Duration = Duration::from_secs(60);
/// Generous: a start takes a second or two here; the old main never started it at all. Under the
/// daemon's 60 s resync, so the start follows the definition, not a resync.
const START_BOUND: Duration = Duration::from_secs(40);
const HUNG: usize = 16;

/// A FUSE file system that answers FUSE_INIT and then nothing: lookups under it block until the
/// connection is aborted. Dropping it aborts the connection (its device is closed) and
/// unmounts it.
struct HungMount {
    dir: PathBuf,
    dev: Option<std::fs::File>,
}

const FUSE_INIT: u32 = 26;

impl HungMount {
    fn mount(dir: &Path) -> HungMount {
        let node = fuse_device();
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", node.display()));
        std::fs::create_dir_all(dir).unwrap();
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let opts = CString::new(format!("fd={},rootmode=40000,user_id=0,group_id=0", dev.as_raw_fd())).unwrap();
        // SAFETY: valid NUL-terminated strings; mounts only in the testbed's own mount namespace.
        let rc = unsafe {
            libc::mount(
                c"vw-hung".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount -t fuse {}: {}", dir.display(), std::io::Error::last_os_error());
        // The kernel's first request is FUSE_INIT: answer it, and nothing after.
        let mut buf = vec![0u8; 1 << 20];
        let n = dev.read(&mut buf).expect("read FUSE_INIT");
        let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
        assert!(n >= 56 && u32_at(4) == FUSE_INIT, "expected FUSE_INIT, got opcode {}", u32_at(4));
        let unique = u64::from_ne_bytes(buf[8..16].try_into().unwrap());
        let (major, minor, readahead) = (u32_at(40), u32_at(44), u32_at(48));
        assert_eq!(major, 7, "FUSE protocol major version");
        // fuse_out_header (16 bytes) + fuse_init_out (64 bytes).
        let mut reply = Vec::with_capacity(80);
        reply.extend_from_slice(&80u32.to_ne_bytes());
        reply.extend_from_slice(&0i32.to_ne_bytes());
        reply.extend_from_slice(&unique.to_ne_bytes());
        reply.extend_from_slice(&7u32.to_ne_bytes());
        reply.extend_from_slice(&minor.min(31).to_ne_bytes());
        reply.extend_from_slice(&readahead.to_ne_bytes());
        reply.extend_from_slice(&0u32.to_ne_bytes()); // flags
        reply.extend_from_slice(&16u16.to_ne_bytes()); // max_background
        reply.extend_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
        reply.extend_from_slice(&4096u32.to_ne_bytes()); // max_write
        reply.extend_from_slice(&1u32.to_ne_bytes()); // time_gran
        reply.resize(80, 0);
        dev.write_all(&reply).expect("answer FUSE_INIT");
        HungMount { dir: dir.to_path_buf(), dev: Some(dev) }
    }
}

/// The FUSE device: /dev/fuse, after `modprobe fuse` if needed; when the module is there but
/// the node is not (a minimal /dev), a private node in the test's work directory — never a new
/// node in the host's /dev.
fn fuse_device() -> PathBuf {
    let dev = PathBuf::from("/dev/fuse");
    if dev.exists() {
        return dev;
    }
    let modprobe = std::process::Command::new("modprobe").arg("fuse").output();
    if dev.exists() {
        return dev;
    }
    let numbers = std::fs::read_to_string("/sys/class/misc/fuse/dev").unwrap_or_else(|e| {
        panic!("/dev/fuse is missing and `modprobe fuse` did not load FUSE ({modprobe:?}; /sys/class/misc/fuse/dev: {e}): this test needs FUSE")
    });
    let (major, minor) = numbers.trim().split_once(':').expect("MAJOR:MINOR");
    let private = work().join("fuse");
    sh(&["mknod", private.to_str().unwrap(), "c", major, minor]);
    private
}

impl Drop for HungMount {
    fn drop(&mut self) {
        // Closing the only descriptor of the device aborts the connection: every blocked
        // request fails with ENOTCONN. Then detach the mount.
        drop(self.dev.take());
        let target = CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: unmounts our own mount in the testbed's mount namespace.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// One HTTP GET on the daemon's endpoint: (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text)
}

#[test]
fn e2e_hung_storage_costs_only_its_domains() {
    if !inside("e2e_hung_storage_costs_only_its_domains") {
        return;
    }
    let hv = connect();
    bridge("br0");
    let hung_dir = work().join("hung");
    let _mount = HungMount::mount(&hung_dir);
    let mut spec = String::from("  domains:\n");
    let mut paths = Vec::new();
    for i in 0..HUNG {
        let name = format!("stuck{i:02}");
        define_guest(&hv, &name, "br0");
        let path = hung_dir.join(format!("d{i:02}/disk.img")).display().to_string();
        spec.push_str(&format!(
            "    - name: {name}\n      restart: always\n      startup: {{requires: {{paths: [{path}]}}}}\n"
        ));
        paths.push((name, path));
    }
    // `fresh` needs no storage; it is defined only once every check hangs.
    spec.push_str("    - name: fresh\n      restart: always\n");
    let addr = "127.0.0.1:9477";
    let d = Daemon::start_with(&policy(&spec), &["--metrics-addr", addr]);

    // The log, not the status file: the status writer is among what hung storage used to stall.
    wait("every stuck domain's path check hangs", T, || {
        d.log().matches("checking a required path does not return").count() >= HUNG
    });

    // A new domain, no required paths: it starts at once although 16 checks hang.
    let t0 = Instant::now();
    define_guest(&hv, "fresh", "br0");
    wait("fresh started beside the hung storage", START_BOUND, || running(&hv, "fresh"));
    let latency = t0.elapsed();
    // The floor in the same conditions: an unmanaged twin started directly through libvirt.
    define_guest(&hv, "twin", "br0");
    let t1 = Instant::now();
    start(&hv, "twin");
    wait("twin started", START_BOUND, || running(&hv, "twin"));
    println!(
        "fresh: defined → running in {} ms with {HUNG} path checks hung (a direct libvirt start of its twin: {} ms)",
        latency.as_millis(),
        t1.elapsed().as_millis()
    );

    // The status file is still written, and says what waits for what.
    wait("status shows fresh running", T, || d.domain("fresh").is_some_and(|s| s["state"] == "running (booted)"));
    wait("status: each stuck domain waits for its path, not answering", T, || {
        paths.iter().all(|(name, path)| {
            d.domain(name).is_some_and(|s| s["waitingFor"] == serde_json::json!([format!("{path} (not answering)")]))
        })
    });
    let (_, metrics) = get(addr, "/metrics");
    assert!(metrics.contains(&format!("virtwarden_required_paths_not_answering {HUNG}")), "{metrics}");
    let (code, body) = get(addr, "/healthz");
    assert_eq!(code, 200, "the engine makes progress: {body}");
    for (name, _) in &paths {
        assert!(!running(&hv, name), "{name} must not start while its path does not answer");
    }
}
