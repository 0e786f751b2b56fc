//! What berth decodes from the kernel and from a CT's wire: an rtnetlink reply batch (messages,
//! error extended-acks, tc qdiscs/classes with HTB options) and the frames the address-conflict
//! probe reads off a CT's interface. Nothing may panic, loop or over-read.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;

const OWN: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

fuzz_target!(|data: &[u8]| {
    let n = berth_runtime::fuzzing::netlink_batch(data);
    assert!(
        n <= data.len() / 16,
        "{n} messages from {} bytes",
        data.len()
    );
    for o in berth::fuzzing::tc_objects(data) {
        if let Some((rate, ceil, _burst)) = o.htb {
            // Both come from the same attribute set; nothing to assert on their relation (the
            // kernel's), only that decoding them finished.
            let _ = (rate, ceil);
        }
    }
    for addr in [
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10)),
    ] {
        if let Some(mac) = berth_runtime::fuzzing::frame_claims(data, addr, OWN) {
            assert_ne!(mac, OWN, "own MAC reported as a conflict");
        }
    }
});
