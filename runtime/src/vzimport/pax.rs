//! ACLs and xattrs of vzdump archives (`tar --acls --xattrs --format=posix`).
//!
//! GNU tar stores an ACL as `SCHILY.acl.access` / `SCHILY.acl.default` PAX records holding the
//! long text form, one entry per line, and xattrs as `SCHILY.xattr.NAME` with the raw bytes.
//! PAX records are length-prefixed, so a value may hold newlines; the `tar` crate splits
//! records at newlines and loses such a record (an ACL always, a binary xattr holding a 0x0a
//! byte sometimes). [`Normalize`] sits between the decompressor and the `tar` crate and
//! rewrites every such record to `BERTH.hex.KEY=<hex of the value>`, fixing the header's size
//! and checksum; members are framed with the `tar` crate's own header parsing, so both see the
//! same entries. [`entry_xattrs`] then turns an entry's records into the xattrs to set.

use std::io::{self, Read};
use std::path::Path;

use super::ImportError;
use super::copy::shift_xattr;

/// Prefix of a record [`Normalize`] hex-encoded.
const HEX: &str = "BERTH.hex.";
/// A PAX header larger than this is not one GNU tar writes.
const MAX_PAX: u64 = 1 << 20;
const BLOCK: usize = 512;

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// One `LEN key=value\n` record, its length counting itself.
fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while base + len.to_string().len() != len {
        len += 1;
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// The records of a PAX header's data, read by their lengths.
fn parse_records(mut data: &[u8]) -> io::Result<Vec<(&[u8], &[u8])>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        // GNU tar pads nothing, but a NUL tail is harmless.
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("PAX record without a length".into()))?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("PAX record with a bad length".into()))?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad(format!("PAX record of length {len} does not fit")));
        }
        let kv = &data[sp + 1..len - 1];
        let eq = kv
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("PAX record without '='".into()))?;
        // A key never holds a newline; one that does would read differently to the tar crate.
        if kv[..eq].contains(&b'\n') {
            return Err(bad("PAX record key with a newline".into()));
        }
        out.push((&kv[..eq], &kv[eq + 1..]));
        data = &data[len..];
    }
    Ok(out)
}

fn hex(v: &[u8]) -> Vec<u8> {
    const D: &[u8; 16] = b"0123456789abcdef";
    v.iter()
        .flat_map(|b| [D[usize::from(b >> 4)], D[usize::from(b & 15)]])
        .collect()
}

fn unhex(v: &[u8]) -> Option<Vec<u8>> {
    let d = |c: u8| (c as char).to_digit(16).map(|x| x as u8);
    (v.len().is_multiple_of(2))
        .then(|| {
            v.chunks(2)
                .map(|p| Some(d(p[0])? << 4 | d(p[1])?))
                .collect()
        })
        .flatten()
}

/// A tar stream with every multi-line PAX record made single-line (see the module docs).
pub(crate) struct Normalize<R> {
    inner: R,
    out: Vec<u8>,
    pos: usize,
    /// Bytes of the current member's data still to pass through.
    data_left: u64,
    /// GNU sparse extension headers still to pass through.
    sparse_ext: bool,
    /// The size a PAX `size` record gives the next member.
    next_size: Option<u64>,
    /// Past the end-of-archive marker: the rest passes through untouched.
    ended: bool,
}

impl<R: Read> Normalize<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            out: Vec::new(),
            pos: 0,
            data_left: 0,
            sparse_ext: false,
            next_size: None,
            ended: false,
        }
    }

    /// Reads one 512-byte block; `None` at a clean end of the stream.
    fn block(&mut self) -> io::Result<Option<[u8; BLOCK]>> {
        let mut b = [0u8; BLOCK];
        let mut got = 0;
        while got < BLOCK {
            match self.inner.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(bad("the archive ends inside a block".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(b))
    }

    /// Fills `out` with the next piece of the rewritten stream; false at its end.
    fn refill(&mut self) -> io::Result<bool> {
        self.out.clear();
        self.pos = 0;
        if self.ended || self.data_left > 0 {
            let want = if self.ended {
                64 << 10
            } else {
                self.data_left.min(64 << 10) as usize
            };
            self.out.resize(want, 0);
            let n = self.inner.read(&mut self.out)?;
            self.out.truncate(n);
            if n == 0 && !self.ended {
                return Err(bad("the archive ends inside a member".into()));
            }
            self.data_left -= n as u64 * u64::from(!self.ended);
            return Ok(n > 0);
        }
        let Some(b) = self.block()? else {
            return Ok(false);
        };
        self.out.extend_from_slice(&b);
        if self.sparse_ext {
            // GnuExtSparseHeader: `isextended` at byte 504.
            self.sparse_ext = b[504] != 0;
            return Ok(true);
        }
        if b.iter().all(|&x| x == 0) {
            self.ended = true;
            return Ok(true);
        }
        let h = tar::Header::from_byte_slice(&b);
        let size = h
            .entry_size()
            .map_err(|e| bad(format!("member header: {e}")))?;
        let kind = h.entry_type();
        if kind.is_pax_local_extensions() {
            if size > MAX_PAX {
                return Err(bad(format!("a PAX header of {size} bytes")));
            }
            let padded = size.div_ceil(BLOCK as u64) as usize * BLOCK;
            let mut data = vec![0u8; padded];
            self.inner.read_exact(&mut data)?;
            data.truncate(size as usize);
            let recs = parse_records(&data)?;
            self.next_size = None;
            let mut new = Vec::with_capacity(data.len());
            for (k, v) in &recs {
                if *k == b"size" {
                    // What the tar crate will make of it: a number, or nothing.
                    self.next_size = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
                }
                if v.contains(&b'\n') {
                    let mut key = HEX.as_bytes().to_vec();
                    key.extend_from_slice(k);
                    new.extend(record(&key, &hex(v)));
                } else {
                    new.extend(record(k, v));
                }
            }
            let mut h = h.clone();
            h.set_size(new.len() as u64);
            h.set_cksum();
            self.out.clear();
            self.out.extend_from_slice(h.as_bytes());
            let pad = new.len().div_ceil(BLOCK) * BLOCK - new.len();
            self.out.extend(new);
            self.out.resize(self.out.len() + pad, 0);
            return Ok(true);
        }
        let size = if kind.is_pax_global_extensions() {
            size
        } else {
            self.next_size.take().unwrap_or(size)
        };
        self.data_left = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        if kind.is_gnu_sparse() {
            self.sparse_ext = h.as_gnu().is_some_and(|g| g.is_extended());
        }
        Ok(true)
    }
}

impl<R: Read> Read for Normalize<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            if !self.refill()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The binary `system.posix_acl_*` value of an ACL in long text form (`user::rw-`, one entry
/// per line or comma-separated, `#` comments); ids must be numeric.
pub fn acl_from_text(text: &str, path: &Path) -> Result<Vec<u8>, ImportError> {
    let bad =
        |why: String| ImportError::Invalid(format!("{}: ACL {text:?}: {why}", path.display()));
    let mut entries: Vec<(u16, u32, u16)> = Vec::new();
    for e in text.split(['\n', ',']) {
        let e = e.split('#').next().unwrap_or("").trim();
        if e.is_empty() {
            continue;
        }
        let parts: Vec<&str> = e.split(':').collect();
        let [tag, qual, perm] = parts[..] else {
            return Err(bad(format!("entry {e:?} is not tag:qualifier:permissions")));
        };
        let tag = match (tag, qual.is_empty()) {
            ("user" | "u", true) => 0x01,
            ("user" | "u", false) => 0x02,
            ("group" | "g", true) => 0x04,
            ("group" | "g", false) => 0x08,
            ("mask" | "m", true) => 0x10,
            ("other" | "o", true) => 0x20,
            _ => return Err(bad(format!("entry {e:?}: unknown tag"))),
        };
        let id = if qual.is_empty() {
            u32::MAX
        } else {
            qual.parse().map_err(|_| {
                bad(format!(
                    "entry {e:?} names {qual:?}: only numeric ids can be carried (the source host's names are not known here); make the archive with --xattrs too, which keeps the ACL with numeric ids"
                ))
            })?
        };
        let mut p = 0u16;
        for (i, c) in perm.chars().enumerate() {
            p |= match (i, c) {
                (0, 'r') => 4,
                (1, 'w') => 2,
                (2, 'x') => 1,
                (0..=2, '-') => 0,
                _ => return Err(bad(format!("entry {e:?}: bad permissions {perm:?}"))),
            };
        }
        if perm.len() != 3 {
            return Err(bad(format!("entry {e:?}: bad permissions {perm:?}")));
        }
        entries.push((tag, id, p));
    }
    // The kernel wants the entries in tag order, named ones by id.
    entries.sort_unstable_by_key(|&(t, id, _)| (t, id));
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, id, p) in entries {
        v.extend(tag.to_le_bytes());
        v.extend(p.to_le_bytes());
        v.extend(id.to_le_bytes());
    }
    Ok(v)
}

/// The xattrs an archive entry's PAX records ask for (`SCHILY.xattr.*`, and the ACLs of
/// `SCHILY.acl.*` unless the binary form came too), ACL ids and file capabilities shifted.
pub fn entry_xattrs<'a>(
    records: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    shift: Option<(u32, u32)>,
    path: &Path,
) -> Result<Vec<(String, Vec<u8>)>, ImportError> {
    let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut acls: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for (k, v) in records {
        let (k, v) = match k.strip_prefix(HEX) {
            Some(k) => (
                k,
                unhex(v).ok_or_else(|| {
                    ImportError::Invalid(format!("{}: bad {HEX} record {k}", path.display()))
                })?,
            ),
            None => (k, v.to_vec()),
        };
        if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
            xattrs.push((name.to_string(), v));
        } else if let Some(which) = k.strip_prefix("SCHILY.acl.") {
            let name = match which {
                "access" => "system.posix_acl_access",
                "default" => "system.posix_acl_default",
                _ => continue,
            };
            let text = String::from_utf8(v).map_err(|_| {
                ImportError::Invalid(format!("{}: {k} is not text", path.display()))
            })?;
            acls.push((name, acl_from_text(&text, path)?));
        }
    }
    for (name, v) in acls {
        if !xattrs.iter().any(|(n, _)| n == name) {
            xattrs.push((name.to_string(), v));
        }
    }
    xattrs
        .into_iter()
        .map(|(k, v)| {
            let v = shift_xattr(&k, v, shift, path)?;
            Ok((k, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_count_their_own_length() {
        for n in [0, 1, 5, 6, 7, 90, 95, 96, 990, 995] {
            let r = record(b"k", &vec![b'v'; n]);
            let len: usize = std::str::from_utf8(&r[..r.iter().position(|&b| b == b' ').unwrap()])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, r.len(), "{n}");
        }
    }

    #[test]
    fn acl_text_becomes_the_kernels_binary_form() {
        let v = acl_from_text(
            "user::rw-\nuser:1500:r--\ngroup::r--\ngroup:2500:rw-\t#effective:r--\nmask::r--\nother::---\n",
            Path::new("f"),
        )
        .unwrap();
        let want: Vec<(u16, u16, u32)> = vec![
            (1, 6, u32::MAX),
            (2, 4, 1500),
            (4, 4, u32::MAX),
            (8, 6, 2500),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ];
        let mut w = 2u32.to_le_bytes().to_vec();
        for (t, p, id) in want {
            w.extend(t.to_le_bytes());
            w.extend(p.to_le_bytes());
            w.extend(id.to_le_bytes());
        }
        assert_eq!(v, w);
        let e = acl_from_text("user:alice:r--", Path::new("/x/f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/f") && e.contains("numeric"), "{e}");
        assert!(acl_from_text("user::rwz", Path::new("f")).is_err());
        assert!(acl_from_text("bogus::rw-", Path::new("f")).is_err());
    }

    #[test]
    fn multi_line_records_survive_the_tar_crate() {
        let mut b = tar::Builder::new(Vec::new());
        let acl = b"user::rw-\nuser:1500:r--\ngroup::r--\nmask::r--\nother::r--\n";
        let mut pax = record(b"SCHILY.acl.access", acl);
        pax.extend(record(b"SCHILY.xattr.user.nl", b"a\nb"));
        pax.extend(record(b"SCHILY.xattr.user.plain", b"p"));
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(pax.len() as u64);
        h.set_cksum();
        b.append(&h, &pax[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("f").unwrap();
        h.set_size(3);
        h.set_cksum();
        b.append(&h, &b"abc"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let mut ar = tar::Archive::new(Normalize::new(&bytes[..]));
        let mut n = 0;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let recs: Vec<(String, Vec<u8>)> = e
                .pax_extensions()
                .unwrap()
                .unwrap()
                .map(|x| {
                    let x = x.unwrap();
                    (x.key().unwrap().to_string(), x.value_bytes().to_vec())
                })
                .collect();
            let x = entry_xattrs(
                recs.iter().map(|(k, v)| (k.as_str(), &v[..])),
                None,
                Path::new("f"),
            )
            .unwrap();
            assert_eq!(x[0], ("user.nl".to_string(), b"a\nb".to_vec()));
            assert_eq!(x[1], ("user.plain".to_string(), b"p".to_vec()));
            assert_eq!(x[2].0, "system.posix_acl_access");
            assert_eq!(
                x[2].1,
                acl_from_text(std::str::from_utf8(acl).unwrap(), Path::new("f")).unwrap()
            );
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            assert_eq!(s, "abc");
            n += 1;
        }
        assert_eq!(n, 1);
        let mut bad = record(b"a\n10 size", b"1");
        bad.extend(record(b"size", b"1000"));
        assert!(parse_records(&bad).is_err());
    }
}
