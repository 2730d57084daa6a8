//! `make bench-apply`: how fast a host converges, in the private testbed (libvirtd + real QEMU,
//! 64 MiB diskless firmware guests), each figure next to its floor measured in the same run:
//! - `virtwarden apply` of N = 16 and 50 stopped domains vs the same starts issued in parallel
//!   (`xargs -P N virsh start`), repeated for p50/p99, and a `--parallel` sweep;
//! - one shared libvirt connection vs a small pool, in process;
//! - Ansible's `community.libvirt.virt` (`state: running`, a loop) on 20 domains vs apply;
//! - a mass crash (kill -9 of 16 QEMUs) under `virtwarden run` vs the floor (libvirt notices
//!   every death, then the parallel start), per `--max-concurrent-starts` (a sweep).
//!
//! `BENCH_ONLY=crash` (or a list of apply, sweep, connections, ansible, crash) runs only those;
//! `BENCH_STARTS=8,16` picks the `--max-concurrent-starts` values (default 1, 2, 4, 8, 16).

#[path = "../tests/testbed/mod.rs"]
mod testbed;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbed::*;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use virtwarden::act::{apply_plan_with, ApplyOptions};
use virtwarden::hypervisor::events::{HypervisorEvent, LifecycleKind};
use virtwarden::libvirt::events::{start_event_loop, subscribe};
use virtwarden::libvirt::pool::{connections_for, LibvirtPool};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::DomainState;
use virtwarden::plan::plan_ordered;
use virtwarden_policies::{load_texts, DesiredState};

const STARTED: LifecycleKind = LifecycleKind::Started;
const STOPPED: LifecycleKind = LifecycleKind::Stopped;
const ANSIBLE_DOMAINS: usize = 20;
const CRASH_DOMAINS: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn repeats() -> usize {
    env_usize("BENCH_REPEAT", 5).max(1)
}

/// Where the Ansible virtualenv lives (built before entering the testbed, which has no network).
fn ansible_venv() -> PathBuf {
    repo().join("target/bench-apply/ansible-venv")
}

/// `pip install ansible` into a virtualenv of Debian's python3, which sees `python3-libvirt`.
fn prepare_ansible() -> Result<(), String> {
    let python = Path::new("/usr/bin/python3");
    let libvirt = Command::new(python).args(["-c", "import libvirt"]).output().map_err(|e| e.to_string())?;
    if !libvirt.status.success() {
        return Err("python3-libvirt is not installed (apt-get install python3-libvirt)".into());
    }
    let venv = ansible_venv();
    let lxml =
        || Command::new(venv.join("bin/python")).args(["-c", "import lxml"]).output().is_ok_and(|o| o.status.success());
    if venv.join("bin/ansible-playbook").exists() && lxml() {
        return Ok(());
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    };
    println!("installing ansible from PyPI into {} ...", venv.display());
    run(Command::new(python).args(["-m", "venv", "--system-site-packages"]).arg(&venv))?;
    // community.libvirt.virt needs lxml next to the libvirt bindings.
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", "ansible", "lxml"]))
}

fn main() {
    if std::env::var_os("VW_TESTBED").is_none() {
        let ansible = match section("ansible").then(prepare_ansible).unwrap_or(Err("not asked for".into())) {
            Ok(()) => "1",
            Err(e) => {
                assert!(
                    std::env::var_os("BENCH_SKIP_ANSIBLE").is_some() || !section("ansible"),
                    "cannot prepare Ansible: {e}\n(BENCH_SKIP_ANSIBLE=1 runs the rest without it)"
                );
                "0"
            }
        };
        run_bench_in_testbed("bench-apply", &[("VW_ANSIBLE", ansible)]);
        return;
    }
    inside_testbed();
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("vm{i:02}")).collect()
}

/// A policy directory keeping `names` running (`restart: always`: a destroyed domain is
/// started again), optionally with extra per-domain YAML.
fn policy_dir(tag: &str, names: &[String], extra: &str) -> PathBuf {
    let dir = work().join(format!("policy-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut spec = String::from("  domains:\n");
    for n in names {
        spec.push_str(&format!("    - name: {n}\n      restart: always\n{extra}"));
    }
    std::fs::write(dir.join("p.yaml"), policy(&spec)).unwrap();
    dir
}

fn desired(dir: &Path) -> DesiredState {
    let text = std::fs::read_to_string(dir.join("p.yaml")).unwrap();
    load_texts([(Path::new("p.yaml"), text.as_str())]).expect("bench policy is valid").desired
}

/// Lifecycle events of the private libvirtd, for waiting without polling it.
struct Events {
    rx: UnboundedReceiver<HypervisorEvent>,
}

impl Events {
    fn drain(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Wait until each of `names` had an event of kind `event`; returns when the last arrived.
    fn wait_all(&mut self, event: LifecycleKind, names: &[String], timeout: Duration) -> Instant {
        let mut left: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let deadline = Instant::now() + timeout;
        let mut last = Instant::now();
        while !left.is_empty() {
            match self.rx.try_recv() {
                Ok(HypervisorEvent::Lifecycle(e)) if e.kind == event => {
                    if left.remove(e.domain.as_str()) {
                        last = e.received;
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    assert!(Instant::now() < deadline, "timed out; still waiting for event {event:?} of {left:?}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        last
    }
}

/// `xargs -P N virsh VERB` over `names`: the floor, N independent clients at once.
fn virsh_parallel(verb: &str, names: &[String]) -> Duration {
    let t0 = Instant::now();
    let mut child = Command::new("xargs")
        .args(["-P", &names.len().to_string(), "-n", "1", "virsh", "-q", "-c", URI, verb])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("xargs");
    child.stdin.take().unwrap().write_all(names.join("\n").as_bytes()).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "xargs virsh {verb} failed");
    t0.elapsed()
}

fn all_shut_off(hv: &LibvirtHost, names: &[String]) -> bool {
    names.iter().all(|n| state(hv, n).is_some_and(|d| d.state == DomainState::ShutOff))
}

/// Destroy whatever of `names` runs and wait until libvirt reports them all shut off.
fn stop_all(hv: &LibvirtHost, names: &[String]) {
    let running: Vec<String> = names.iter().filter(|n| running(hv, n)).cloned().collect();
    if !running.is_empty() {
        virsh_parallel("destroy", &running);
    }
    wait("all shut off", Duration::from_secs(60), || all_shut_off(hv, names));
}

/// `virtwarden apply` as a user runs it; its wall time.
fn vw_apply(dir: &Path, parallel: usize) -> Duration {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args(["apply", "--connect", URI, "--network", "off", "--parallel", &parallel.to_string()])
        .arg(dir)
        .output()
        .expect("virtwarden apply");
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "virtwarden apply failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn pct(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn row(what: &str, v: &[Duration]) {
    println!("{what:<58} n={:<2} p50 {:>8}  p99 {:>8}", v.len(), secs(pct(v, 0.5)), secs(pct(v, 0.99)));
}

fn ratio_row(what: &str, num: &[Duration], den: &[Duration]) -> f64 {
    let ratios: Vec<f64> = num.iter().zip(den).map(|(a, b)| a.as_secs_f64() / b.as_secs_f64()).collect();
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let p = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
    let of_p50 = pct(num, 0.5).as_secs_f64() / pct(den, 0.5).as_secs_f64();
    println!("{what:<58} p50 {of_p50:.2}×  (per run: p50 {:.2}×, p99 {:.2}×)", p(0.5), p(0.99));
    of_p50
}

/// In-process apply (no process start, no policy load) through `hv`: its wall time.
fn apply_in_process(hv: &dyn virtwarden::hypervisor::Hypervisor, desired: &DesiredState, parallel: usize) -> Duration {
    let t0 = Instant::now();
    let observed = hv.observe_host().unwrap();
    let p = plan_ordered(desired, &observed, &Default::default());
    let report = apply_plan_with(hv, desired, &p, &ApplyOptions { parallel }).unwrap();
    assert!(report.converged(), "in-process apply did not converge: {report:#?}");
    t0.elapsed()
}

fn inside_testbed() {
    start_event_loop();
    let hv = connect();
    let (tx, rx) = unbounded_channel();
    let _subscription = subscribe(&hv, tx).expect("subscribe to lifecycle events");
    let mut events = Events { rx };
    bridge("br0");
    let all = names(env_usize("BENCH_MAX_DOMAINS", 50).max(CRASH_DOMAINS).max(ANSIBLE_DOMAINS));
    for n in &all {
        define_guest(&hv, n, "br0");
    }
    let r = repeats();
    println!(
        "private libvirtd, QEMU `{}` 64 MiB diskless guests, {} CPUs, load average {}; {r} runs per figure (BENCH_REPEAT)",
        domain_type(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    let default_parallel = virtwarden::act::DEFAULT_PARALLEL;

    // 1. apply of N stopped domains vs the parallel-start floor, alternating, same host.
    let mut summary = Vec::new();
    for n in [16usize, 50].into_iter().filter(|n| *n <= all.len() && section("apply")) {
        let set = &all[..n];
        let dir = policy_dir(&format!("n{n}"), set, "");
        let (mut floor, mut vw) = (Vec::new(), Vec::new());
        for i in 0..r {
            for first_floor in [i % 2 == 0, i % 2 != 0] {
                stop_all(&hv, set);
                if first_floor {
                    floor.push(virsh_parallel("start", set));
                } else {
                    vw.push(vw_apply(&dir, default_parallel));
                }
            }
        }
        stop_all(&hv, set);
        println!("\n== apply: {n} stopped domains → running");
        row(&format!("floor: xargs -P {n} virsh start"), &floor);
        row(&format!("virtwarden apply --parallel {default_parallel} (wall, incl. verify)"), &vw);
        let ratio = ratio_row("ratio virtwarden / floor (target ≤ 1.5×)", &vw, &floor);
        summary.push((n, pct(&floor, 0.5), pct(&vw, 0.5), ratio));
    }

    // 2. --parallel sweep on the largest set, to choose the default.
    let big = &all[..all.len().min(50)];
    let dir = policy_dir("sweep", big, "");
    if section("sweep") {
        println!("\n== --parallel sweep: apply of {} stopped domains (wall)", big.len());
    }
    for p in [4usize, 8, 16, 20, 32, 50].into_iter().filter(|_| section("sweep")) {
        let mut v = Vec::new();
        for _ in 0..r.min(2) {
            stop_all(&hv, big);
            v.push(vw_apply(&dir, p));
        }
        row(&format!("--parallel {p}"), &v);
    }

    // 3. One shared connection vs pools, in process (the CLI opens
    //    `connections_for(uri, parallel)` connections).
    let d = desired(&dir);
    if section("connections") {
        connections(&hv, &d, big, r, default_parallel);
    }

    // 4. Ansible's community.libvirt.virt on the same 20 domains vs virtwarden apply.
    let twenty = &all[..ANSIBLE_DOMAINS];
    if section("ansible") {
        if std::env::var("VW_ANSIBLE").as_deref() == Ok("1") {
            ansible_vs_apply(&hv, twenty, r, default_parallel);
        } else {
            println!("\n== Ansible: not measured (BENCH_SKIP_ANSIBLE)");
        }
    }

    // 5. Mass crash of 16 under `virtwarden run` vs the floor, per --max-concurrent-starts.
    let crash_ratio = section("crash").then(|| mass_crash(&hv, &mut events, &all[..CRASH_DOMAINS], r));

    println!("\n== summary");
    for (n, floor, vw, ratio) in summary {
        println!("apply N={n:<3} floor p50 {}  virtwarden p50 {}  ratio {ratio:.2}×", secs(floor), secs(vw));
    }
    if let Some(ratio) = crash_ratio {
        println!(
            "mass crash of {CRASH_DOMAINS} under run (--max-concurrent-starts {}, the default): ratio to floor {ratio:.2}×",
            virtwarden::engine::DEFAULT_MAX_CONCURRENT_STARTS
        );
    }
}

/// Which parts to run: `BENCH_ONLY=crash,apply` (apply, sweep, connections, ansible, crash);
/// all when unset.
fn section(name: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|s| s.trim() == name))
}

/// One shared connection vs pools, in process.
fn connections(hv: &LibvirtHost, d: &DesiredState, big: &[String], r: usize, default_parallel: usize) {
    println!(
        "\n== connections: in-process apply of {} stopped domains, --parallel {default_parallel} (CLI default: {})",
        big.len(),
        connections_for(URI, default_parallel)
    );
    let mut by_size: Vec<(usize, Vec<Duration>)> = [1usize, 2, 4, 8].iter().map(|s| (*s, Vec::new())).collect();
    for i in 0..r.min(3) {
        // Rotate which size goes first, so drift over the run hits each alike.
        for k in 0..by_size.len() {
            let (size, samples) = &mut by_size[(i + k) % 4];
            let pool = LibvirtPool::open(URI, *size).expect("pool");
            stop_all(hv, big);
            samples.push(apply_in_process(&pool, d, default_parallel));
        }
    }
    for (size, samples) in &by_size {
        row(&format!("{size} connection(s), round robin per call"), samples);
    }
    ratio_row("ratio 4 connections / 1", &by_size[2].1, &by_size[0].1);
}

/// Ansible's community.libvirt.virt on the same 20 domains vs virtwarden apply.
fn ansible_vs_apply(hv: &LibvirtHost, twenty: &[String], r: usize, default_parallel: usize) {
    let dir = policy_dir("ansible-twenty", twenty, "");
    let playbook = write_playbook(twenty);
    let (mut ans, mut vw) = (Vec::new(), Vec::new());
    for i in 0..r.min(3) {
        for ansible_first in [i % 2 == 0, i % 2 != 0] {
            stop_all(hv, twenty);
            if ansible_first {
                ans.push(ansible(&playbook));
            } else {
                vw.push(vw_apply(&dir, default_parallel));
            }
        }
    }
    stop_all(hv, twenty);
    println!("\n== {ANSIBLE_DOMAINS} stopped domains → running: Ansible vs virtwarden");
    row("ansible-playbook, community.libvirt.virt state: running (loop)", &ans);
    row(&format!("virtwarden apply --parallel {default_parallel}"), &vw);
    ratio_row("ratio Ansible / virtwarden", &ans, &vw);
}

/// kill -9 of every QEMU in `set` until all run again: the floor (libvirt notices every death,
/// then `xargs -P N virsh start`) and `virtwarden run` per `--max-concurrent-starts`, one after
/// the other in each round so that drift in the machine's load hits all alike. Returns the
/// default's ratio to the floor (p50).
fn mass_crash(hv: &LibvirtHost, events: &mut Events, set: &[String], r: usize) -> f64 {
    let all_up = || wait("all up", Duration::from_secs(60), || set.iter().all(|n| running(hv, n)));
    // Kill every QEMU; `restart` brings them back; when the last is running again.
    let crash = |events: &mut Events, restart: &dyn Fn(&mut Events)| {
        all_up();
        events.drain();
        let pids: Vec<i32> = set.iter().filter_map(|n| qemu_pid(n)).collect();
        assert_eq!(pids.len(), set.len(), "every guest has a QEMU");
        let t0 = Instant::now();
        pids.into_iter().for_each(kill9);
        restart(events);
        events.wait_all(STARTED, set, Duration::from_secs(120)).duration_since(t0)
    };
    let floor_restart = |events: &mut Events| {
        events.wait_all(STOPPED, set, Duration::from_secs(60));
        virsh_parallel("start", set);
    };
    let extra = "      backoff: { resetAfter: 1ms, maxRestarts: 1000 }\n";
    let mut spec = String::from("  domains:\n");
    for n in set {
        spec.push_str(&format!("    - name: {n}\n      restart: always\n{extra}"));
    }
    let default = virtwarden::engine::DEFAULT_MAX_CONCURRENT_STARTS;
    let asked: Vec<usize> = std::env::var("BENCH_STARTS")
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![1, 2, 4, 8, 16]);
    let mut values = vec![default];
    values.extend(asked.into_iter().filter(|v| *v != default));
    let mut sweep: Vec<(usize, Vec<Duration>)> = values.iter().map(|n| (*n, Vec::new())).collect();
    let mut floor = Vec::new();
    // Once: all stopped → all running under the default (host boot).
    stop_all(hv, set);
    events.drain();
    let t0 = Instant::now();
    let daemon = Daemon::start(&policy(&spec));
    let boot = events.wait_all(STARTED, set, Duration::from_secs(120)).duration_since(t0);
    drop(daemon);
    for i in 0..r {
        floor.push(crash(events, &floor_restart));
        // Rotate which value goes first in the round.
        for k in 0..sweep.len() {
            let j = (i + k) % sweep.len();
            let n = sweep[j].0;
            let daemon = Daemon::start_with(&policy(&spec), &["--max-concurrent-starts", &n.to_string()]);
            sweep[j].1.push(crash(events, &|_| {}));
            drop(daemon);
        }
    }
    stop_all(hv, set);
    sweep.sort_by_key(|(n, _)| *n);
    let k = set.len();
    println!("\n== mass crash: kill -9 of {k} QEMUs → all running again (floor and each value once per round)");
    row(&format!("floor: libvirt notices every death, then xargs -P {k} start"), &floor);
    let mut default_ratio = 0.0;
    for (n, vw) in &sweep {
        let mark = if *n == default { " (default)" } else { "" };
        row(&format!("virtwarden run --max-concurrent-starts {n}{mark}"), vw);
        let ratio = ratio_row("  ratio to floor (target ≤ 1.5×)", vw, &floor);
        if *n == default {
            default_ratio = ratio;
        }
    }
    println!("(virtwarden run from all {k} stopped to all running, once, default: {})", secs(boot));
    default_ratio
}

fn write_playbook(names: &[String]) -> PathBuf {
    let path = work().join("start.yml");
    let list: Vec<String> = names.iter().map(|n| format!("        - {n}")).collect();
    let text = format!(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n    - name: domains running\n      community.libvirt.virt:\n        name: \"{{{{ item }}}}\"\n        state: running\n        uri: {URI}\n      loop:\n{}\n",
        list.join("\n")
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// One `ansible-playbook` run; its wall time.
fn ansible(playbook: &Path) -> Duration {
    let venv = ansible_venv();
    let tmp = work().join("ansible-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let t0 = Instant::now();
    let out = Command::new(venv.join("bin/ansible-playbook"))
        .args(["-i", "localhost,", "-e"])
        .arg(format!("ansible_python_interpreter={}", venv.join("bin/python").display()))
        .arg(playbook)
        .env("ANSIBLE_LOCAL_TEMP", &tmp)
        .env("ANSIBLE_REMOTE_TEMP", &tmp)
        .env("ANSIBLE_HOME", &tmp)
        .env("ANSIBLE_NOCOLOR", "1")
        .output()
        .expect("ansible-playbook");
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ansible-playbook failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    took
}
