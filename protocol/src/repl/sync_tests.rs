//! Sync batches (issue 5) in the sans-IO sessions: the wire additions are pinned, the target
//! session forwards live frames and never aborts a sync batch, and the agent session numbers
//! frames, reports `Durable` and forgets its sync batches at a disconnect.

use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::agent::{self, AgentConfig, AgentSession};
use super::frame::*;
use super::msg::{self, *};
use super::target::{Action, ReplicaInfo, TargetConfig, TargetSession};
use super::types::*;

const BS: u32 = 4096;

fn geometry() -> Geometry {
    Geometry::new(1 << 30, BS).unwrap()
}

fn hello() -> Hello {
    Hello {
        version: VERSION,
        volume: VolumeId([0x22; 16]),
        name: "vol".into(),
        geometry: geometry(),
        generation: Generation::new(7).unwrap(),
        history: vec![],
        mode: Mode::Sync,
        compression: vec![Compression::Off],
        max_frame: DEFAULT_MAX_FRAME,
    }
}

/// New messages and kinds went at the ends of their enums: the old encodings are unchanged.
#[test]
fn durable_and_sync_kind_golden_bytes() {
    let hex = |m: &TargetMsg| {
        let mut b = BytesMut::new();
        msg::encode(m, &mut b);
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    };
    assert_eq!(hex(&TargetMsg::Committed { through: Epoch(5) }), "000000020205");
    assert_eq!(hex(&TargetMsg::Pong { nonce: 1 }), "000000020501");
    assert_eq!(hex(&TargetMsg::Durable { id: Epoch(5), frames: 300 }), "000000040605ac02");
    let mut b = BytesMut::new();
    msg::encode(&TargetMsg::Durable { id: Epoch(5), frames: 300 }, &mut b);
    assert_eq!(
        msg::decode::<TargetMsg>(&mut b).unwrap(),
        Some(TargetMsg::Durable { id: Epoch(5), frames: 300 })
    );
    let mut h = BytesMut::new();
    BatchHeader { kind: BatchKind::Sync, id: Epoch(9), base: Epoch(8) }.encode(&mut h);
    assert_eq!(h[4], 4, "sync batch kind code");
    let back = BatchHeader::decode(&mut h).unwrap().unwrap();
    assert_eq!(back.kind, BatchKind::Sync);
    // The Failed message of a sync batch names its kind with the new variant (index 3).
    let f = TargetMsg::Failed {
        id: Epoch(1),
        kind: BatchKind::Sync,
        code: FailCode::Checksum,
        message: String::new(),
    };
    assert_eq!(hex(&f), "000000050301030000");
}

fn drain(s: &mut TargetSession) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn up_target() -> TargetSession {
    let mut s = TargetSession::new(TargetConfig::default());
    let mut b = BytesMut::new();
    msg::encode(&AgentMsg::Hello(hello()), &mut b);
    s.control_bytes(&b);
    drain(&mut s);
    s.opened(Ok(ReplicaInfo {
        volume: VolumeId([0x22; 16]),
        geometry: geometry(),
        state: ReplicaState::Consistent,
        committed: Epoch(3),
        generation: Generation::new(7),
    }));
    drain(&mut s);
    assert!(s.is_up());
    s
}

fn data_frame(w: &mut BatchWriter, block: u64, fill: u8) -> BytesMut {
    let data = bytes::Bytes::from(vec![fill; BS as usize]);
    let crc = crc32c::crc32c(&data);
    let mut out = BytesMut::new();
    Frame::Data(w.data(block * u64::from(BS), data, crc, Compression::Off)).encode(&mut out);
    out
}

fn has_abort(a: &[Action]) -> bool {
    a.iter().any(|a| matches!(a, Action::Abort { .. }))
}

#[test]
fn target_forwards_live_sync_frames_and_reports_durable() {
    let mut s = up_target();
    let mut h = BytesMut::new();
    BatchHeader { kind: BatchKind::Sync, id: Epoch(4), base: Epoch(3) }.encode(&mut h);
    s.stream_bytes(1, &h);
    assert!(matches!(drain(&mut s).as_slice(), [Action::Begin(h)] if h.kind == BatchKind::Sync));
    let mut w = BatchWriter::new();
    for i in 0..3u8 {
        // Each frame reaches the store as soon as it is complete, before the batch ends.
        s.stream_bytes(1, &data_frame(&mut w, u64::from(i), i + 1));
        let a = drain(&mut s);
        assert!(matches!(a.as_slice(), [Action::Data { id, .. }] if *id == Epoch(4)), "{a:?}");
    }
    s.durable(Epoch(4), 3);
    assert_eq!(drain(&mut s), vec![Action::Send(TargetMsg::Durable { id: Epoch(4), frames: 3 })]);
    let mut e = BytesMut::new();
    Frame::End(w.end(Epoch(4))).encode(&mut e);
    s.stream_bytes(1, &e);
    let a = drain(&mut s);
    assert!(
        matches!(a.as_slice(), [Action::End { id, end }] if *id == Epoch(4) && end.frames == 3)
    );
    s.stream_finished(1);
    assert!(drain(&mut s).is_empty());
}

#[test]
fn target_never_aborts_a_sync_batch() {
    // A stream that ends without End: the batch stays open (sealed at session end).
    let mut s = up_target();
    let mut b = BytesMut::new();
    BatchHeader { kind: BatchKind::Sync, id: Epoch(4), base: Epoch(3) }.encode(&mut b);
    let mut w = BatchWriter::new();
    b.extend_from_slice(&data_frame(&mut w, 0, 1));
    s.stream_bytes(1, &b);
    drain(&mut s);
    s.stream_finished(1);
    assert!(drain(&mut s).is_empty(), "no abort for a sync batch");

    // A corrupted frame: Failed (kind Sync, checksum) so the agent reconnects; no Abort, and
    // nothing after the bad frame reaches the store.
    let mut s = up_target();
    let mut b = BytesMut::new();
    BatchHeader { kind: BatchKind::Sync, id: Epoch(4), base: Epoch(3) }.encode(&mut b);
    let mut w = BatchWriter::new();
    b.extend_from_slice(&data_frame(&mut w, 0, 1));
    let mut bad = data_frame(&mut w, 1, 2);
    bad[FRAME_HEADER_LEN + 10] ^= 1;
    b.extend_from_slice(&bad);
    b.extend_from_slice(&data_frame(&mut w, 2, 3));
    s.stream_bytes(1, &b);
    let a = drain(&mut s);
    assert!(!has_abort(&a), "{a:?}");
    assert_eq!(a.iter().filter(|a| matches!(a, Action::Data { .. })).count(), 1);
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Send(TargetMsg::Failed { kind: BatchKind::Sync, code: FailCode::Checksum, .. })
    )));

    // An End whose epoch is not the batch's: malformed, still no Abort.
    let mut s = up_target();
    let mut b = BytesMut::new();
    BatchHeader { kind: BatchKind::Sync, id: Epoch(4), base: Epoch(3) }.encode(&mut b);
    let w = BatchWriter::new();
    Frame::End(w.end(Epoch(5))).encode(&mut b);
    s.stream_bytes(1, &b);
    let a = drain(&mut s);
    assert!(!has_abort(&a), "{a:?}");
    assert!(a
        .iter()
        .any(|a| matches!(a, Action::Send(TargetMsg::Failed { code: FailCode::Malformed, .. }))));

    // The store failing a sync batch: Failed with kind Sync, no Abort, the stream stops.
    let mut s = up_target();
    let mut b = BytesMut::new();
    BatchHeader { kind: BatchKind::Sync, id: Epoch(4), base: Epoch(3) }.encode(&mut b);
    s.stream_bytes(1, &b);
    drain(&mut s);
    s.store_failed(Epoch(4), BatchKind::Epoch, FailCode::NoSpace, "full".into());
    let a = drain(&mut s);
    assert!(!has_abort(&a), "{a:?}");
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Send(TargetMsg::Failed { kind: BatchKind::Sync, code: FailCode::NoSpace, .. })
    )));
    let mut w = BatchWriter::new();
    s.stream_bytes(1, &data_frame(&mut w, 0, 1));
    assert!(drain(&mut s).is_empty(), "the stream is stopped");
}

// ---- agent side ---------------------------------------------------------------------------

fn agent_actions(a: &mut AgentSession) -> Vec<agent::Action> {
    std::iter::from_fn(|| a.poll_action()).collect()
}

/// An agent session connected and in sync: welcome at `committed`, its first catch-up
/// committed.
fn in_sync_agent(now: Instant) -> AgentSession {
    let mut a = AgentSession::new(AgentConfig::new(hello()), now);
    a.handle_timeout(now);
    assert!(agent_actions(&mut a).contains(&agent::Action::Connect));
    a.connected(now);
    agent_actions(&mut a);
    welcome(&mut a, now, Epoch(3));
    let acts = agent_actions(&mut a);
    let id = acts
        .iter()
        .find_map(|x| match x {
            agent::Action::StartResync { id, .. } => Some(*id),
            _ => None,
        })
        .expect("a catch-up starts");
    a.resync_progress(now, id, 0);
    a.resync_read_done(now, id);
    a.epoch_empty(now);
    agent_actions(&mut a);
    a.handle_control(now, TargetMsg::Committed { through: id });
    agent_actions(&mut a);
    assert_eq!(a.state(), agent::State::InSync);
    a
}

fn welcome(a: &mut AgentSession, now: Instant, committed: Epoch) {
    a.handle_control(
        now,
        TargetMsg::Welcome(Welcome {
            version: VERSION,
            state: ReplicaState::Consistent,
            committed,
            generation: Generation::new(7),
            compression: Compression::Off,
            max_frame: DEFAULT_MAX_FRAME,
        }),
    );
}

#[test]
fn agent_sync_batch_frames_durable_end_commit() {
    let now = Instant::now();
    let mut a = in_sync_agent(now);
    let h = a.sync_open(now, 10).expect("in sync: a live batch opens");
    assert_eq!(h.kind, BatchKind::Sync);
    assert_eq!(h.base, Epoch(4), "after the catch-up (4)");
    assert_eq!(a.live_sync(), Some(h.id));
    assert_eq!(a.sync_open(now, 11), None, "one live batch at a time");
    assert_eq!(a.sync_frame(h.id), Some(0));
    assert_eq!(a.sync_frame(h.id), Some(1));
    assert_eq!(a.sync_frame(Epoch(99)), None);
    a.handle_control(now, TargetMsg::Durable { id: h.id, frames: 1 });
    assert_eq!(agent_actions(&mut a), vec![agent::Action::Durable { id: h.id, frames: 1 }]);
    // Repeated or older reports say nothing new.
    a.handle_control(now, TargetMsg::Durable { id: h.id, frames: 1 });
    assert!(agent_actions(&mut a).is_empty());
    assert_eq!(a.sync_end(now, h.id), Some(2));
    assert_eq!(a.sync_frame(h.id), None, "ended");
    assert_eq!(a.live_sync(), None);
    // The next epoch's live batch chains on it.
    let h2 = a.sync_open(now, 11).expect("next live batch");
    assert_eq!(h2.base, h.id);
    a.handle_control(now, TargetMsg::Durable { id: h.id, frames: 2 });
    assert_eq!(agent_actions(&mut a), vec![agent::Action::Durable { id: h.id, frames: 2 }]);
    a.handle_control(now, TargetMsg::Committed { through: h.id });
    assert_eq!(
        agent_actions(&mut a),
        vec![agent::Action::Committed {
            through: h.id,
            upto_seq: Some(10),
            clear: agent::Clear::Epochs
        }]
    );
    assert_eq!(a.state(), agent::State::InSync);
    // A target claiming more frames than were sent is broken: the session disconnects.
    assert_eq!(a.sync_frame(h2.id), Some(0));
    a.handle_control(now, TargetMsg::Durable { id: h2.id, frames: 5 });
    assert!(agent_actions(&mut a).iter().any(|x| matches!(x, agent::Action::Disconnect { .. })));
}

#[test]
fn agent_forgets_sync_batches_at_a_disconnect_and_catches_up() {
    let now = Instant::now();
    let mut a = in_sync_agent(now);
    let h = a.sync_open(now, 10).expect("live");
    a.sync_frame(h.id);
    a.sync_frame(h.id);
    a.disconnected(now, "link lost".into());
    let acts = agent_actions(&mut a);
    assert!(acts.contains(&agent::Action::DropEpoch { seq: 10 }), "{acts:?}");
    assert_eq!(a.sync_frame(h.id), None, "the stream died with the connection");
    assert_eq!(a.sync_end(now, h.id), None);
    assert_eq!(a.sync_open(now, 11), None, "not connected");
    // Reconnect: the target sealed the batch and committed it (the agent never saw that
    // commit): no bits are cleared for it, and a catch-up from the bitmap starts.
    let later = now + Duration::from_secs(10);
    a.handle_timeout(later);
    agent_actions(&mut a);
    a.connected(later);
    agent_actions(&mut a);
    welcome(&mut a, later, h.id);
    let acts = agent_actions(&mut a);
    assert!(
        !acts.iter().any(|x| matches!(x, agent::Action::Committed { .. })),
        "nothing released or cleared for the sealed batch: {acts:?}"
    );
    let resync = acts.iter().find_map(|x| match x {
        agent::Action::StartResync { id, base, kind, .. } => Some((*id, *base, *kind)),
        _ => None,
    });
    let (id, base, kind) = resync.expect("a catch-up from the bitmap");
    assert_eq!((base, kind), (h.id, BatchKind::Resync));
    assert!(id > h.id, "ids stay above the sealed batch");
    assert_eq!(a.sync_open(later, 12), None, "no live batch during the catch-up");
    // A Durable of the old connection's batch is ignored.
    a.handle_control(later, TargetMsg::Durable { id: h.id, frames: 2 });
    assert!(agent_actions(&mut a).is_empty());
}

#[test]
fn agent_sync_ready_and_a_quiet_live_batch_is_not_a_stall() {
    let now = Instant::now();
    let mut a = in_sync_agent(now);
    assert!(a.sync_ready(), "in sync, nothing in flight");
    // An epoch closed at the switch ships first; the next one goes live behind it.
    a.epoch_closed(now, 9);
    assert!(agent_actions(&mut a).iter().any(|x| matches!(x, agent::Action::SendEpoch { .. })));
    assert!(a.sync_ready(), "the closed epoch is sent");
    let h = a.sync_open(now, 10).expect("live");
    a.sync_frame(h.id);
    a.handle_control(now, TargetMsg::Durable { id: h.id, frames: 1 });
    agent_actions(&mut a);
    a.handle_control(now, TargetMsg::Committed { through: Epoch(h.id.0 - 1) });
    agent_actions(&mut a);
    // Minutes without a write: the open batch has nothing waiting, the session stays in sync.
    let later = now + Duration::from_secs(120);
    a.handle_timeout(later);
    agent_actions(&mut a);
    assert_eq!(a.state(), agent::State::InSync);
    // A frame the target does not report durable is a stall after `stall_after`.
    a.sync_frame(h.id);
    a.handle_timeout(later + Duration::from_secs(1));
    a.handle_timeout(later + Duration::from_secs(10));
    agent_actions(&mut a);
    assert_eq!(a.state(), agent::State::Behind);
    // Not ready while disconnected.
    a.disconnected(later, "gone".into());
    assert!(!a.sync_ready());
}
