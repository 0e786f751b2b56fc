//! Entry points for the fuzz targets (`fuzz/`, built with `--features fuzzing`): decoders that
//! are not public API, exposed as they are.

use netlink_packet_route::RouteNetlinkMessage;

use crate::shaper::tc::{TcObject, to_object};

/// What the shaper reads from a qdisc or class dump (`tc::qdiscs`, `tc::classes`): every tc
/// message of a received batch turned into a [`TcObject`], HTB options decoded.
pub fn tc_objects(batch: &[u8]) -> Vec<TcObject> {
    berth_runtime::fuzzing::netlink_messages(batch)
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(t)
            | RouteNetlinkMessage::NewTrafficClass(t) => Some(to_object(t)),
            _ => None,
        })
        .collect()
}
