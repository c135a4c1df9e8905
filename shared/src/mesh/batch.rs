//! Batching for the mesh socket: many datagrams per system call each way.
//!
//! Sending, several equal-size frames to one address leave in one segmentation-offload
//! (GSO) send: quinn hands over several QUIC packets at once, and a relay forwards a run of
//! frames it received together ([`ForwardBatch`]). Receiving, one `recvmmsg` fills many
//! buffers, each possibly holding several datagrams the kernel coalesced (GRO); once
//! judged, the QUIC packets among them are packed to the front of quinn's buffers as runs
//! quinn can split ([`Packer`]), and those that do not fit wait, in order, for the next call
//! ([`PendingPacket`], [`deliver_pending`]).
//!
//! Nothing here reads a socket or a clock.

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::ops::Range;

use quinn::udp::{EcnCodepoint, RecvMeta};

/// Most bytes of relayed frames forwarded in one segmentation-offload send: below the
/// largest UDP payload of IPv4 (65,507), whatever the frames' size.
const FORWARD_MAX_BYTES: usize = 65_000;

/// A QUIC packet demultiplexed but not yet handed to quinn: a coalesced buffer held more
/// runs than quinn lent free buffers.
pub(super) struct PendingPacket {
    /// The virtual address of its sender.
    pub(super) addr: SocketAddr,
    pub(super) ecn: Option<EcnCodepoint>,
    pub(super) data: Vec<u8>,
}

/// Relayed frames on their way to the next hop, built back to back so that a run of
/// equal-size frames to one address (as a coalesced buffer of them usually is) leaves in one
/// segmentation-offload send instead of one syscall each.
#[derive(Default)]
pub(super) struct ForwardBatch {
    /// The frames, back to back; the core appends each one here.
    pub(super) buf: Vec<u8>,
    /// Where every frame in `buf` goes, with which ECN mark.
    to: Option<(SocketAddr, Option<EcnCodepoint>)>,
    /// Size of every frame but a shorter last one: the segment size.
    frame_len: usize,
    frames: usize,
}

/// A batch of forwarded frames ready for one send.
pub(super) struct ForwardSend<'a> {
    pub(super) to: SocketAddr,
    pub(super) ecn: Option<EcnCodepoint>,
    pub(super) frames: &'a [u8],
    pub(super) frame_len: usize,
    pub(super) count: usize,
}

impl ForwardBatch {
    /// Notes that a frame of `len` bytes to `addr` was appended to `buf` (after
    /// [`ForwardBatch::takes`] said it may join).
    pub(super) fn added(&mut self, addr: SocketAddr, ecn: Option<EcnCodepoint>, len: usize) {
        if self.frames == 0 {
            self.to = Some((addr, ecn));
            self.frame_len = len;
        }
        self.frames += 1;
    }

    /// The frames to send, if any; [`ForwardBatch::clear`] them once sent.
    pub(super) fn ready(&self) -> Option<ForwardSend<'_>> {
        let (to, ecn) = self.to?;
        Some(ForwardSend {
            to,
            ecn,
            frames: &self.buf,
            frame_len: self.frame_len,
            count: self.frames,
        })
    }

    /// Empties the batch.
    pub(super) fn clear(&mut self) {
        self.buf.clear();
        self.to = None;
        self.frames = 0;
        self.frame_len = 0;
    }

    /// Whether a frame of `len` bytes to `addr` can join the batch: GSO sends equal-size
    /// segments to one address, of which only the last may be shorter.
    pub(super) fn takes(
        &self,
        addr: SocketAddr,
        ecn: Option<EcnCodepoint>,
        len: usize,
        max_frames: usize,
    ) -> bool {
        self.frames == 0
            || (self.to == Some((addr, ecn))
                && len <= self.frame_len
                && self.buf.len() == self.frames * self.frame_len
                && self.frames < max_frames
                && self.buf.len() + len <= FORWARD_MAX_BYTES)
    }
}

/// Packs QUIC packets into the buffers quinn lends `poll_recv`. One `RecvMeta` describes a
/// buffer of packets from one (virtual) source with one ECN mark, all `stride` bytes but a
/// shorter last one; a packet that breaks that starts the next buffer.
#[derive(Default)]
pub(super) struct Packer {
    /// The run being filled; buffers before its slot hold finished runs.
    run: Option<Run>,
}

/// Packets from one source with one ECN mark in one of quinn's buffers.
#[derive(Clone, Copy)]
pub(super) struct Run {
    slot: usize,
    addr: SocketAddr,
    ecn: Option<EcnCodepoint>,
    stride: usize,
    len: usize,
}

impl Run {
    fn takes(
        &self,
        addr: SocketAddr,
        ecn: Option<EcnCodepoint>,
        len: usize,
        capacity: usize,
    ) -> bool {
        self.addr == addr
            && self.ecn == ecn
            && len <= self.stride
            // A packet shorter than the stride ended the run.
            && self.len.is_multiple_of(self.stride)
            && self.len + len <= capacity
    }

    fn meta(&self) -> RecvMeta {
        RecvMeta {
            addr: self.addr,
            len: self.len,
            stride: self.stride,
            ecn: self.ecn,
            // The packet's destination is this node's virtual address, which quinn knows;
            // the real local IP means nothing to it.
            dst_ip: None,
        }
    }
}

impl Packer {
    /// Where a packet of `len` bytes goes, as (buffer, offset), or `None` if it needs a
    /// buffer past `last_slot` (or fits none). Packets must be placed in arrival order.
    pub(super) fn place(
        &mut self,
        meta: &mut [RecvMeta],
        addr: SocketAddr,
        ecn: Option<EcnCodepoint>,
        len: usize,
        capacity: usize,
        last_slot: usize,
    ) -> Option<(usize, usize)> {
        if let Some(run) = &mut self.run
            && run.takes(addr, ecn, len, capacity)
        {
            let at = run.len;
            run.len += len;
            return Some((run.slot, at));
        }
        let slot = self.run.map_or(0, |run| run.slot + 1);
        if slot > last_slot || len > capacity || len == 0 {
            return None;
        }
        if let Some(run) = self.run {
            meta[run.slot] = run.meta();
        }
        self.run = Some(Run {
            slot,
            addr,
            ecn,
            stride: len,
            len,
        });
        Some((slot, 0))
    }

    /// Writes the last run's meta; returns how many buffers hold packets.
    pub(super) fn finish(self, meta: &mut [RecvMeta]) -> usize {
        match self.run {
            Some(run) => {
                meta[run.slot] = run.meta();
                run.slot + 1
            }
            None => 0,
        }
    }
}

/// Copies `range` of buffer `from` to offset `at` of buffer `to`.
pub(super) fn copy_between(
    bufs: &mut [IoSliceMut<'_>],
    from: usize,
    range: Range<usize>,
    to: usize,
    at: usize,
) {
    let end = at + range.len();
    if from == to {
        bufs[to].copy_within(range, at);
    } else if to < from {
        let (low, high) = bufs.split_at_mut(from);
        low[to][at..end].copy_from_slice(&high[0][range]);
    } else {
        let (low, high) = bufs.split_at_mut(to);
        high[0][at..end].copy_from_slice(&low[from][range]);
    }
}

/// Moves packets from `pending` into quinn's buffers, in order, as many as fit.
pub(super) fn deliver_pending(
    pending: &mut VecDeque<PendingPacket>,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
    slots: usize,
) -> usize {
    let capacity = bufs[..slots].iter().map(|b| b.len()).min().unwrap_or(0);
    let mut packer = Packer::default();
    while let Some(packet) = pending.front() {
        let len = packet.data.len();
        match packer.place(meta, packet.addr, packet.ecn, len, capacity, slots - 1) {
            Some((slot, at)) => bufs[slot][at..at + len].copy_from_slice(&packet.data),
            // Fits no buffer at all (quinn lent smaller ones than before): lost, as on the
            // wire.
            None if packer.run.is_none() => {}
            None => break,
        }
        pending.pop_front();
    }
    packer.finish(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pending packets fill the buffers quinn lends, as runs, and what does not fit waits.
    #[test]
    fn pending_packets_are_delivered_in_order_across_calls() {
        let x: SocketAddr = "[fd00::1]:1".parse().expect("addr");
        let y: SocketAddr = "[fd00::2]:1".parse().expect("addr");
        let sizes = [(x, 100), (x, 100), (x, 40), (y, 100), (x, 100), (x, 120)];
        let mut pending: VecDeque<PendingPacket> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(addr, len))| PendingPacket {
                addr,
                ecn: None,
                data: vec![i as u8; len],
            })
            .collect();
        let mut storage = vec![vec![0u8; 250]; 2];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); 2];
        // Runs: [x 100,100,40] [y 100] | [x 100] [x 120].
        let n = deliver_pending(&mut pending, &mut bufs, &mut meta, 2);
        assert_eq!(n, 2);
        assert_eq!((meta[0].addr, meta[0].len, meta[0].stride), (x, 240, 100));
        assert_eq!(&bufs[0][200..240], &[2u8; 40][..]);
        assert_eq!((meta[1].addr, meta[1].len, meta[1].stride), (y, 100, 100));
        assert_eq!(pending.len(), 2);
        let n = deliver_pending(&mut pending, &mut bufs, &mut meta, 2);
        assert_eq!(n, 2);
        assert_eq!((meta[0].addr, meta[0].len, meta[0].stride), (x, 100, 100));
        assert_eq!((meta[1].addr, meta[1].len, meta[1].stride), (x, 120, 120));
        assert_eq!(&bufs[1][..120], &[5u8; 120][..]);
        assert!(pending.is_empty());
    }
}
