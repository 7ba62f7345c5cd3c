//! The answers owed to sync writes (issue 5; docs/decisions.md "Synchronous replication").
//!
//! Every write of a sync volume waits (in the NBD handler, [`super::capture::SyncWait`]) until
//! the driver answers it here:
//!
//! - **Durable**: the target reported the write's frame durable (`Durable { id, frames }` with
//!   the frame inside), or committed its epoch, or (after a break) a catch-up that covers it
//!   committed.
//! - **Degraded** (policy `degrade`): the link broke or the target was too slow; the write is on
//!   the local disk and in the bitmap, acknowledged now, resynced later.
//! - **Failed** (policy `block`): the target stayed away longer than the block timeout; the
//!   client gets EIO for a write the DR site does not have.
//!
//! Sans-IO: time comes in as arguments, so the policies are tested without sockets.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use blockferry_protocol::repl::Epoch;
use tokio::sync::oneshot;

use super::capture::SyncOutcome;
use super::shipper::OnDisconnect;

/// One write waiting for its answer.
#[derive(Debug)]
struct Waiting {
    /// The sync batch (epoch id) its frames went into; `None` while held unsent (block
    /// policy, target away).
    batch: Option<Epoch>,
    /// Frames of that batch through this write's last frame (the write is durable once the
    /// target reports at least this many).
    frames: u32,
    /// The capture epoch (close sequence number) the write is in.
    epoch: u64,
    since: Instant,
    done: oneshot::Sender<SyncOutcome>,
}

/// The sync writes not yet answered, in the order they were captured.
#[derive(Debug, Default)]
pub struct SyncAcks {
    waiting: VecDeque<Waiting>,
    /// Since when writes are held for a target that is away (block policy).
    held_since: Option<Instant>,
}

impl SyncAcks {
    pub fn new() -> SyncAcks {
        SyncAcks::default()
    }

    /// Writes waiting for an answer.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// A write of capture epoch `epoch` whose last frame is frame `frames - 1` of sync batch
    /// `batch` was sent.
    pub fn sent(
        &mut self,
        batch: Epoch,
        frames: u32,
        epoch: u64,
        now: Instant,
        done: oneshot::Sender<SyncOutcome>,
    ) {
        self.waiting.push_back(Waiting { batch: Some(batch), frames, epoch, since: now, done });
    }

    /// A write of capture epoch `epoch` that could not be sent (target away, policy block): it
    /// waits until the target has every write of its epoch ([`SyncAcks::covered`]), or for the
    /// block timeout.
    pub fn hold(&mut self, epoch: u64, now: Instant, done: oneshot::Sender<SyncOutcome>) {
        self.held_since.get_or_insert(now);
        self.waiting.push_back(Waiting { batch: None, frames: 0, epoch, since: now, done });
    }

    /// The target has every write of the capture epochs through `epoch` (committed, or
    /// promised by a `Durable` of a later sync batch): the writes of those epochs, sent or
    /// held, are answered, in order. Returns how many.
    pub fn covered(&mut self, epoch: u64) -> usize {
        let n = self.answer_while(|w| w.epoch <= epoch);
        if !self.waiting.iter().any(|w| w.batch.is_none()) {
            self.held_since = None;
        }
        n
    }

    /// Answers every waiting write `Degraded` (the volume left sync mode: it is on the local
    /// disk and the bitmap or an epoch ships it). Returns how many.
    pub fn release_all(&mut self) -> usize {
        self.held_since = None;
        let n = self.waiting.len();
        for w in self.waiting.drain(..) {
            let _ = w.done.send(SyncOutcome::Degraded);
        }
        n
    }

    /// Writes held for a target that is away (block policy).
    pub fn held(&self) -> usize {
        self.waiting.iter().filter(|w| w.batch.is_none()).count()
    }

    /// The target made the first `frames` frames of sync batch `batch` durable: every write
    /// of an earlier batch or inside that prefix is answered. Returns how many.
    pub fn durable(&mut self, batch: Epoch, frames: u32) -> usize {
        self.answer_while(|w| match w.batch {
            Some(b) => b < batch || (b == batch && w.frames <= frames),
            None => false,
        })
    }

    /// The target committed every batch through `through`: their writes are answered.
    pub fn committed(&mut self, through: Epoch) -> usize {
        self.answer_while(|w| w.batch.is_some_and(|b| b <= through))
    }

    /// After a break: a catch-up that covers every write captured so far committed (the
    /// bitmap held them all), so every waiting write, sent or held, is at the target.
    pub fn caught_up(&mut self) -> usize {
        self.held_since = None;
        let n = self.waiting.len();
        for w in self.waiting.drain(..) {
            let _ = w.done.send(SyncOutcome::Durable);
        }
        n
    }

    /// True if the oldest sent write has waited longer than `ack_timeout` (counts as a
    /// disconnect).
    pub fn overdue(&self, now: Instant, ack_timeout: Duration) -> bool {
        self.waiting
            .iter()
            .find(|w| w.batch.is_some())
            .is_some_and(|w| now.saturating_duration_since(w.since) > ack_timeout)
    }

    /// The link broke (or a write was overdue). `Degrade`: every waiting write is answered
    /// `Degraded` (it is on the local disk and in the bitmap). `Block`: they are held; the
    /// frames already sent may or may not have arrived, so only the catch-up answers them.
    pub fn disconnected(&mut self, policy: OnDisconnect, now: Instant) -> usize {
        match policy {
            OnDisconnect::Degrade => {
                let n = self.waiting.len();
                for w in self.waiting.drain(..) {
                    let _ = w.done.send(SyncOutcome::Degraded);
                }
                n
            }
            OnDisconnect::Block => {
                for w in &mut self.waiting {
                    w.batch = None;
                }
                if !self.waiting.is_empty() {
                    self.held_since.get_or_insert(now);
                }
                0
            }
        }
    }

    /// Block policy: writes held longer than `timeout` fail (EIO to the client). Returns how
    /// many failed.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
        let mut n = 0;
        while let Some(w) = self.waiting.front() {
            if w.batch.is_some() || now.saturating_duration_since(w.since) <= timeout {
                break;
            }
            if let Some(w) = self.waiting.pop_front() {
                let _ = w.done.send(SyncOutcome::Failed(format!(
                    "the DR target did not have the write after {:.1} s (on-disconnect = block)",
                    timeout.as_secs_f64()
                )));
                n += 1;
            }
        }
        if self.waiting.is_empty() {
            self.held_since = None;
        }
        n
    }

    /// When [`SyncAcks::overdue`] or [`SyncAcks::expire`] next has something to do (for the
    /// driver's timer): the oldest sent write's `ack_timeout`, the oldest held write's
    /// `block_timeout`.
    pub fn next_deadline(&self, ack_timeout: Duration, block_timeout: Duration) -> Option<Instant> {
        let sent = self.waiting.iter().find(|w| w.batch.is_some()).map(|w| w.since + ack_timeout);
        let held = self.next_expiry(block_timeout);
        match (sent, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the next held write times out (for the driver's timer).
    pub fn next_expiry(&self, timeout: Duration) -> Option<Instant> {
        self.waiting.iter().find(|w| w.batch.is_none()).map(|w| w.since + timeout)
    }

    /// Since when writes have been held (block policy), for status.
    pub fn held_since(&self) -> Option<Instant> {
        self.held_since
    }

    fn answer_while(&mut self, durable: impl Fn(&Waiting) -> bool) -> usize {
        let mut n = 0;
        // Answers in order: a write is answered only after every earlier one (invariant 4's
        // order also holds for acknowledgements).
        while self.waiting.front().is_some_and(&durable) {
            if let Some(w) = self.waiting.pop_front() {
                let _ = w.done.send(SyncOutcome::Durable);
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter() -> (oneshot::Sender<SyncOutcome>, oneshot::Receiver<SyncOutcome>) {
        oneshot::channel()
    }

    #[test]
    fn durable_answers_in_order_up_to_the_reported_prefix() {
        let t0 = Instant::now();
        let mut a = SyncAcks::new();
        let mut rx = Vec::new();
        for (batch, frames) in [(1, 1), (1, 2), (1, 3), (2, 1)] {
            let (tx, r) = waiter();
            a.sent(Epoch(batch), frames, batch, t0, tx);
            rx.push(r);
        }
        assert_eq!(a.durable(Epoch(1), 2), 2);
        assert_eq!(rx[0].try_recv().unwrap(), SyncOutcome::Durable);
        assert_eq!(rx[1].try_recv().unwrap(), SyncOutcome::Durable);
        assert!(rx[2].try_recv().is_err());
        // A later batch's durability covers the earlier batch's frames too.
        assert_eq!(a.durable(Epoch(2), 1), 2);
        assert!(a.is_empty());
    }

    #[test]
    fn commit_answers_whole_batches() {
        let t0 = Instant::now();
        let mut a = SyncAcks::new();
        let (tx1, mut r1) = waiter();
        let (tx2, mut r2) = waiter();
        a.sent(Epoch(4), 7, 4, t0, tx1);
        a.sent(Epoch(5), 1, 5, t0, tx2);
        assert_eq!(a.committed(Epoch(4)), 1);
        assert_eq!(r1.try_recv().unwrap(), SyncOutcome::Durable);
        assert!(r2.try_recv().is_err());
    }

    #[test]
    fn degrade_acknowledges_everything_waiting() {
        let t0 = Instant::now();
        let mut a = SyncAcks::new();
        let (tx, mut r) = waiter();
        a.sent(Epoch(1), 1, 1, t0, tx);
        assert!(!a.overdue(t0 + Duration::from_secs(1), Duration::from_secs(5)));
        assert!(a.overdue(t0 + Duration::from_secs(6), Duration::from_secs(5)));
        let deadline = a.next_deadline(Duration::from_secs(5), Duration::from_secs(30));
        assert_eq!(deadline, Some(t0 + Duration::from_secs(5)));
        assert_eq!(a.disconnected(OnDisconnect::Degrade, t0), 1);
        assert_eq!(r.try_recv().unwrap(), SyncOutcome::Degraded);
    }

    #[test]
    fn block_holds_then_fails_after_the_timeout_or_answers_after_the_catch_up() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(2);
        let mut a = SyncAcks::new();
        let (tx1, mut r1) = waiter();
        a.sent(Epoch(1), 1, 1, t0, tx1);
        assert_eq!(a.disconnected(OnDisconnect::Block, t0), 0);
        // Sent before the break: its durability report may never come; it is held now.
        assert_eq!(a.durable(Epoch(1), 1), 0);
        let (tx2, mut r2) = waiter();
        a.hold(2, t0 + Duration::from_secs(1), tx2);
        assert_eq!(a.next_expiry(timeout), Some(t0 + timeout));
        assert_eq!(a.next_deadline(Duration::from_secs(5), timeout), Some(t0 + timeout));
        assert_eq!(a.expire(t0 + Duration::from_millis(1500), timeout), 0);
        assert_eq!(a.expire(t0 + Duration::from_millis(2500), timeout), 1);
        match r1.try_recv().unwrap() {
            SyncOutcome::Failed(m) => assert!(m.contains("on-disconnect = block"), "{m}"),
            o => panic!("{o:?}"),
        }
        assert!(r2.try_recv().is_err());
        // The link came back and the catch-up committed: the held write is at the target.
        assert_eq!(a.caught_up(), 1);
        assert_eq!(r2.try_recv().unwrap(), SyncOutcome::Durable);
        assert_eq!(a.held_since(), None);
    }

    #[test]
    fn covered_answers_sent_and_held_writes_of_the_covered_epochs_in_order() {
        let t0 = Instant::now();
        let mut a = SyncAcks::new();
        let (tx1, mut r1) = waiter();
        let (tx2, mut r2) = waiter();
        let (tx3, mut r3) = waiter();
        a.hold(3, t0, tx1);
        a.sent(Epoch(9), 1, 4, t0, tx2);
        a.hold(5, t0, tx3);
        assert_eq!(a.held(), 2);
        // A durable report of the sent write waits behind the held write before it.
        assert_eq!(a.durable(Epoch(9), 1), 0);
        assert_eq!(a.covered(4), 2);
        assert_eq!(r1.try_recv().unwrap(), SyncOutcome::Durable);
        assert_eq!(r2.try_recv().unwrap(), SyncOutcome::Durable);
        assert!(r3.try_recv().is_err());
        assert!(a.held_since().is_some());
        assert_eq!(a.release_all(), 1);
        assert_eq!(r3.try_recv().unwrap(), SyncOutcome::Degraded);
        assert_eq!(a.held_since(), None);
    }
}
