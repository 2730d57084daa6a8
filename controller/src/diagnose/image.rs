//! What an image file really is, from its header bytes (the way `qemu-img info` probes it):
//! qcow2, raw, vmdk, vdi, vhdx, vpc, qed, luks; and the backing file a qcow2 image names.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How much of an image is read to recognise it (an ISO 9660 signature sits at 0x8001).
pub const HEAD_BYTES: usize = 0x8800;

/// An image format, named as libvirt's `<driver type>` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Qed,
    Vmdk,
    Vdi,
    Vhdx,
    Vpc,
    Luks,
    /// No known header: raw (an ISO image is raw too).
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
            Format::Vpc => "vpc",
            Format::Luks => "luks",
            Format::Raw => "raw",
        }
    }
}

/// The format the first bytes of an image show, and the words for the evidence.
pub fn detect(head: &[u8]) -> (Format, &'static str) {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        return (Format::Qcow2, "QFI\\xfb: qcow2");
    }
    if at(0, b"QED\0") {
        return (Format::Qed, "QED\\0: qed");
    }
    if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        return (Format::Vmdk, "KDMV: vmdk");
    }
    if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        return (Format::Vdi, "7f 10 da be at 0x40: vdi");
    }
    if at(0, b"vhdxfile") {
        return (Format::Vhdx, "vhdxfile: vhdx");
    }
    if at(0, b"conectix") {
        return (Format::Vpc, "conectix: vpc");
    }
    if at(0, b"LUKS\xba\xbe") {
        return (Format::Luks, "LUKS\\xba\\xbe: luks");
    }
    if at(0x8001, b"CD001") {
        return (Format::Raw, "CD001 at 0x8001: an ISO 9660 image, raw");
    }
    (Format::Raw, "no image header: raw")
}

/// Open a file an image chain names: a regular file or a block device, never a FIFO,
/// socket or character device ([`crate::observe::guarded`]).
fn open(path: &Path) -> std::io::Result<crate::observe::guarded::Opened> {
    crate::observe::guarded::open(path, true).map_err(|e| match e {
        crate::observe::guarded::GuardedError::Io { source, .. } => source,
        other => std::io::Error::new(std::io::ErrorKind::InvalidInput, other.to_string()),
    })
}

/// Read up to `n` bytes from the start of `path` (a file or a block device).
pub fn read_head(path: &Path, n: usize) -> std::io::Result<Vec<u8>> {
    open(path)?.read_at(0, n)
}

/// A qcow2 image's backing file and its declared format (header extension 0xe2792aca).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// As written in the image (often relative to the image's directory).
    pub name: String,
    /// The path it resolves to.
    pub path: PathBuf,
    pub format: Option<String>,
}

/// The backing file named by the qcow2 image at `path`, if any.
pub fn qcow2_backing(path: &Path) -> std::io::Result<Option<Backing>> {
    let mut f = open(path)?.file;
    let mut header = [0u8; 104];
    let n = read_up_to(&mut f, &mut header)?;
    if n < 72 || &header[0..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let be32 = |o: usize| u32::from_be_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    let version = be32(4);
    let offset = u64::from_be_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    let size = be32(16) as usize;
    if offset == 0 || size == 0 || size > 4096 {
        return Ok(None);
    }
    let mut name = vec![0u8; size];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    let name = String::from_utf8_lossy(&name).into_owned();
    // Header extensions follow the header: 72 bytes in v2, header_length (at 100) in v3.
    let ext_start = if version >= 3 && n >= 104 { be32(100) as u64 } else { 72 };
    let format = backing_format(&mut f, ext_start, offset)?;
    let p = Path::new(&name);
    let resolved = if p.is_absolute() { p.to_path_buf() } else { path.parent().unwrap_or(Path::new("/")).join(p) };
    Ok(Some(Backing { name, path: resolved, format }))
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Walk the header extensions up to `limit` looking for the backing format.
fn backing_format(f: &mut std::fs::File, start: u64, limit: u64) -> std::io::Result<Option<String>> {
    const BACKING_FORMAT: u32 = 0xe279_2aca;
    let mut at = start;
    while at + 8 <= limit {
        f.seek(SeekFrom::Start(at))?;
        let mut h = [0u8; 8];
        if read_up_to(f, &mut h)? < 8 {
            return Ok(None);
        }
        let kind = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as u64;
        if kind == 0 {
            return Ok(None);
        }
        if kind == BACKING_FORMAT && len <= 64 {
            let mut v = vec![0u8; len as usize];
            f.read_exact(&mut v)?;
            return Ok(Some(String::from_utf8_lossy(&v).into_owned()));
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img (package qemu-utils)");
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn formats_made_by_qemu_img_are_recognised_by_their_headers() {
        let dir = tempfile::tempdir().unwrap();
        for (fmt, want) in [
            ("qcow2", Format::Qcow2),
            ("raw", Format::Raw),
            ("vmdk", Format::Vmdk),
            ("vdi", Format::Vdi),
            ("vhdx", Format::Vhdx),
            ("qed", Format::Qed),
            ("vpc", Format::Vpc),
        ] {
            let p = dir.path().join(format!("a.{fmt}"));
            qemu_img(&["create", "-q", "-f", fmt, p.to_str().unwrap(), "1M"]);
            let head = read_head(&p, HEAD_BYTES).unwrap();
            assert_eq!(detect(&head).0, want, "{fmt}");
        }
    }

    #[test]
    fn iso_image_is_raw() {
        let mut head = vec![0u8; 0x8010];
        head[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(detect(&head), (Format::Raw, "CD001 at 0x8001: an ISO 9660 image, raw"));
    }

    #[test]
    fn qcow2_backing_chain_names_relative_files_and_their_format() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "1M"]);
        let top = dir.path().join("top.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", top.to_str().unwrap()]);
        let b = qcow2_backing(&top).unwrap().unwrap();
        assert_eq!(b, Backing { name: "base.img".into(), path: base.clone(), format: Some("raw".into()) });
        assert_eq!(qcow2_backing(&base).unwrap(), None, "raw images have no backing file");
    }
}
