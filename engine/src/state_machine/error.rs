//! The state machine's errors, and the guard that turns a panic inside redb into one. A leaf: the run format
//! (`lsm/`) and the state machine both use it.

#[derive(Debug)]
pub enum StateMachineError {
    /// redb failed (a broken environment: the node must stop).
    Storage(String),
    /// An apply that goes backwards: a bug above the state machine.
    Invalid(String),
}

impl std::fmt::Display for StateMachineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateMachineError::Storage(what) => write!(f, "state machine storage error: {what}"),
            StateMachineError::Invalid(what) => write!(f, "invalid state machine operation: {what}"),
        }
    }
}

impl std::error::Error for StateMachineError {}

/// Runs work that reads or writes the redb file: a panic inside it (damage redb did not detect, which it may
/// trust and trip over) becomes a storage error, so the node stops with the reason instead of losing a thread.
pub(crate) fn guard<T>(
    what: &str,
    work: impl FnOnce() -> Result<T, StateMachineError>,
) -> Result<T, StateMachineError> {
    crate::panics::catch(what, work).map_err(|reason| storage(format!("{reason} (the state file is damaged)")))?
}

pub(crate) fn storage(error: impl std::fmt::Display) -> StateMachineError {
    StateMachineError::Storage(error.to_string())
}
