//! Running an `exec` remediation hook as root, safely: its path must pass the ownership rules
//! (and, in operator mode, lie in the allowed directory) right before it runs; it gets a cleared
//! environment and its own process group, which is killed whole at the timeout, when it exits, or
//! when the caller drops the future. Output is drained while it runs; it is never retried.

use std::collections::VecDeque;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use virtwarden_policies::trust::{self, TrustError, TrustedOwners};

use super::remediation::RemediationContext;

/// The only PATH a hook sees (the daemon's own environment is not passed on).
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The longest a hook may run, whatever its step says (validation enforces the same bound).
pub const MAX_TIMEOUT: Duration = virtwarden_policies::bounds::EXEC_TIMEOUT.max.0;
/// Bytes kept from the start and from the end of each of stdout and stderr.
pub const EXCERPT_HEAD: usize = 2048;
pub const EXCERPT_TAIL: usize = 2048;
/// After the hook's process group is gone, how long a pipe still held open (by a process that
/// left the group with setsid) is read before giving up on it.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Spawns that fail with ETXTBSY are retried this often: nothing ran.
const SPAWN_TRIES: u32 = 10;

/// Where hooks may come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ExecPolicy {
    /// Host mode: the policy files are the operator's own (they pass the same ownership rules),
    /// so any executable that passes them may run.
    #[default]
    Host,
    /// Operator mode without `--allow-exec-dir`: whoever can write a HostPolicy is not trusted
    /// to run commands as root on the node, so every `exec` step is refused.
    Disabled,
    /// Operator mode with `--allow-exec-dir DIR`: only executables that resolve inside DIR.
    InsideDir(PathBuf),
}

/// Longest `VIRTWARDEN_REASON`, in characters.
pub const REASON_CHARS: usize = 1024;

/// One hook invocation: argv (no shell) and the `VIRTWARDEN_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
}

impl Hook {
    /// The hook of an `exec` remediation step.
    pub fn for_remediation(ctx: &RemediationContext) -> Self {
        Hook {
            argv: ctx.step.command.clone(),
            env: vec![
                ("VIRTWARDEN_DOMAIN".into(), ctx.domain.clone()),
                ("VIRTWARDEN_UUID".into(), ctx.uuid.clone()),
                // The reason may quote the guest (console, agent): one clean, bounded line.
                ("VIRTWARDEN_REASON".into(), crate::guest_text::clean(&ctx.reason, REASON_CHARS)),
                ("VIRTWARDEN_ATTEMPT".into(), ctx.attempt.to_string()),
            ],
            timeout: ctx.step.timeout,
        }
    }

    fn program(&self) -> PathBuf {
        PathBuf::from(self.argv.first().map(String::as_str).unwrap_or_default())
    }
}

/// Why a hook was not run.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("exec steps are disabled in operator mode; start `virtwarden operator` with --allow-exec-dir DIR")]
    ExecDisabled,
    #[error("it resolves to {}, outside the allowed directory {}", resolved.display(), dir.display())]
    OutsideAllowedDir { resolved: PathBuf, dir: PathBuf },
    #[error(transparent)]
    Untrusted(TrustError),
}

impl Refusal {
    /// A fixed word for the `reason` label of `virtwarden_hooks_refused_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::ExecDisabled => "exec-disabled",
            Refusal::OutsideAllowedDir { .. } => "outside-allowed-dir",
            Refusal::Untrusted(t) => t.kind(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Not run: the trust rules said no. Reported in status, metrics and log; never retried.
    #[error("refused to run {}: {reason}", program.display())]
    Refused { program: PathBuf, reason: Refusal },
    #[error("cannot run {}: {source}", program.display())]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("{} timed out after {timeout:?}; its process group was killed{}", program.display(), suffix(stderr))]
    Timeout { program: PathBuf, timeout: Duration, stderr: String },
    #[error("{} exited with {status}{}", program.display(), suffix(stderr))]
    Exit { program: PathBuf, status: ExitStatus, stderr: String },
    #[error("waiting for {}: {source}", program.display())]
    Wait { program: PathBuf, source: std::io::Error },
}

fn suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

impl HookError {
    /// The refusal, if the hook was refused rather than run.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            HookError::Refused { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// What a hook that ran to completion left behind.
#[derive(Debug)]
pub struct HookOutput {
    pub status: ExitStatus,
    pub stdout: Excerpt,
    pub stderr: Excerpt,
    pub elapsed: Duration,
}

/// The first [`EXCERPT_HEAD`] and last [`EXCERPT_TAIL`] bytes of a stream, and its length.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Excerpt {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

impl Excerpt {
    pub fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = EXCERPT_HEAD - self.head.len();
        let (to_head, rest) = bytes.split_at(room.min(bytes.len()));
        self.head.extend_from_slice(to_head);
        bytes = rest;
        if bytes.len() > EXCERPT_TAIL {
            bytes = &bytes[bytes.len() - EXCERPT_TAIL..];
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(EXCERPT_TAIL);
        self.tail.drain(..overflow);
        self.tail.extend(bytes);
    }

    /// Bytes the stream carried in all.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes kept.
    pub fn kept(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// The kept text (lossy UTF-8, trimmed), with a marker where bytes were left out.
    pub fn text(&self) -> String {
        let head = String::from_utf8_lossy(&self.head);
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        let omitted = self.total - self.kept() as u64;
        let text = if omitted == 0 {
            format!("{head}{}", String::from_utf8_lossy(&tail))
        } else {
            format!("{head}\n[… {omitted} bytes left out …]\n{}", String::from_utf8_lossy(&tail))
        };
        text.trim().to_string()
    }
}

/// Check the hook against `policy` and the ownership rules; the resolved program to execute.
pub fn vet(hook: &Hook, policy: &ExecPolicy) -> Result<PathBuf, HookError> {
    let program = hook.program();
    let refused = |reason| HookError::Refused { program: program.clone(), reason };
    if hook.argv.is_empty() {
        return Err(HookError::Spawn {
            program,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        });
    }
    let owners = TrustedOwners::of_this_process();
    let allowed = match policy {
        ExecPolicy::Host => None,
        ExecPolicy::Disabled => return Err(refused(Refusal::ExecDisabled)),
        ExecPolicy::InsideDir(dir) => Some(trust::check_dir(dir, owners).map_err(|e| refused(Refusal::Untrusted(e)))?),
    };
    // A hook that does not exist is a failure to run it, not a trust question.
    let resolved =
        std::fs::canonicalize(&program).map_err(|source| HookError::Spawn { program: program.clone(), source })?;
    if let Some(dir) = allowed {
        if !resolved.starts_with(&dir) {
            return Err(refused(Refusal::OutsideAllowedDir { resolved, dir }));
        }
    }
    trust::check_file(&resolved, owners).map_err(|e| refused(Refusal::Untrusted(e)))
}

/// Run `hook` after vetting it. Dropping the returned future kills the hook's process group.
pub async fn run(hook: &Hook, policy: &ExecPolicy) -> Result<HookOutput, HookError> {
    let resolved = vet(hook, policy)?;
    let program = hook.program();
    let timeout = hook.timeout.min(MAX_TIMEOUT);
    let started = Instant::now();
    let mut child =
        spawn(&resolved, hook).await.map_err(|source| HookError::Spawn { program: program.clone(), source })?;
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return Err(HookError::Spawn { program, source: std::io::Error::other("the hook has no pid") });
    };
    let mut group = GroupGuard { pgid: pid, armed: true };
    let exit_fd = pidfd(pid);
    let (done_tx, done_rx) = watch::channel(false);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let supervise = async {
        let timed_out = tokio::select! {
            _ = exited(exit_fd.as_ref(), &mut child) => false,
            _ = tokio::time::sleep(timeout) => true,
        };
        // Kill the whole group before reaping the leader, so its id cannot have been reused:
        // at the timeout that ends the hook; after a normal exit it ends what it left behind.
        group.kill();
        let status = child.wait().await;
        group.armed = false;
        let _ = done_tx.send(true);
        (timed_out, status)
    };
    let ((timed_out, status), stdout, stderr) =
        tokio::join!(supervise, drain(stdout, done_rx.clone()), drain(stderr, done_rx));
    let status = status.map_err(|source| HookError::Wait { program: program.clone(), source })?;
    let elapsed = started.elapsed();
    tracing::info!(
        program = %program.display(),
        %status,
        timed_out,
        elapsed_ms = elapsed.as_millis() as u64,
        stdout = %stdout.text(),
        stderr = %stderr.text(),
        "hook finished"
    );
    if timed_out {
        return Err(HookError::Timeout { program, timeout, stderr: stderr.text() });
    }
    if !status.success() {
        return Err(HookError::Exit { program, status, stderr: stderr.text() });
    }
    Ok(HookOutput { status, stdout, stderr, elapsed })
}

async fn spawn(resolved: &Path, hook: &Hook) -> std::io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        let mut cmd = tokio::process::Command::new(resolved);
        // argv[0] as written in the policy; the resolved path is what runs.
        cmd.arg0(&hook.argv[0])
            .args(&hook.argv[1..])
            .env_clear()
            .env("PATH", HOOK_PATH)
            .envs(hook.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        match cmd.spawn() {
            // ETXTBSY: the hook was just written and someone still holds it open for writing (an
            // update in progress, or a concurrent fork); execve failed, so nothing ran.
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < SPAWN_TRIES => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// Kills the hook's process group when dropped, unless the leader was already reaped (then the
/// group id may belong to someone else).
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl GroupGuard {
    fn kill(&self) {
        if self.armed {
            // SAFETY: killpg(2) has no memory-safety preconditions; the group is the hook's own
            // (process_group(0)) and its leader is not reaped yet, so the id is still its.
            unsafe { libc::killpg(self.pgid, libc::SIGKILL) };
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A pidfd for `pid`: readable once the process has exited, before it is reaped.
fn pidfd(pid: i32) -> Option<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor was just returned to us and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: an OwnedFd keeps its descriptor open, unchanged, for as long as the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }.ok()
}

/// Wait until the hook's leader has exited, without reaping it when a pidfd is available.
/// Without one (kernels before 5.3) waiting reaps it; the group is then killed just after.
async fn exited(fd: Option<&tokio::io::unix::AsyncFd<OwnedFd>>, child: &mut tokio::process::Child) {
    match fd {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => {
            let _ = child.wait().await;
        }
    }
}

/// Read a pipe to its end, keeping an excerpt. Once the hook is gone (`done`), a pipe that a
/// process outside the group still holds open is read for [`DRAIN_GRACE`] more, then dropped.
async fn drain(pipe: Option<impl AsyncRead + Unpin>, mut done: watch::Receiver<bool>) -> Excerpt {
    let mut excerpt = Excerpt::default();
    let Some(mut pipe) = pipe else { return excerpt };
    let grace = async move {
        let _ = done.wait_for(|d| *d).await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    tokio::pin!(grace);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = pipe.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => excerpt.push(&buf[..n]),
            },
            _ = &mut grace => break,
        }
    }
    excerpt
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A private directory (symlinks resolved) for hooks and what they write.
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        (dir, root)
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        chmod(&path, 0o755);
        path
    }

    fn hook(argv: &[&str], timeout: Duration) -> Hook {
        Hook {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("VIRTWARDEN_DOMAIN".into(), "web1".into()), ("VIRTWARDEN_ATTEMPT".into(), "3".into())],
            timeout,
        }
    }

    fn p(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    /// Whether `pid` is gone (or a zombie nobody has reaped yet: it runs nothing).
    fn dead(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn pids(file: &Path) -> Vec<i32> {
        std::fs::read_to_string(file).unwrap_or_default().split_whitespace().filter_map(|s| s.parse().ok()).collect()
    }

    #[tokio::test]
    async fn the_environment_is_cleared_to_path_and_the_virtwarden_variables() {
        let out = run(&hook(&["/usr/bin/env"], Duration::from_secs(10)), &ExecPolicy::Host).await.unwrap();
        let mut lines: Vec<String> = out.stdout.text().lines().map(str::to_string).collect();
        lines.sort();
        assert_eq!(
            lines,
            [format!("PATH={HOOK_PATH}"), "VIRTWARDEN_ATTEMPT=3".into(), "VIRTWARDEN_DOMAIN=web1".into()]
        );
    }

    #[tokio::test]
    async fn argv_is_passed_without_a_shell_and_argv0_as_written() {
        let (_d, dir) = scratch();
        let target = script(&dir, "hook.sh", "printf '%s|' \"$0\" \"$@\"");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let out =
            run(&hook(&[p(&link), "--flag", "two words; $(not run)"], Duration::from_secs(10)), &ExecPolicy::Host)
                .await
                .unwrap();
        // sh reports the script path it was started with: the resolved one.
        assert_eq!(out.stdout.text(), format!("{}|--flag|two words; $(not run)|", target.display()));
    }

    #[tokio::test]
    async fn a_nonzero_exit_is_a_failure_with_its_stderr() {
        let (_d, dir) = scratch();
        let h = script(&dir, "hook.sh", "echo 'disk image missing' >&2\nexit 3");
        match run(&hook(&[p(&h)], Duration::from_secs(10)), &ExecPolicy::Host).await {
            Err(HookError::Exit { status, stderr, .. }) => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "disk image missing");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_whole_process_group_is_killed_at_the_timeout() {
        let (_d, dir) = scratch();
        let pidfile = dir.join("pids");
        // The background child keeps stdout open: without the group kill the drain would wait.
        let h = script(&dir, "hook.sh", &format!("sleep 300 &\necho $$ $! > {}\nwait", pidfile.display()));
        let started = Instant::now();
        let r = run(&hook(&[p(&h)], Duration::from_millis(300)), &ExecPolicy::Host).await;
        assert!(matches!(r, Err(HookError::Timeout { .. })), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "killed at the timeout, not waited for");
        let pids = pids(&pidfile);
        assert_eq!(pids.len(), 2, "the hook and its background child");
        wait_until("the hook and its grandchild to die", || pids.iter().all(|p| dead(*p))).await;
    }

    #[tokio::test]
    async fn what_a_hook_leaves_running_is_killed_when_it_exits() {
        let (_d, dir) = scratch();
        let pidfile = dir.join("pids");
        let h = script(&dir, "hook.sh", &format!("sleep 300 &\necho $! > {}\nexit 0", pidfile.display()));
        let started = Instant::now();
        run(&hook(&[p(&h)], Duration::from_secs(60)), &ExecPolicy::Host).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let pids = pids(&pidfile);
        wait_until("the leftover child to die", || pids.iter().all(|p| dead(*p))).await;
    }

    #[tokio::test]
    async fn dropping_the_future_kills_the_group() {
        let (_d, dir) = scratch();
        let pidfile = dir.join("pids");
        let h = script(&dir, "hook.sh", &format!("sleep 300 &\necho $$ $! > {}\nwait", pidfile.display()));
        let hk = hook(&[p(&h)], Duration::from_secs(60));
        tokio::select! {
            r = run(&hk, &ExecPolicy::Host) => panic!("the hook ended on its own: {r:?}"),
            _ = wait_until("the hook to start", || pids(&pidfile).len() == 2) => {}
        }
        let pids = pids(&pidfile);
        wait_until("the cancelled hook's group to die", || pids.iter().all(|p| dead(*p))).await;
    }

    #[tokio::test]
    async fn a_mebibyte_of_stderr_does_not_block() {
        let (_d, dir) = scratch();
        let h = script(&dir, "hook.sh", "head -c 1048576 /dev/zero | tr '\\0' e >&2\necho done");
        let out = run(&hook(&[p(&h)], Duration::from_secs(30)), &ExecPolicy::Host).await.unwrap();
        assert_eq!(out.stderr.total(), 1 << 20);
        assert_eq!(out.stderr.kept(), EXCERPT_HEAD + EXCERPT_TAIL);
        assert!(out.stderr.text().contains(&format!("[… {} bytes left out …]", (1 << 20) - 4096)));
        assert_eq!(out.stdout.text(), "done");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_failure() {
        let r = run(&hook(&["/nonexistent/hook"], Duration::from_secs(1)), &ExecPolicy::Host).await;
        assert!(matches!(r, Err(HookError::Spawn { .. })), "{r:?}");
    }

    /// Run `h` and assert it was refused naming `path`, and did not run.
    async fn assert_refused(h: &Path, policy: &ExecPolicy, marker: &Path, path: &Path, kind: &str) {
        let err = run(&hook(&[p(h)], Duration::from_secs(5)), policy).await.unwrap_err();
        let reason = err.refusal().unwrap_or_else(|| panic!("not a refusal: {err}"));
        assert_eq!(reason.kind(), kind, "{err}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err} should name {}", path.display());
        assert!(!marker.exists(), "a refused hook must not run");
    }

    #[tokio::test]
    async fn hooks_that_others_could_have_written_are_refused_naming_the_path() {
        let (_d, dir) = scratch();
        let marker = dir.join("ran");
        let sub = dir.join("hooks");
        std::fs::create_dir(&sub).unwrap();
        let h = script(&sub, "hook.sh", &format!("touch {}", marker.display()));
        chmod(&h, 0o775);
        assert_refused(&h, &ExecPolicy::Host, &marker, &h, "writable").await;
        chmod(&h, 0o755);
        chmod(&sub, 0o777);
        assert_refused(&h, &ExecPolicy::Host, &marker, &sub, "writable").await;
        chmod(&sub, 0o755);
        if TrustedOwners::of_this_process().service_uid() == 0 {
            std::os::unix::fs::chown(&h, Some(65534), None).unwrap();
            assert_refused(&h, &ExecPolicy::Host, &marker, &h, "owner").await;
            std::os::unix::fs::chown(&h, Some(0), None).unwrap();
        }
        run(&hook(&[p(&h)], Duration::from_secs(5)), &ExecPolicy::Host).await.unwrap();
        assert!(marker.exists(), "a trusted hook runs");
    }

    #[tokio::test]
    async fn operator_mode_runs_only_hooks_inside_the_allowed_directory() {
        let (_d, dir) = scratch();
        let marker = dir.join("ran");
        let allowed = dir.join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        let outside = script(&dir, "outside.sh", &format!("touch {}", marker.display()));
        let inside = script(&allowed, "inside.sh", &format!("touch {}", marker.display()));
        // Without --allow-exec-dir nothing runs, not even a trusted system binary.
        assert_refused(&inside, &ExecPolicy::Disabled, &marker, &inside, "exec-disabled").await;
        let policy = ExecPolicy::InsideDir(allowed.clone());
        assert_refused(&outside, &policy, &marker, &outside, "outside-allowed-dir").await;
        // A symlink inside the directory is judged by its target.
        let link = allowed.join("link.sh");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert_refused(&link, &policy, &marker, &outside, "outside-allowed-dir").await;
        // The directory itself must be trusted.
        chmod(&allowed, 0o777);
        assert_refused(&inside, &policy, &marker, &allowed, "writable").await;
        chmod(&allowed, 0o755);
        run(&hook(&[p(&inside)], Duration::from_secs(5)), &policy).await.unwrap();
        assert!(marker.exists());
    }

    #[test]
    fn the_excerpt_keeps_the_head_and_the_tail() {
        let mut e = Excerpt::default();
        e.push(b"start ");
        e.push(&vec![b'x'; 10_000]);
        e.push(b" end");
        assert_eq!(e.total(), 10_010);
        let text = e.text();
        assert!(text.starts_with("start xxx"), "{text}");
        assert!(text.ends_with("xxx end"), "{text}");
        assert!(text.contains(&format!("[… {} bytes left out …]", 10_010 - EXCERPT_HEAD - EXCERPT_TAIL)));
        let mut small = Excerpt::default();
        small.push(b" short \n");
        assert_eq!(small.text(), "short");
    }
}
