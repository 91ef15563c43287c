//! The event stream: VM, snapshot and operation events, numbered, broadcast to watchers and kept
//! for a while for watchers that ask for older ones.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use snap_api::v1 as pb;
use tokio::sync::broadcast;

/// Events kept for replay to watchers that ask for older ones.
const RECENT_EVENTS: usize = 4096;

/// The daemon's events.
pub struct Events {
    sender: broadcast::Sender<pb::Event>,
    recent: Mutex<VecDeque<pb::Event>>,
    seq: AtomicU64,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(1024).0,
            recent: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
        }
    }
}

impl Events {
    /// Sends an event to every watcher.
    pub fn emit(&self, kind: pb::event::Kind) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        // An operation's events name its caller; other events, the caller of the call or
        // operation this thread works for (none for what the daemon does by itself).
        let caller = match &kind {
            pb::event::Kind::Operation(op) => op.caller.clone(),
            _ => crate::auth::acting(),
        };
        let event = pb::Event {
            sequence: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            unix_ms: crate::now_ms(),
            kind: Some(kind),
            caller,
        };
        if recent.len() >= RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(event.clone());
        // Nobody listening is fine.
        let _ = self.sender.send(event);
    }

    /// A receiver of new events, and the held events after `after` (oldest first; none for 0).
    pub fn subscribe(&self, after: u64) -> (broadcast::Receiver<pb::Event>, Vec<pb::Event>) {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.sender.subscribe();
        let old = if after == 0 {
            Vec::new()
        } else {
            recent
                .iter()
                .filter(|e| e.sequence > after)
                .cloned()
                .collect()
        };
        (rx, old)
    }
}
