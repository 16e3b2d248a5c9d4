//! What a host that asked for a merge (`Db::merge_left`, a server's `merge_left`) reads from its routing table
//! while the groups carry the merge on (`raftstore::peer::merge`): whether it committed, was given up, or is
//! still under way.

use flotilla_raftstore::range::RangeDescriptor;

/// Why an asked merge did not happen, for the caller.
pub(crate) const GIVEN_UP: &str = "the merge was given up (a replica did not confirm in time): try again";

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum MergeProgress {
    Committed,
    GivenUp,
    Waiting,
}

/// Where the merge of `frozen` (the right range as its freeze left it) stands, judged by `holding`: the range
/// that holds `frozen`'s first key in the host's table now. Another group holds it: taken in. The right group
/// holds it at a later version, not frozen: given up (an unfreeze). Else (not yet learned past the freeze):
/// under way.
pub(crate) fn merge_progress(holding: &RangeDescriptor, frozen: &RangeDescriptor) -> MergeProgress {
    if holding.group_id != frozen.group_id {
        MergeProgress::Committed
    } else if holding.merge.is_none() && holding.epoch().version > frozen.epoch().version {
        MergeProgress::GivenUp
    } else {
        MergeProgress::Waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_raftstore::range::{MergeState, RangeEpoch};

    #[test]
    fn a_merge_is_judged_committed_given_up_or_under_way_by_the_range_holding_its_keys() {
        let at = |group_id, version, frozen: bool| RangeDescriptor {
            group_id,
            epoch: Some(RangeEpoch { version, conf_version: 1 }),
            merge: frozen.then(MergeState::default),
            ..RangeDescriptor::default()
        };
        let frozen = at(5, 3, true);
        assert_eq!(merge_progress(&at(4, 4, false), &frozen), MergeProgress::Committed);
        assert_eq!(merge_progress(&at(5, 4, false), &frozen), MergeProgress::GivenUp);
        assert_eq!(merge_progress(&at(5, 2, false), &frozen), MergeProgress::Waiting, "not frozen here yet");
        assert_eq!(merge_progress(&frozen, &frozen), MergeProgress::Waiting);
    }
}
