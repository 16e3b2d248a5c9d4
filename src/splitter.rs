//! The host's side of the split triggers ([`Splitter`]): a thread that takes what the groups' leaders ask
//! (`raftstore::split_trigger`: a range over its size bound, or under load) and has each split proposed — by the
//! embedded `Db` (ids from its `SPLIT-IDS`, the split sent to the asking leader's replica) or by a server (its
//! `split_at`, as `flotilla split` does). Asks are advisory: one that fails (the range changed, the leader moved)
//! is dropped, and the trigger asks again at its next check.

use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use flotilla_raftstore::split_trigger::RangeAsk;

/// How many asks may wait; beyond, the stores drop theirs (and ask again later).
pub(crate) const ASKS_MAX: usize = 64;

/// The channel the stores ask on (`StoreOptions::range_asks`) and the splitter reads.
pub(crate) fn asks() -> (Sender<RangeAsk>, Receiver<RangeAsk>) {
    crossbeam_channel::bounded(ASKS_MAX)
}

/// The splitter thread, stopped and joined on drop (or [`Splitter::stop`]).
pub(crate) struct Splitter {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Splitter {
    /// Runs `propose` for each ask, one at a time, until stopped.
    pub(crate) fn start(asks: Receiver<RangeAsk>, propose: impl Fn(RangeAsk) + Send + 'static) -> Splitter {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("flotilla-splitter".into())
            .spawn(move || loop {
                crossbeam_channel::select! {
                    recv(asks) -> wanted => match wanted {
                        Ok(wanted) => propose(wanted),
                        Err(_) => return,
                    },
                    recv(stopped) -> _ => return,
                }
            })
            .expect("spawning the splitter thread");
        Splitter { stop: Some(stop), thread: Some(thread) }
    }

    /// Stops the thread (after the split it may be proposing) and waits for it.
    pub(crate) fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Splitter {
    fn drop(&mut self) {
        self.stop();
    }
}
