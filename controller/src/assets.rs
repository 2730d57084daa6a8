//! Man pages (one per command, clap_mangen) and shell completions (clap_complete) generated from
//! the command line's own definition, so they never disagree with `--help`.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Write `DIR/man/virtwarden.1`, `DIR/man/virtwarden-COMMAND.1` for every visible command, and
/// `DIR/completions/{virtwarden.bash,_virtwarden,virtwarden.fish}`.
pub fn generate(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut cmd = Cli::command();
    cmd.build();
    write_man(&cmd, &man.join("virtwarden.1"))?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("virtwarden-{}", sub.get_name());
        let page = sub.clone().display_name(name.clone()).bin_name(format!("virtwarden {}", sub.get_name()));
        write_man(&page, &man.join(format!("{name}.1")))?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "virtwarden", &completions)?;
    }
    Ok(())
}

fn write_man(cmd: &clap::Command, path: &Path) -> std::io::Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(path, buf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_man_page_per_command_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        super::generate(dir.path()).unwrap();
        for page in ["virtwarden.1", "virtwarden-run.1", "virtwarden-reload.1", "virtwarden-check.1"] {
            let text = std::fs::read_to_string(dir.path().join("man").join(page)).unwrap();
            assert!(text.contains(".TH"), "{page} is no man page");
        }
        assert!(!dir.path().join("man/virtwarden-generate-assets.1").exists(), "hidden commands get no page");
        for file in ["virtwarden.bash", "_virtwarden", "virtwarden.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
            assert!(text.contains("reload"), "{file} lacks the reload command");
        }
    }
}
