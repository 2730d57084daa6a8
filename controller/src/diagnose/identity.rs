//! Who QEMU runs as for a domain: the domain's DAC `<seclabel>`, else libvirt's DAC base label
//! from the capabilities, else `user`/`group` in qemu.conf, else libvirt's built-in default;
//! plus whether libvirt chowns the images at start (`dynamic_ownership`). Names resolve through
//! the passwd and group files, supplementary groups included (libvirt gives QEMU those too).

use std::path::Path;

use crate::observe::domain_xml::DomainXmlFacts;

/// libvirt's built-in QEMU user and group on Debian when qemu.conf names none.
pub const DEFAULT_USER: &str = "libvirt-qemu";
pub const DEFAULT_GROUP: &str = "libvirt-qemu";

/// The settings of qemu.conf diagnose uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConf {
    pub user: Option<String>,
    pub group: Option<String>,
    pub dynamic_ownership: bool,
}

impl Default for QemuConf {
    fn default() -> Self {
        QemuConf { user: None, group: None, dynamic_ownership: true }
    }
}

/// Parse qemu.conf (libvirt's config syntax: `key = "string"` or `key = 1`, `#` comments).
pub fn parse_qemu_conf(text: &str) -> QemuConf {
    let mut conf = QemuConf::default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim().trim_matches('"');
        match key.trim() {
            "user" => conf.user = Some(value.to_string()),
            "group" => conf.group = Some(value.to_string()),
            "dynamic_ownership" => conf.dynamic_ownership = value != "0",
            _ => {}
        }
    }
    conf
}

/// qemu.conf at `path`; a missing file means libvirt's defaults.
pub fn read_qemu_conf(path: &Path) -> std::io::Result<QemuConf> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse_qemu_conf(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(QemuConf::default()),
        Err(e) => Err(e),
    }
}

/// Users and groups (from /etc/passwd and /etc/group).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    /// (name, uid, primary gid)
    pub users: Vec<(String, u32, u32)>,
    /// (name, gid, members)
    pub groups: Vec<(String, u32, Vec<String>)>,
}

impl Accounts {
    pub fn parse(passwd: &str, group: &str) -> Self {
        let users = passwd
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                let members = f
                    .get(3)
                    .map(|m| m.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
                    .unwrap_or_default();
                Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, members))
            })
            .collect();
        Accounts { users, groups }
    }

    /// Missing files read as empty (numeric ids still work).
    pub fn read(passwd: &Path, group: &Path) -> Self {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        Accounts::parse(&read(passwd), &read(group))
    }

    pub fn user_name(&self, uid: u32) -> String {
        self.users.iter().find(|u| u.1 == uid).map(|u| u.0.clone()).unwrap_or_else(|| uid.to_string())
    }

    pub fn group_name(&self, gid: u32) -> String {
        self.groups.iter().find(|g| g.1 == gid).map(|g| g.0.clone()).unwrap_or_else(|| gid.to_string())
    }

    fn uid(&self, text: &str) -> Option<u32> {
        match text.strip_prefix('+') {
            Some(n) => n.parse().ok(),
            None => self.users.iter().find(|u| u.0 == text).map(|u| u.1).or_else(|| text.parse().ok()),
        }
    }

    fn gid(&self, text: &str) -> Option<u32> {
        match text.strip_prefix('+') {
            Some(n) => n.parse().ok(),
            None => self.groups.iter().find(|g| g.0 == text).map(|g| g.1).or_else(|| text.parse().ok()),
        }
    }

    /// The groups a process of `uid` running with group `gid` has, as libvirt computes them
    /// for QEMU (virGetGroupList): `gid`, the user's primary group from passwd, and every
    /// group listing the user as a member.
    fn group_list(&self, uid: u32, gid: u32) -> Vec<u32> {
        let mut gids = vec![gid];
        if let Some((name, _, primary)) = self.users.iter().find(|u| u.1 == uid) {
            if !gids.contains(primary) {
                gids.push(*primary);
            }
            for (_, g, members) in &self.groups {
                if members.iter().any(|m| m == name) && !gids.contains(g) {
                    gids.push(*g);
                }
            }
        }
        gids
    }
}

/// The identity QEMU runs with for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUser {
    pub uid: u32,
    pub gid: u32,
    /// Primary and supplementary groups.
    pub groups: Vec<u32>,
    /// `libvirt-qemu` (the uid as a number when it has no name).
    pub user_name: String,
    pub group_name: String,
    /// libvirt chowns the domain's images to this user at start.
    pub dynamic_ownership: bool,
    /// Where the identity came from (`qemu.conf`, `the domain's seclabel`, …), for evidence.
    pub source: String,
}

impl QemuUser {
    /// `libvirt-qemu:kvm`
    pub fn display(&self) -> String {
        format!("{}:{}", self.user_name, self.group_name)
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Work out QEMU's identity for `spec`. `base_label` is libvirt's DAC base label for the
/// domain type from the capabilities (`+64055:+994`), when known.
pub fn qemu_user(spec: &DomainXmlFacts, base_label: Option<&str>, conf: &QemuConf, accounts: &Accounts) -> QemuUser {
    let dac = spec.seclabels.iter().find(|l| l.model == "dac");
    let no_relabel = dac.is_some_and(|l| l.no_relabel) || spec.seclabels.iter().any(|l| l.kind == "none");
    let (label, source) = match (dac.and_then(|l| l.label.clone()), base_label) {
        (Some(l), _) => (l, "the domain's DAC seclabel".to_string()),
        (None, Some(b)) => (b.to_string(), "libvirt's DAC base label (capabilities)".to_string()),
        (None, None) => match (&conf.user, &conf.group) {
            (None, None) => {
                (format!("{DEFAULT_USER}:{DEFAULT_GROUP}"), "libvirt's default (qemu.conf sets no user)".into())
            }
            (user, group) => {
                // Each one unset keeps libvirt's built-in default.
                let user = user.as_deref().unwrap_or(DEFAULT_USER);
                let group = group.as_deref().unwrap_or(DEFAULT_GROUP);
                (format!("{user}:{group}"), "qemu.conf".into())
            }
        },
    };
    let (user_text, group_text) = label.split_once(':').unwrap_or((label.as_str(), ""));
    let uid = accounts.uid(user_text).unwrap_or(u32::MAX);
    let gid = if group_text.is_empty() {
        accounts.users.iter().find(|u| u.1 == uid).map(|u| u.2).unwrap_or(u32::MAX)
    } else {
        accounts.gid(group_text).unwrap_or(u32::MAX)
    };
    QemuUser {
        uid,
        gid,
        groups: accounts.group_list(uid, gid),
        user_name: accounts.user_name(uid),
        group_name: accounts.group_name(gid),
        dynamic_ownership: conf.dynamic_ownership && !no_relabel,
        source,
    }
}

/// libvirt's DAC base label for `virt_type` (`kvm`, `qemu`) in a capabilities document:
/// `<secmodel><model>dac</model><baselabel type='kvm'>+64055:+994</baselabel></secmodel>`.
pub fn dac_base_label(capabilities_xml: &str, virt_type: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(capabilities_xml).ok()?;
    doc.descendants()
        .filter(|n| n.has_tag_name("secmodel"))
        .find(|sm| sm.children().any(|c| c.has_tag_name("model") && c.text() == Some("dac")))?
        .children()
        .find(|c| c.has_tag_name("baselabel") && c.attribute("type") == Some(virt_type))
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::domain_xml::SecLabel;

    fn accounts() -> Accounts {
        Accounts::parse(
            "root:x:0:0::/root:/bin/sh\nlibvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n",
            "root:x:0:\nkvm:x:994:libvirt-qemu\nlibvirt-qemu:x:64055:\n",
        )
    }

    #[test]
    fn qemu_conf_user_group_and_dynamic_ownership() {
        let c = parse_qemu_conf(
            "# user = \"nobody\"\nuser = \"libvirt-qemu\"  # who\ngroup=\"kvm\"\ndynamic_ownership = 0\n",
        );
        assert_eq!(
            c,
            QemuConf { user: Some("libvirt-qemu".into()), group: Some("kvm".into()), dynamic_ownership: false }
        );
        assert_eq!(parse_qemu_conf(""), QemuConf::default());
    }

    #[test]
    fn qemu_conf_user_with_supplementary_groups() {
        let conf = parse_qemu_conf("user = \"libvirt-qemu\"\ngroup = \"kvm\"\n");
        let u = qemu_user(&DomainXmlFacts::default(), None, &conf, &accounts());
        assert_eq!((u.uid, u.gid, u.display()), (64055, 994, "libvirt-qemu:kvm".to_string()));
        // As `ps -o supgrp` shows for QEMU on a Debian host: kvm, libvirt-qemu.
        assert_eq!(u.groups, vec![994, 64055]);
        assert!(u.dynamic_ownership);
        // A user without a group keeps libvirt's default group.
        let conf = parse_qemu_conf("user = \"libvirt-qemu\"\n");
        let u = qemu_user(&DomainXmlFacts::default(), None, &conf, &accounts());
        assert_eq!((u.gid, u.groups.clone()), (64055, vec![64055, 994]));
    }

    #[test]
    fn domain_seclabel_beats_capabilities_beats_qemu_conf() {
        let conf = parse_qemu_conf("user = \"root\"\n");
        let mut spec = DomainXmlFacts::default();
        let u = qemu_user(&spec, Some("+64055:+994"), &conf, &accounts());
        assert_eq!(u.display(), "libvirt-qemu:kvm");
        spec.seclabels.push(SecLabel {
            model: "dac".into(),
            kind: "static".into(),
            no_relabel: true,
            label: Some("+0:+0".into()),
        });
        let u = qemu_user(&spec, Some("+64055:+994"), &conf, &accounts());
        assert!(u.is_root());
        assert!(!u.dynamic_ownership, "relabel='no' turns dynamic ownership off for the domain");
    }

    #[test]
    fn base_label_from_capabilities() {
        let caps = "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>\
                    <secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+994</baselabel>\
                    <baselabel type='qemu'>+64055:+993</baselabel></secmodel></host></capabilities>";
        assert_eq!(dac_base_label(caps, "qemu").as_deref(), Some("+64055:+993"));
        assert_eq!(dac_base_label(caps, "test"), None);
    }
}
