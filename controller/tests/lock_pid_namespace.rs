//! The host-wide lock names its holder by the pid the asking process can use: an operator in a
//! pod writes "1" (its own pid namespace), which on the host names init. Run for real: the
//! holder in a new pid namespace (`unshare --pid --fork`, as a container runtime does), the
//! asker outside it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_holder_in_another_pid_namespace_is_named_by_its_pid_here() {
    let bin = env!("CARGO_BIN_EXE_virtwarden");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let policies = repo.join("examples/policies");
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("virtwarden.lock");
    let mut holder = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--"])
        .arg(bin)
        .args(["run", "--connect", "test:///default", "--metrics-addr", "off"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--lock-file")
        .arg(&lock)
        .arg(&policies)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) runs; CI runs as root");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&lock).map_or(true, |t| !t.starts_with("1 run")) {
        assert!(holder.try_wait().unwrap().is_none(), "the holder exited: no private pid namespace?");
        assert!(Instant::now() < deadline, "the holder never took the lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The holder's pid here: unshare's only child.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", holder.id())).unwrap();
    let host_pid: u32 = children.split_whitespace().next().expect("unshare's child").parse().unwrap();

    let out = Command::new(bin)
        .args(["apply", "--connect", "test:///default"])
        .arg("--data-dir")
        .arg(dir.path().join("data2"))
        .arg("--lock-file")
        .arg(&lock)
        .arg(&policies)
        .output()
        .unwrap();
    let _ = holder.kill();
    let _ = holder.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {host_pid}; 1 in its own pid namespace, `run`)")),
        "the message names pid {host_pid}: {stderr}"
    );
}
