//! The clap schema: every command, its flags, their defaults and value parsers, and the exit
//! codes `--help` lists. Changing anything here changes the interface (docs/cli.md).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  check   0 valid (files others could write: a warning), 2 invalid policy
  plan    0 in sync, 3 drift found, 2 invalid policy, 1 runtime error (e.g. cannot connect)
  apply   0 converged, 1 some action failed or did not stick, 2 invalid or untrusted policy
  run     0 stopped by SIGTERM/SIGINT, 1 runtime error (e.g. another instance runs), 2 invalid or untrusted policy
  release 0 released (or was not quarantined), 1 not managed or not reachable
  memory confirm 0 confirmed (or nothing was lost), 1 not reachable
  reload  0 reloaded (or unchanged), 2 rejected (the service keeps the last good policy), 1 no service reachable
  status  0 shown, 1 no status file
  show    0 shown, 1 runtime error (e.g. cannot connect, no such domain)
  diagnose 0 nothing found, 3 problems found, 1 runtime error, 2 invalid policy";

#[derive(Debug, Parser)]
#[command(name = "virtwarden", version, about = "Self-healing reconciliation for libvirt/KVM hosts", after_help = EXIT_CODES)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Whether `plan`/`apply`/`run` look at the host network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkMode {
    /// On, except for libvirt's test driver (whose domains are not real, so the host's network
    /// must not be changed for them).
    Auto,
    On,
    Off,
}

impl NetworkMode {
    pub fn enabled_for(self, uri: &str) -> bool {
        match self {
            NetworkMode::Auto => !crate::libvirt::is_test_uri(uri),
            NetworkMode::On => true,
            NetworkMode::Off => false,
        }
    }
}

/// Whether `plan`/`apply` diagnose the domains they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiagnoseMode {
    /// On, except for libvirt's test driver (its domains never open their files).
    Auto,
    On,
    Off,
}

impl DiagnoseMode {
    pub fn enabled_for(self, uri: &str) -> bool {
        match self {
            DiagnoseMode::Auto => !crate::libvirt::is_test_uri(uri),
            DiagnoseMode::On => true,
            DiagnoseMode::Off => false,
        }
    }
}

/// What `plan` and `apply` take.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system).
    #[arg(long, short = 'c')]
    pub connect: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Host network (bridges, taps, forwarding): auto = on unless the URI is libvirt's test driver.
    #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
    pub network: NetworkMode,
    /// virtwarden's durable memory (read only here: why a domain is off, across libvirtd restarts).
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The host-wide lock `apply` takes (`run` and `operator` hold it too).
    #[arg(long, env = "VIRTWARDEN_LOCK_FILE", default_value = crate::lock::DEFAULT_LOCK_FILE)]
    pub lock_file: PathBuf,
    /// Diagnose the domains `plan` would start and the starts `apply` saw fail.
    #[arg(long, value_enum, default_value_t = DiagnoseMode::Auto)]
    pub diagnose: DiagnoseMode,
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Where the durable memory lives by default.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/virtwarden";
/// Where `diagnose` finds the managed domains when no `--policies` is given.
pub const DEFAULT_POLICIES: &str = "/etc/virtwarden/policies";

/// `show`'s document format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DocumentFormat {
    Yaml,
    Json,
}

/// What `show` takes.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system).
    #[arg(long, short = 'c')]
    pub connect: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value_t = DocumentFormat::Yaml)]
    pub output: DocumentFormat,
    /// Host network (bridges, forwarding): auto = on unless the URI is libvirt's test driver.
    #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
    pub network: NetworkMode,
    /// Domains to write (default: every domain, and forwarding).
    #[arg(value_name = "DOMAIN")]
    pub domains: Vec<String>,
}

/// What `diagnose` takes.
#[derive(Debug, clap::Args)]
pub struct DiagnoseArgs {
    /// libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system).
    #[arg(long, short = 'c')]
    pub connect: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Policy file or directory naming the managed domains (repeatable; default
    /// /etc/virtwarden/policies). An invalid policy exits 2.
    #[arg(long = "policies", value_name = "PATH")]
    pub policies: Vec<PathBuf>,
    /// Host network checks: auto = on unless the URI is libvirt's test driver.
    #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
    pub network: NetworkMode,
    /// qemu.conf, for the user and group QEMU runs as and dynamic_ownership.
    #[arg(long, default_value = "/etc/libvirt/qemu.conf")]
    pub qemu_conf: PathBuf,
    /// Domains to diagnose (default: every managed domain). Unmanaged ones are only read.
    #[arg(value_name = "DOMAIN")]
    pub domains: Vec<String>,
}

/// What both long-running front ends take (`run` and `operator`), with the same meaning.
#[derive(Debug, clap::Args)]
pub struct ServiceArgs {
    /// libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system).
    #[arg(long, short = 'c')]
    pub connect: Option<String>,
    /// Full resync period (safety net for missed events).
    #[arg(long, default_value = "60s")]
    pub resync: virtwarden_policies::Duration,
    /// Where to serve /metrics, /healthz and /readyz; `off` disables it.
    #[arg(long, default_value = "127.0.0.1:9477")]
    pub metrics_addr: String,
    /// Status file and control socket directory (`virtwarden status` and `release` use it).
    #[arg(long, default_value = "/run/virtwarden")]
    pub state_dir: PathBuf,
    /// Durable memory: restart history, quarantines, why domains are off (in a pod, mount it
    /// from the host so it survives pod restarts).
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The host-wide lock (one writer per host: run, operator, apply).
    #[arg(long, env = "VIRTWARDEN_LOCK_FILE", default_value = crate::lock::DEFAULT_LOCK_FILE)]
    pub lock_file: PathBuf,
    /// Host network (bridges, taps, forwarding): auto = on unless the URI is libvirt's test driver.
    #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
    pub network: NetworkMode,
    /// At most this many starts of stopped or crashed domains at once (lower startup order
    /// first); a reset of a running domain is not a start.
    #[arg(long, default_value_t = crate::engine::DEFAULT_MAX_CONCURRENT_STARTS, value_parser = parse_parallel)]
    pub max_concurrent_starts: usize,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate policy files and directories; print every problem with file:line:column.
    Check {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Show what apply would change, without changing anything.
    Plan(HostArgs),
    /// Change the host to match the policies, then re-read it and verify.
    Apply {
        #[command(flatten)]
        host: HostArgs,
        /// At most this many domains are acted on at once (each domain's own actions run in order).
        #[arg(long, default_value_t = crate::act::DEFAULT_PARALLEL, value_parser = parse_parallel)]
        parallel: usize,
    },
    /// Run as a host service: react to libvirt events and policy changes, resync periodically.
    Run {
        #[command(flatten)]
        service: ServiceArgs,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Run as a Kubernetes operator on this node (DaemonSet): HostPolicy resources instead of files.
    Operator {
        /// This node's name (the DaemonSet passes it from the downward API).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        #[command(flatten)]
        service: ServiceArgs,
        /// Run `exec` remediation steps only when the command resolves inside DIR (owned by root
        /// and not group- or world-writable); without it every `exec` step is refused, because
        /// whoever may write a HostPolicy would otherwise run commands as root on this node.
        #[arg(long, value_name = "DIR")]
        allow_exec_dir: Option<PathBuf>,
    },
    /// Lift a domain's quarantine, or a bridge's held uplink change (NET-OBJECT: the bridge or
    /// its port), once its cause is fixed, without editing the policy: through the running
    /// service, or in the durable memory when none runs.
    Release {
        /// The domain, or the bridge whose held uplink change is tried again.
        domain: String,
        #[command(flatten)]
        dirs: Dirs,
    },
    /// The durable memory. After it was lost (corrupt, unreadable, or deleted) down domains
    /// are left down (unless `restart: always`) until they are seen running or an admin
    /// confirms with `virtwarden memory confirm`.
    Memory {
        #[command(subcommand)]
        action: MemoryAction,
    },
    /// Ask the running service to reload its policy files and wait for its verdict
    /// (systemd's `ExecReload=`): exit 2 when it rejects them and keeps the last good policy.
    Reload {
        /// The running service's state directory (its control socket).
        #[arg(long, default_value = "/run/virtwarden")]
        state_dir: PathBuf,
    },
    /// Write the man pages (one per command) and the bash, zsh and fish completions into DIR
    /// (`make deb` packages them).
    #[command(hide = true)]
    GenerateAssets {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Show what a running `virtwarden run` reports (from its status file).
    Status {
        #[arg(long, default_value = "/run/virtwarden")]
        state_dir: PathBuf,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the JSON Schema of a HostPolicy document (for editors' YAML language servers).
    Schema,
    /// Say why domains cannot boot or be reached, with evidence and the fix. Changes nothing.
    Diagnose(DiagnoseArgs),
    /// Print the host as it is now as a HostPolicy that `plan` finds in sync (to adopt a host).
    Show(ShowArgs),
}

#[derive(Debug, Subcommand)]
pub enum MemoryAction {
    /// Confirm, after the memory was lost, that domains it left down may be started by their
    /// policies again (check first that none was stopped by an admin or quarantined on purpose).
    Confirm {
        #[command(flatten)]
        dirs: Dirs,
    },
}

/// What `release` and `memory confirm` take: the running service to ask, else the durable
/// memory to edit under the host lock.
#[derive(Debug, clap::Args)]
pub struct Dirs {
    /// The running service's state directory (its control socket).
    #[arg(long, default_value = "/run/virtwarden")]
    pub state_dir: PathBuf,
    /// The durable memory, edited directly when no service runs.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    #[arg(long, env = "VIRTWARDEN_LOCK_FILE", default_value = crate::lock::DEFAULT_LOCK_FILE)]
    pub lock_file: PathBuf,
}

fn parse_parallel(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("`{text}` is not a number from 1 to 1024")),
    }
}
