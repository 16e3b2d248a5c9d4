//! Panics turned into errors at the edges where a dependency (redb) or a thread of ours could panic: the node
//! then stops with the reason instead of losing a thread silently.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The text of a panic's payload.
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs `work`; a panic inside becomes `Err("{what} panicked: {message}")`. Whatever `work` touched may be left
/// half-changed, so the caller must treat the error as fatal for what it guards (the node stops).
pub fn catch<T>(what: &str, work: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(work)).map_err(|payload| format!("{what} panicked: {}", message(payload.as_ref())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(super::catch("work", || 7), Ok(7));
        assert_eq!(
            super::catch("work", || -> u8 { panic!("broken {}", 1) }),
            Err("work panicked: broken 1".to_string())
        );
        assert_eq!(super::catch("work", || -> u8 { panic!("static") }), Err("work panicked: static".to_string()));
    }
}
