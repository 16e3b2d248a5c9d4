//! [`Failure`]: why something stopped for good (the WAL's writer, a node), kept once, and who is told. Asking is
//! one load of a flag written once; the reason's lock is taken only after a failure.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// Called once with the reason when the failure happens.
pub type FailureListener = Box<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
pub struct Failure {
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
    listeners: Mutex<Vec<FailureListener>>,
}

impl Failure {
    /// The reason, once it failed.
    pub fn get(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.reason.lock().clone()
    }

    /// Records the reason if it is the first, and tells the listeners; returns whether it was the first.
    pub fn set(&self, reason: String) -> bool {
        {
            let mut stored = self.reason.lock();
            if stored.is_some() {
                return false;
            }
            *stored = Some(reason.clone());
            self.failed.store(true, Ordering::Release);
        }
        for listener in self.listeners.lock().iter() {
            listener(&reason);
        }
        true
    }

    /// Calls `listener` with the reason once it fails (at once if it has).
    pub fn listen(&self, listener: FailureListener) {
        let mut listeners = self.listeners.lock();
        match self.get() {
            Some(reason) => listener(&reason),
            None => listeners.push(listener),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_first_reason_sticks_and_every_listener_hears_it_once() {
        let failure = Failure::default();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let early = Arc::clone(&heard);
        failure.listen(Box::new(move |reason| early.lock().push(format!("early {reason}"))));
        assert_eq!(failure.get(), None);
        assert!(failure.set("disk".into()));
        assert!(!failure.set("later".into()));
        let late = Arc::clone(&heard);
        failure.listen(Box::new(move |reason| late.lock().push(format!("late {reason}"))));
        assert_eq!(failure.get(), Some("disk".to_string()));
        assert_eq!(*heard.lock(), vec!["early disk".to_string(), "late disk".to_string()]);
    }
}
