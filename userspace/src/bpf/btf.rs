//! The few facts berth needs from the running kernel's BTF (`/sys/kernel/btf/vmlinux`): the
//! values of an enum (`skb_drop_reason`, which differ between kernels) and the byte offset of
//! a struct member (to check the fixed `sk_buff` offsets the undelivered-traffic programs
//! use).
//!
//! aya parses BTF but keeps its type table private, and the BTF crates that expose one are
//! LGPL; the format (Documentation/bpf/btf.rst) is a header, a type table and a string
//! table, so this reads just that.

use std::{collections::HashMap, path::Path};

/// Where the kernel exposes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Why the kernel's BTF could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not BTF ({what})")]
    Format { path: String, what: &'static str },
}

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

struct Type {
    name_off: u32,
    info: u32,
    /// Offset of the kind-specific data after the 12-byte common part.
    extra: usize,
}

impl Type {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 != 0
    }
}

/// A parsed BTF blob.
pub struct Btf {
    types: Vec<Type>,
    data: Vec<u8>,
    str_start: usize,
    str_len: usize,
    by_name: HashMap<String, Vec<u32>>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data).map_err(|what| BtfError::Format {
            path: path.display().to_string(),
            what,
        })
    }

    /// Parses a little-endian BTF blob (the only byte order berth's targets have).
    pub fn parse(data: Vec<u8>) -> Result<Self, &'static str> {
        let magic = data.get(..2).ok_or("truncated header")?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            return Err("bad magic");
        }
        let field = |i: usize| u32_at(&data, 4 + 4 * i).ok_or("truncated header");
        let hdr_len = field(0)? as usize;
        let (type_off, type_len) = (field(1)? as usize, field(2)? as usize);
        let (str_off, str_len) = (field(3)? as usize, field(4)? as usize);
        let type_start = hdr_len + type_off;
        let str_start = hdr_len + str_off;
        if type_start + type_len > data.len() || str_start + str_len > data.len() {
            return Err("sections past the end");
        }
        let mut types = vec![Type {
            name_off: 0,
            info: 0,
            extra: 0,
        }];
        let mut at = type_start;
        while at < type_start + type_len {
            let name_off = u32_at(&data, at).ok_or("truncated type")?;
            let info = u32_at(&data, at + 4).ok_or("truncated type")?;
            let t = Type {
                name_off,
                info,
                extra: at + 12,
            };
            let vlen = t.vlen();
            let extra = match t.kind() {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                0 | 20.. => return Err("unknown type kind"),
                _ => 0,
            };
            at += 12 + extra;
            types.push(t);
        }
        let mut btf = Self {
            types,
            data,
            str_start,
            str_len,
            by_name: HashMap::new(),
        };
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        for (id, t) in btf.types.iter().enumerate().skip(1) {
            if t.name_off != 0 {
                by_name
                    .entry(btf.string(t.name_off).to_owned())
                    .or_default()
                    .push(id as u32);
            }
        }
        btf.by_name = by_name;
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let off = off as usize;
        if off >= self.str_len {
            return "";
        }
        let s = &self.data[self.str_start + off..self.str_start + self.str_len];
        let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn named(&self, name: &str, kinds: &[u32]) -> Option<&Type> {
        self.by_name
            .get(name)?
            .iter()
            .map(|id| &self.types[*id as usize])
            .find(|t| kinds.contains(&t.kind()) && t.vlen() > 0)
    }

    /// Every `(name, value)` of the enum called `name`.
    pub fn enum_values(&self, name: &str) -> Option<Vec<(String, i64)>> {
        let t = self.named(name, &[KIND_ENUM, KIND_ENUM64])?;
        let wide = t.kind() == KIND_ENUM64;
        let step = if wide { 12 } else { 8 };
        (0..t.vlen())
            .map(|i| {
                let at = t.extra + i * step;
                let name = self.string(u32_at(&self.data, at)?).to_owned();
                let lo = u32_at(&self.data, at + 4)?;
                let value = if wide {
                    i64::from(lo) | i64::from(u32_at(&self.data, at + 8)?) << 32
                } else {
                    i64::from(lo as i32)
                };
                Some((name, value))
            })
            .collect()
    }

    /// The byte offset of `member` in the struct or union `name`, looking through anonymous
    /// struct and union members (as C does); `None` for a bitfield or a missing member.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let t = self.named(name, &[KIND_STRUCT, KIND_UNION])?;
        self.find_member(t, member, 0)
    }

    fn find_member(&self, t: &Type, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for i in 0..t.vlen() {
            let at = t.extra + i * 12;
            let name_off = u32_at(&self.data, at)?;
            let ty = u32_at(&self.data, at + 4)?;
            let raw = u32_at(&self.data, at + 8)?;
            let bits = if t.kind_flag() {
                raw & 0x00ff_ffff
            } else {
                raw
            };
            if name_off == 0 {
                let inner = self.types.get(ty as usize)?;
                if matches!(inner.kind(), KIND_STRUCT | KIND_UNION)
                    && let Some(off) = self.find_member(inner, member, depth + 1)
                {
                    return (bits % 8 == 0).then_some(bits / 8 + off);
                }
                continue;
            }
            if self.string(name_off) == member {
                let bitfield = t.kind_flag() && raw >> 24 != 0;
                return (!bitfield && bits % 8 == 0).then_some(bits / 8);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a blob: `struct s { union { int a; struct { int b; int c; }; }; int d; }` and
    /// `enum e { X = 2, Y = 7 }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0d\0e\0X\0Y\0";
        let at = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types: Vec<u32> = Vec::new();
        let mut push = |words: &[u32]| types.extend_from_slice(words);
        // 1: int
        push(&[at("int"), KIND_INT << 24, 4, 32]);
        // 2: anonymous struct { b; c; }
        push(&[0, KIND_STRUCT << 24 | 2, 8, at("b"), 1, 0, at("c"), 1, 32]);
        // 3: anonymous union { a; struct 2; }
        push(&[0, KIND_UNION << 24 | 2, 8, at("a"), 1, 0, 0, 2, 0]);
        // 4: struct s { union 3; d; }
        push(&[at("s"), KIND_STRUCT << 24 | 2, 12, 0, 3, 0, at("d"), 1, 64]);
        // 5: enum e
        push(&[at("e"), KIND_ENUM << 24 | 2, 4, at("X"), 2, at("Y"), 7]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, type_bytes.len() as u32, type_bytes.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&type_bytes);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_enum_values() {
        let btf = Btf::parse(blob()).unwrap();
        assert_eq!(btf.member_offset("s", "a"), Some(0));
        assert_eq!(btf.member_offset("s", "c"), Some(4));
        assert_eq!(btf.member_offset("s", "d"), Some(8));
        assert_eq!(btf.member_offset("s", "zz"), None);
        assert_eq!(
            btf.enum_values("e").unwrap(),
            vec![("X".to_owned(), 2), ("Y".to_owned(), 7)]
        );
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert_eq!(Btf::parse(vec![0; 40]).err(), Some("bad magic"));
        let mut b = blob();
        b.truncate(30);
        assert!(Btf::parse(b).is_err());
    }

    #[test]
    fn the_running_kernel_has_the_offsets_the_programs_use() {
        // Every kernel berth supports has CONFIG_DEBUG_INFO_BTF (world-readable).
        let btf = Btf::kernel().unwrap();
        use berth_common::undelivered::*;
        assert_eq!(btf.member_offset("sk_buff", "dev"), Some(SKB_DEV_OFFSET));
        assert_eq!(btf.member_offset("sk_buff", "cb"), Some(SKB_CB_OFFSET));
        assert_eq!(
            btf.member_offset("qdisc_skb_cb", "data"),
            Some(QDISC_CB_DATA_OFFSET)
        );
        let reasons = btf.enum_values("skb_drop_reason").unwrap();
        assert!(
            reasons
                .iter()
                .any(|(n, _)| n == "SKB_DROP_REASON_QDISC_DROP")
        );
    }
}
