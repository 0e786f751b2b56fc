//! Billing what was delivered: traffic counted at the host-side interface and then dropped
//! by the shaper's queues, its packet-rate limit or the EDT horizon.
//!
//! The accounting programs count a packet when it enters berth's hooks, before any queue.
//! For the bill to be what was delivered, a later drop has to be taken back, row by row.
//! So the accounting program writes what it counted into the packet's control block
//! (`__sk_buff::cb`, the `qdisc_skb_cb::data` area, which tc and the qdiscs leave alone),
//! the shaper's classifier (attached only where something can drop) seals it with a keyed
//! checksum, and a program on the `kfree_skb` tracepoint adds a sealed packet's counts to
//! `UNDELIVERED` when it is freed with a drop reason of tc or a qdisc. Billed = counted −
//! undelivered.
//!
//! The seal makes the record unforgeable and tells where the drop happened:
//! - its key is a random secret of this pin directory (`SealConfig::secret`), which no CT
//!   can read, so a CT can neither fake a record nor have one berth host's drops taken for
//!   another's;
//! - for traffic to the CT it also covers the `skb->dev` pointer of the host-side interface:
//!   after the queue the packet enters the CT's namespace with the record still in place
//!   until its IP layer or a bridge clears the control block, and a CT root could drop it
//!   there itself (a tc rule on its own interface); such a drop is on another device, does
//!   not verify, and stays billed. Traffic from the CT only carries the record inside the
//!   host until the IFB re-injects it into the IP layer, which clears it.
//!
//! The programs use fixed offsets into `struct sk_buff` (`dev` at 16, `cb` at 40, the data
//! area at 8 into `cb`: so on every 64-bit kernel since 5.x); user space checks them
//! against the running kernel's BTF and leaves the secret at 0 (nothing is sealed) where
//! they differ.

/// `skb->dev` in `struct sk_buff` (after `next` and `prev`).
pub const SKB_DEV_OFFSET: u32 = 16;
/// `skb->cb` in `struct sk_buff`.
pub const SKB_CB_OFFSET: u32 = 40;
/// `qdisc_skb_cb::data` in the control block: where `__sk_buff::cb[0..5]` lives.
pub const QDISC_CB_DATA_OFFSET: u32 = 8;

/// `cb[3]` bit: the accounting program counted this packet and wrote the record.
pub const CB_COUNTED: u32 = 1 << 31;

/// `SHAPER_SEAL[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SealConfig {
    /// Key of the seal; 0 = sealing off.
    pub secret: u32,
    pub _pad: u32,
    /// Bit `r` set: drop reason `r` (`enum skb_drop_reason`, whose values differ between
    /// kernels, so user space fills this from BTF) is a drop by tc or a qdisc.
    pub reasons: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<SealConfig>() == 40);

/// The record in `cb[3]`: direction, family index (`SlotCounters` order) and class.
#[inline(always)]
pub const fn record_word(dir: u8, family_index: u8, class: u8) -> u32 {
    CB_COUNTED | dir as u32 | (family_index as u32) << 8 | (class as u32) << 16
}

/// The seal of the record `cb[0..4]` (ctid, packets, bytes, record word) on the device
/// `dev` (0 for traffic from the CT). A 64-bit multiply-xorshift mix keyed by the secret.
#[inline(always)]
pub const fn seal(secret: u32, cb: [u32; 4], dev: u64) -> u32 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xbf58_476d_1ce4_e5b9;
    const K3: u64 = 0x94d0_49bb_1331_11eb;
    let mut h = (secret as u64 | (cb[0] as u64) << 32).wrapping_mul(K1);
    h ^= (cb[1] as u64 | (cb[2] as u64) << 32).wrapping_mul(K2);
    h = (h ^ (h >> 31)).wrapping_mul(K3);
    h ^= (cb[3] as u64 | (secret as u64) << 32).wrapping_mul(K1);
    h ^= dev.wrapping_mul(K2);
    h = (h ^ (h >> 30)).wrapping_mul(K2);
    h = (h ^ (h >> 27)).wrapping_mul(K3);
    h ^= h >> 31;
    (h ^ (h >> 32)) as u32
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)] integers with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::SealConfig {}
}
