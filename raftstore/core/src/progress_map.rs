//! The leader's view of each member's progress, by replica id: a vector sorted by id.
//!
//! A group has a handful of members, and a node holds up to 100,000 groups: a `BTreeMap` allocated a whole node of
//! eleven slots (about 1.2 KiB) for its first member, where this holds exactly the members. It keeps the map's
//! order (by id), so everything that walks it — messages, votes, quorums — does so in the same order as before.

use crate::progress::Progress;

#[derive(Clone, Debug, Default)]
pub struct ProgressMap {
    /// Sorted by id, each id once.
    members: Vec<(u64, Progress)>,
}

impl ProgressMap {
    fn position(&self, id: u64) -> Result<usize, usize> {
        self.members.binary_search_by_key(&id, |(member, _)| *member)
    }

    pub fn get(&self, id: &u64) -> Option<&Progress> {
        self.position(*id).ok().map(|at| &self.members[at].1)
    }

    pub fn get_mut(&mut self, id: &u64) -> Option<&mut Progress> {
        self.position(*id).ok().map(|at| &mut self.members[at].1)
    }

    pub fn contains_key(&self, id: &u64) -> bool {
        self.position(*id).is_ok()
    }

    /// `id`'s progress, made by `make` if there is none (room for exactly one more when it is added).
    pub fn get_or_insert_with(&mut self, id: u64, make: impl FnOnce() -> Progress) -> &mut Progress {
        let at = match self.position(id) {
            Ok(at) => at,
            Err(at) => {
                self.members.reserve_exact(1);
                self.members.insert(at, (id, make()));
                at
            }
        };
        &mut self.members[at].1
    }

    /// Keeps the members for which `keep` says so.
    pub fn retain(&mut self, mut keep: impl FnMut(&u64, &mut Progress) -> bool) {
        self.members.retain_mut(|(id, progress)| keep(id, progress));
    }

    /// By id, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Progress)> {
        self.into_iter()
    }

    /// By id, ascending.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Progress)> {
        self.members.iter_mut().map(|(id, progress)| (&*id, progress))
    }

    /// By id, ascending.
    pub fn keys(&self) -> impl Iterator<Item = &u64> {
        self.members.iter().map(|(id, _)| id)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl std::ops::Index<&u64> for ProgressMap {
    type Output = Progress;

    fn index(&self, id: &u64) -> &Progress {
        self.get(id).unwrap_or_else(|| panic!("no progress for {id}"))
    }
}

impl<'a> IntoIterator for &'a ProgressMap {
    type Item = (&'a u64, &'a Progress);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (u64, Progress)>, fn(&'a (u64, Progress)) -> (&'a u64, &'a Progress)>;

    fn into_iter(self) -> Self::IntoIter {
        self.members.iter().map(|(id, progress)| (id, progress))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_stay_sorted_by_id_and_each_is_found() {
        let mut map = ProgressMap::default();
        for id in [5, 1, 9, 3] {
            map.get_or_insert_with(id, || Progress::new(id * 10, 4, 1 << 20));
        }
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), [1, 3, 5, 9]);
        assert_eq!(map.get_or_insert_with(3, || unreachable!("3 is there")).next_index, 30);
        assert_eq!(map[&9].next_index, 90);
        assert!(map.get(&4).is_none() && map.contains_key(&5));
        map.retain(|id, _| *id != 3);
        assert_eq!(map.iter().map(|(id, p)| (*id, p.next_index)).collect::<Vec<_>>(), [(1, 10), (5, 50), (9, 90)]);
        for (_, progress) in map.iter_mut() {
            progress.matched = 7;
        }
        assert!((&map).into_iter().all(|(_, p)| p.matched == 7) && map.len() == 3);
    }
}
