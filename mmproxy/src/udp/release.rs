//! Ending the kernel's hold on a new flow (`--udp-datapath kernel`), so that it
//! starts relaying the flow without overtaking the flow's datagrams still queued
//! for user space.
//!
//! When a flow is handed to the kernel, more of its datagrams may already wait in
//! the listening socket (a burst's first few arrive before user space has set the
//! flow up). The kernel therefore adds the inbound half *held* (`RELAY_HELD`): it
//! leaves the flow's datagrams to user space and counts them. The listener ends
//! the hold in three steps:
//!
//! 1. a datagram of a held flow reaches user space: the flow waits for release;
//! 2. after the batch, the listener reads the kernel's count for each waiting flow
//!    (a *snapshot*);
//! 3. at the next receive that finds the socket's queue empty (a batch shorter than
//!    its room, or nothing at all), every datagram counted in the snapshot has
//!    been taken and sent on, so the listener writes the snapshot back as the
//!    release. The kernel relays the flow's next datagram only if its count still
//!    equals the release; if it counted more in the meantime, those go to user
//!    space and the steps repeat.
//!
//! The snapshot is read before the receive that finds the queue empty, and the
//! kernel counts a datagram before it reaches the socket: a datagram counted in
//! the snapshot is in the queue by then, except one still between the tc program
//! and the socket on another CPU while the listener makes its next system call.
//! Each release costs one map lookup, one map update and, when the queue looked
//! empty, one more recvmmsg, once per flow (or per change of its registration).
//!
//! A flow whose datagrams never pause (one arrives between every snapshot and
//! release) would stay in user space for good; after [`EXACT_ATTEMPTS`] releases
//! the kernel did not take, the listener ends the hold whatever the count
//! (`RELEASE_ANYWAY`), and the few datagrams then between the kernel and user
//! space may be overtaken once. A listener that never finds its queue empty (it is
//! saturated) would keep every new flow in user space exactly when handing flows
//! to the kernel matters most: after [`BUSY_BATCHES`] full batches in a row with
//! snapshots waiting, it ends those holds the same way.
use mmproxy_common::RELEASE_ANYWAY;

use crate::ebpf::HeldPunts;
use crate::stats::Stats;

use super::flow::{Flow, FlowId};
use super::flow_table::FlowTable;

/// Exact releases tried on one registration before one that ends the hold anyway.
pub(super) const EXACT_ATTEMPTS: u8 = 8;

/// Batches in a row that left the queue non-empty, with snapshots waiting, before
/// those holds end anyway: at 32 datagrams a batch, more than a default-sized
/// receive queue holds, so what was queued at the snapshot has been taken.
pub(super) const BUSY_BATCHES: u32 = 64;

/// Where a flow's inbound half stands, as its listener knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Hold {
    /// Not held, or not registered: nothing to do.
    #[default]
    Free,
    /// Added held, or a release was written: the kernel may still hold it.
    Held,
    /// Held, and a datagram of it reached user space: listed for a snapshot.
    Waiting,
    /// The kernel's count, read before the listener's next receive.
    Snapped(HeldPunts),
}

/// A listener's flows on their way out of the kernel's hold.
#[derive(Debug, Default)]
pub(super) struct Releases {
    waiting: Vec<FlowId>,
    snapped: Vec<FlowId>,
    busy: Busy,
}

/// Counts batches that left the queue non-empty while snapshots waited.
#[derive(Debug, Default)]
struct Busy(u32);

impl Busy {
    /// After a batch: whether the snapshots waiting must be released anyway now.
    fn after_batch(&mut self, drained: bool, pending: bool) -> bool {
        if drained || !pending {
            self.0 = 0;
            return false;
        }
        self.0 += 1;
        if self.0 >= BUSY_BATCHES {
            self.0 = 0;
            return true;
        }
        false
    }
}

impl Releases {
    /// A datagram of flow `id` reached user space (step 1).
    pub(super) fn saw(&mut self, id: FlowId, hold: &mut Hold) {
        if *hold == Hold::Held {
            *hold = Hold::Waiting;
            self.waiting.push(id);
        }
    }

    /// Whether a snapshot waits for the queue to be seen empty.
    pub(super) fn pending(&self) -> bool {
        !self.snapped.is_empty()
    }

    /// After a batch was sent on: when its receive found the queue empty, the
    /// snapshots taken before it are released (step 3); then the flows seen in it
    /// are snapshotted (step 2).
    pub(super) fn after_batch(
        &mut self,
        drained: bool,
        table: &mut FlowTable<FlowId, Flow>,
        stats: &Stats,
    ) {
        if drained {
            self.queue_empty(table, stats);
        }
        if self.busy.after_batch(drained, self.pending()) {
            self.release(table, stats, true);
        }
        for id in self.waiting.drain(..) {
            let Some(kernel) = table.peek_mut(&id).and_then(|f| f.kernel.as_mut()) else {
                continue;
            };
            if kernel.hold != Hold::Waiting {
                continue;
            }
            kernel.hold = match kernel.held() {
                Some(held) => {
                    self.snapped.push(id);
                    Hold::Snapped(held)
                }
                // The kernel let go already (or lost the half: the re-offer then
                // adds it held again).
                None => Hold::Free,
            };
        }
    }

    /// A receive found the socket's queue empty: releases every snapshot (step 3).
    pub(super) fn queue_empty(&mut self, table: &mut FlowTable<FlowId, Flow>, stats: &Stats) {
        self.release(table, stats, false);
    }

    /// Releases every snapshot; `anyway` ends the holds whatever the kernel counted.
    fn release(&mut self, table: &mut FlowTable<FlowId, Flow>, stats: &Stats, anyway: bool) {
        for id in self.snapped.drain(..) {
            let Some(kernel) = table.peek_mut(&id).and_then(|f| f.kernel.as_mut()) else {
                continue;
            };
            // Re-registered since the snapshot: its hold starts over.
            if let Hold::Snapped(mut held) = kernel.hold {
                if anyway || kernel.release_attempts >= EXACT_ATTEMPTS {
                    held.punts = RELEASE_ANYWAY;
                }
                kernel.release_attempts = kernel.release_attempts.saturating_add(1);
                kernel.release(held);
                kernel.hold = Hold::Held;
                Stats::inc(&stats.udp_kernel_released);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Busy, BUSY_BATCHES};

    /// Only an unbroken run of full batches with snapshots waiting ends the holds
    /// anyway; a batch that empties the queue, or one with nothing waiting, starts
    /// the run over.
    #[test]
    fn a_saturated_listener_releases_anyway_after_busy_batches() {
        let mut b = Busy::default();
        for _ in 1..BUSY_BATCHES {
            assert!(!b.after_batch(false, true));
        }
        assert!(b.after_batch(false, true));
        for _ in 1..BUSY_BATCHES {
            assert!(!b.after_batch(false, true));
        }
        assert!(!b.after_batch(true, true), "an emptied queue starts over");
        for _ in 1..BUSY_BATCHES {
            assert!(!b.after_batch(false, true));
        }
        assert!(!b.after_batch(false, false), "nothing waiting starts over");
        assert!(!b.after_batch(false, true));
    }
}
