//! The users' keys as stored ([`KeySpace`]): where a key space has a meta range (databases and clusters of
//! format 2), the system's keys are the stored keys from `ff ff` on, and a user's key that starts with `ff` is
//! stored escaped below them (`flotilla_raftstore::meta::stored_key`, order kept). Requests translate their keys on
//! the way in and scans' keys on the way out, in the embedded `Db` and in a server alike; range bounds and split
//! keys are stored keys. A key space of format 1 has no meta range and stores every key as it is.

use std::borrow::Cow;

use flotilla_engine::state_machine::KeyValue;
use flotilla_raftstore::meta;
use flotilla_raftstore::range::RangeDescriptor;

/// Where the users' keys end in a key space, and how they are stored.
#[derive(Clone, Debug)]
pub struct KeySpace {
    /// The first of the system's stored keys; empty where there is no meta range (format 1).
    keys_end: Vec<u8>,
}

impl KeySpace {
    /// The key space of `ranges` (a layout, or the ranges a node holds or was told): with a meta range if one
    /// of them is it.
    pub fn of(ranges: &[RangeDescriptor]) -> KeySpace {
        KeySpace::new(ranges.iter().any(RangeDescriptor::is_meta))
    }

    pub fn new(has_meta_range: bool) -> KeySpace {
        let keys_end = if has_meta_range { meta::SYSTEM_KEYS_START.to_vec() } else { Vec::new() };
        KeySpace { keys_end }
    }

    /// Whether the key space has a meta range.
    pub fn has_meta_range(&self) -> bool {
        !self.keys_end.is_empty()
    }

    /// Where a user's key is stored.
    pub fn stored<'a>(&self, key: &'a [u8]) -> Cow<'a, [u8]> {
        match self.has_meta_range() {
            true => meta::stored_key(key),
            false => Cow::Borrowed(key),
        }
    }

    /// A scan's bounds as stored: `end` empty means the end of the users' keys.
    pub fn stored_bounds<'a>(&self, start: &'a [u8], end: &'a [u8]) -> (Cow<'a, [u8]>, Cow<'a, [u8]>) {
        match end.is_empty() {
            true => (self.stored(start), Cow::Owned(self.keys_end.clone())),
            false => (self.stored(start), self.stored(end)),
        }
    }

    /// The user's key stored as `stored`; the end of the users' keys as empty (unbounded).
    pub fn user(&self, stored: &[u8]) -> Vec<u8> {
        match (self.has_meta_range(), stored == self.keys_end.as_slice()) {
            (false, _) => stored.to_vec(),
            (true, true) => Vec::new(),
            (true, false) => meta::user_key(stored).into_owned(),
        }
    }

    /// A scan's pairs with the users' keys.
    pub fn users_pairs(&self, mut pairs: Vec<KeyValue>) -> Vec<KeyValue> {
        if self.has_meta_range() {
            for (key, _) in &mut pairs {
                if let Cow::Owned(user) = meta::user_key(key) {
                    *key = user;
                }
            }
        }
        pairs
    }
}
