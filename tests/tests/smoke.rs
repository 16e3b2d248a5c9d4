use flotilla_raft::prelude::*;
use flotilla_tests::cluster::Cluster;

#[test]
fn three_nodes_elect_and_replicate() {
    let mut c = Cluster::new(&[1, 2, 3], &[], |_| {});
    c.elect(1);
    println!("{:#?}", c.take_trace());
    c.propose(1, "a").unwrap();
    c.stabilize();
    println!("{:#?}", c.take_trace());
    for id in [1, 2, 3] {
        assert_eq!(c.raft(id).raft_log.committed, 2, "node {id}");
        assert_eq!(c.applied_index(id), 2);
    }
}

#[test]
fn single_node_elects_itself_and_commits() {
    let mut c = Cluster::new(&[1], &[], |_| {});
    c.tick(1, 30);
    assert_eq!(c.raft(1).role, StateRole::Leader);
    c.propose(1, "x").unwrap();
    assert_eq!(c.raft(1).raft_log.committed, 2);
}
