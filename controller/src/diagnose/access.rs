//! Can QEMU's user open a path? The kernel's rules, evaluated for another identity without
//! becoming it: every parent directory searchable, the file readable (and writable), mode bits
//! or the POSIX ACL (`system.posix_acl_access`) with its mask. Reads metadata only.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::identity::{Accounts, QemuUser};

pub const READ: u32 = 4;
pub const WRITE: u32 = 2;
pub const EXEC: u32 = 1;

/// A POSIX ACL entry's tag (acl_xattr.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclTag {
    UserObj,
    User(u32),
    GroupObj,
    Group(u32),
    Mask,
    Other,
}

/// An access ACL: entries with their rwx bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl(pub Vec<(AclTag, u32)>);

impl Acl {
    /// Decode the `system.posix_acl_access` value: a little-endian u32 version (2), then
    /// entries of u16 tag, u16 perm, u32 id.
    pub fn decode(bytes: &[u8]) -> Option<Acl> {
        let version = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
        if version != 2 || !(bytes.len() - 4).is_multiple_of(8) {
            return None;
        }
        let mut entries = Vec::new();
        for e in bytes[4..].chunks_exact(8) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u32::from(u16::from_le_bytes([e[2], e[3]])) & 7;
            let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let tag = match tag {
                0x01 => AclTag::UserObj,
                0x02 => AclTag::User(id),
                0x04 => AclTag::GroupObj,
                0x08 => AclTag::Group(id),
                0x10 => AclTag::Mask,
                0x20 => AclTag::Other,
                _ => return None,
            };
            entries.push((tag, perm));
        }
        Some(Acl(entries))
    }

    fn get(&self, tag: AclTag) -> Option<u32> {
        self.0.iter().find(|(t, _)| *t == tag).map(|(_, p)| *p)
    }

    /// `getfacl`'s short form: `user::rwx,user:64055:r-x,group::---,mask::r-x,other::---`.
    pub fn text(&self, accounts: &Accounts) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(tag, perm)| {
                let p = rwx(*perm);
                match tag {
                    AclTag::UserObj => format!("user::{p}"),
                    AclTag::User(id) => format!("user:{}:{p}", accounts.user_name(*id)),
                    AclTag::GroupObj => format!("group::{p}"),
                    AclTag::Group(id) => format!("group:{}:{p}", accounts.group_name(*id)),
                    AclTag::Mask => format!("mask::{p}"),
                    AclTag::Other => format!("other::{p}"),
                }
            })
            .collect();
        parts.join(",")
    }
}

fn rwx(p: u32) -> String {
    [(READ, 'r'), (WRITE, 'w'), (EXEC, 'x')].iter().map(|(b, c)| if p & b != 0 { *c } else { '-' }).collect()
}

/// What the kernel looks at to decide access to one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    pub path: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub is_dir: bool,
    pub acl: Option<Acl>,
}

impl FileFacts {
    /// Read metadata (following symlinks) and the access ACL of `path`.
    pub fn read(path: &Path) -> std::io::Result<FileFacts> {
        let m = std::fs::metadata(path)?;
        Ok(FileFacts {
            path: path.to_path_buf(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            is_dir: m.is_dir(),
            acl: access_acl(path),
        })
    }

    /// `/srv/vm is 0700 root:root`, plus the ACL when there is one.
    pub fn describe(&self, accounts: &Accounts) -> String {
        let mut s = format!(
            "{} is {:04o} {}:{}",
            self.path.display(),
            self.mode,
            accounts.user_name(self.uid),
            accounts.group_name(self.gid)
        );
        if let Some(acl) = &self.acl {
            s.push_str(&format!(" with ACL {}", acl.text(accounts)));
        }
        s
    }

    /// Whether a process with `uid` and `groups` gets all of `want` (POSIX.1e ACL algorithm,
    /// plain mode bits when there is no ACL). Root passes (CAP_DAC_OVERRIDE), except that
    /// executing a regular file needs some x bit.
    pub fn allows(&self, uid: u32, groups: &[u32], want: u32) -> bool {
        if uid == 0 {
            return self.is_dir || want & EXEC == 0 || self.mode & 0o111 != 0;
        }
        let granted = |perm: u32| perm & want == want;
        let owner = (self.mode >> 6) & 7;
        let group = (self.mode >> 3) & 7;
        let other = self.mode & 7;
        let Some(acl) = &self.acl else {
            return if uid == self.uid {
                granted(owner)
            } else if groups.contains(&self.gid) {
                granted(group)
            } else {
                granted(other)
            };
        };
        let mask = acl.get(AclTag::Mask).unwrap_or(7);
        if uid == self.uid {
            return granted(acl.get(AclTag::UserObj).unwrap_or(owner));
        }
        if let Some(p) = acl.get(AclTag::User(uid)) {
            return granted(p & mask);
        }
        // Any matching group entry that grants it is enough; matching ones that do not deny.
        let mut matched = false;
        for (tag, perm) in &acl.0 {
            let applies = match tag {
                AclTag::GroupObj => groups.contains(&self.gid),
                AclTag::Group(g) => groups.contains(g),
                _ => false,
            };
            if applies {
                matched = true;
                if granted(perm & mask) {
                    return true;
                }
            }
        }
        if matched {
            return false;
        }
        granted(acl.get(AclTag::Other).unwrap_or(other))
    }
}

/// The access ACL of `path` (following symlinks), if it has one beyond the mode bits.
fn access_acl(path: &Path) -> Option<Acl> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = c"system.posix_acl_access";
    let mut buf = vec![0u8; 1024];
    // SAFETY: both strings are NUL-terminated; buf is valid for buf.len() bytes and getxattr
    // writes at most that many.
    let n = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return None;
    }
    buf.truncate(n as usize);
    Acl::decode(&buf)
}

/// Why QEMU's user cannot open a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The directory or file that refuses.
    pub facts: FileFacts,
    /// The rights it lacks: EXEC (search) for a directory, READ/WRITE for the file.
    pub need: u32,
}

impl Denied {
    /// `/srv/vm is 0700 root:root (libvirt-qemu:kvm needs x)`
    pub fn evidence(&self, who: &QemuUser, accounts: &Accounts) -> String {
        let need = if self.facts.is_dir { "search (x)".to_string() } else { rwx(self.need).replace('-', "") };
        format!("{}; {} needs {need}", self.facts.describe(accounts), who.display())
    }

    /// The two usual ways out: widen the mode, or an ACL entry for just this user.
    pub fn fix(&self, who: &QemuUser) -> String {
        let p = self.facts.path.display();
        let bits = if self.facts.is_dir { "x".to_string() } else { rwx(self.need).replace('-', "") };
        let chmod = if self.facts.is_dir { format!("chmod o+x {p}") } else { format!("chown {} {p}", who.display()) };
        format!("{chmod}, or setfacl -m u:{}:{bits} {p}", who.user_name)
    }
}

/// Check that `who` can open `path` for `want` (READ, READ|WRITE): every directory on the way
/// searchable, then the file itself unless `check_file` is false (libvirt will chown it).
/// Symlinks are followed: the directories of the link and of its target both count.
pub fn can_open(path: &Path, who: &QemuUser, want: u32, check_file: bool) -> std::io::Result<Result<(), Denied>> {
    let mut dirs: Vec<PathBuf> = path.ancestors().skip(1).map(Path::to_path_buf).collect();
    let real = std::fs::canonicalize(path)?;
    for d in real.ancestors().skip(1) {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_path_buf());
        }
    }
    // Outermost first, so the evidence names the first directory that stops QEMU.
    dirs.sort_by_key(|d| d.components().count());
    for dir in dirs.iter().filter(|d| !d.as_os_str().is_empty()) {
        let facts = FileFacts::read(dir)?;
        if !facts.allows(who.uid, &who.groups, EXEC) {
            return Ok(Err(Denied { facts, need: EXEC }));
        }
    }
    if check_file {
        let facts = FileFacts::read(&real)?;
        if !facts.allows(who.uid, &who.groups, want) {
            return Ok(Err(Denied { facts: FileFacts { path: path.to_path_buf(), ..facts }, need: want }));
        }
    }
    Ok(Ok(()))
}

/// Whether `path` lives on NFS (root-squash maps root to nobody there).
pub fn is_nfs(path: &Path) -> bool {
    const NFS_SUPER_MAGIC: i64 = 0x6969;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c is NUL-terminated; statfs fills st on success and we read it only then.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: rc == 0 means the kernel initialised st.
    // f_type's integer type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let nfs = rc == 0 && unsafe { st.assume_init() }.f_type as i64 == NFS_SUPER_MAGIC;
    nfs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn user(uid: u32, groups: &[u32]) -> QemuUser {
        QemuUser {
            uid,
            gid: groups[0],
            groups: groups.to_vec(),
            user_name: format!("u{uid}"),
            group_name: format!("g{}", groups[0]),
            dynamic_ownership: false,
            source: "test".into(),
        }
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn setfacl(args: &[&str]) {
        let out = std::process::Command::new("setfacl").args(args).output().expect("setfacl (package acl)");
        assert!(out.status.success(), "setfacl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn mode_bits_owner_group_other() {
        let f = FileFacts { path: "/x".into(), mode: 0o640, uid: 10, gid: 20, is_dir: false, acl: None };
        assert!(f.allows(10, &[99], READ | WRITE));
        assert!(f.allows(11, &[20], READ));
        assert!(!f.allows(11, &[20], READ | WRITE));
        assert!(!f.allows(11, &[21], READ));
        assert!(f.allows(0, &[0], READ | WRITE), "root reads anything");
    }

    #[test]
    fn acl_user_entry_is_limited_by_the_mask_and_groups_any_match() {
        let acl = Acl(vec![
            (AclTag::UserObj, 7),
            (AclTag::User(64055), 6),
            (AclTag::GroupObj, 0),
            (AclTag::Group(994), 4),
            (AclTag::Mask, 4),
            (AclTag::Other, 0),
        ]);
        let f = FileFacts { path: "/x".into(), mode: 0o740, uid: 0, gid: 0, is_dir: false, acl: Some(acl) };
        assert!(f.allows(64055, &[64055], READ));
        assert!(!f.allows(64055, &[64055], READ | WRITE), "mask r-- limits user:64055:rw-");
        assert!(f.allows(5, &[994], READ));
        assert!(!f.allows(5, &[0], READ), "group::--- matched and denies; other is not consulted");
        assert!(!f.allows(6, &[7], READ));
    }

    /// `TMP/vm/a.img`: the image 0666 in a 0700 directory owned by root.
    fn image_in_private_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        let img = vm.join("a.img");
        std::fs::write(&img, b"x").unwrap();
        chmod(dir.path(), 0o755);
        chmod(&vm, 0o700);
        chmod(&img, 0o666);
        (dir, vm, img)
    }

    #[test]
    fn unsearchable_parent_directory_is_named_with_mode_and_owner() {
        let (_dir, vm, img) = image_in_private_dir();
        let who = user(64055, &[994]);
        let denied = can_open(&img, &who, READ, true).unwrap().unwrap_err();
        assert_eq!(denied.facts.path, vm);
        assert_eq!(denied.need, EXEC);
        let accounts = Accounts::parse("root:x:0:0::/:/bin/sh\n", "root:x:0:\n");
        assert_eq!(
            denied.evidence(&who, &accounts),
            format!("{} is 0700 root:root; u64055:g994 needs search (x)", vm.display())
        );
        assert_eq!(denied.fix(&who), format!("chmod o+x {0}, or setfacl -m u:u64055:x {0}", vm.display()));
        chmod(&vm, 0o711);
        assert_eq!(can_open(&img, &who, READ | WRITE, true).unwrap(), Ok(()));
        chmod(&img, 0o644);
        let denied = can_open(&img, &who, READ | WRITE, true).unwrap().unwrap_err();
        assert_eq!((denied.facts.path.clone(), denied.need), (img.clone(), READ | WRITE));
        assert_eq!(can_open(&img, &who, READ | WRITE, false).unwrap(), Ok(()), "libvirt chowns the file itself");
    }

    #[test]
    fn posix_acl_on_a_real_directory_grants_and_denies() {
        let (_dir, vm, img) = image_in_private_dir();
        let who = user(64055, &[994]);
        setfacl(&["-m", "u:64055:x", vm.to_str().unwrap()]);
        let facts = FileFacts::read(&vm).unwrap();
        assert!(facts.acl.is_some(), "ACL read back from the xattr");
        assert_eq!(can_open(&img, &who, READ, true).unwrap(), Ok(()));
        // The mask takes the x away again, although the entry still lists it.
        setfacl(&["-m", "m::r", vm.to_str().unwrap()]);
        let denied = can_open(&img, &who, READ, true).unwrap().unwrap_err();
        assert_eq!(denied.facts.path, vm);
        let accounts = Accounts::parse("", "");
        assert!(
            denied
                .evidence(&who, &accounts)
                .contains("with ACL user::rwx,user:64055:--x,group::---,mask::r--,other::---"),
            "{}",
            denied.evidence(&who, &accounts)
        );
    }

    #[test]
    fn symlinked_image_checks_the_target_directories_too() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let hidden = dir.path().join("hidden");
        std::fs::create_dir(&hidden).unwrap();
        chmod(&hidden, 0o700);
        std::fs::write(hidden.join("real.img"), b"x").unwrap();
        chmod(&hidden.join("real.img"), 0o666);
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(hidden.join("real.img"), &link).unwrap();
        let denied = can_open(&link, &user(64055, &[994]), READ, true).unwrap().unwrap_err();
        assert_eq!(denied.facts.path, hidden);
    }

    #[test]
    fn local_tempdir_is_not_nfs() {
        assert!(!is_nfs(&std::env::temp_dir()));
    }
}
