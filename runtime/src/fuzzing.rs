//! Entry points for the fuzz targets (`fuzz/`, built with `--features fuzzing`): the crate's own
//! decoders that are not public API, exposed as they are, without copies.

use std::net::IpAddr;
use std::path::Path;

use netlink_packet_core::NetlinkPayload;

use crate::net::MacAddr;
use crate::template::TemplateError;

/// Walks a received rtnetlink batch the way [`crate::net::Netlink`]'s reply loop does, reading
/// the extended-ack text of every error; returns how many messages decoded.
pub fn netlink_batch(buf: &[u8]) -> usize {
    let mut off = 0;
    let mut n = 0;
    while let Some(m) = crate::net::nl::next_reply(buf, &mut off) {
        let Ok(m) = m else { break };
        if let NetlinkPayload::Error(err) = &m.payload {
            let _ = crate::net::nl::extack_text(&err.header);
        }
        n += 1;
    }
    n
}

/// The inner messages of a received batch, for decoders of their attributes (tc's in berth).
pub fn netlink_messages(buf: &[u8]) -> Vec<netlink_packet_route::RouteNetlinkMessage> {
    let mut off = 0;
    let mut out = Vec::new();
    while let Some(Ok(m)) = crate::net::nl::next_reply(buf, &mut off) {
        if let NetlinkPayload::InnerMessage(inner) = m.payload {
            out.push(inner);
        }
    }
    out
}

/// Whether a frame read off a CT's interface claims `addr` for a MAC other than `own` (the
/// address-conflict probe; the frame's content is the CT's to choose).
pub fn frame_claims(frame: &[u8], addr: IpAddr, own: [u8; 6]) -> Option<[u8; 6]> {
    crate::net::packet::claims(frame, addr, MacAddr(own)).map(|m| m.0)
}

/// The archive extractor with the options an OpenVZ import uses (`vzimport`) or a template
/// import (all off), into the existing empty directory `root`, expanding to at most `max_bytes`.
pub fn extract(
    archive: &Path,
    root: &Path,
    devices: bool,
    xattrs: bool,
    sparse: bool,
    shift: Option<(u32, u32)>,
    max_bytes: Option<u64>,
) -> Result<(), TemplateError> {
    let opts = crate::template::ExtractOpts {
        shift,
        devices,
        xattrs,
        sparse,
    };
    crate::template::extract_limited(archive, root, opts, max_bytes)
}
