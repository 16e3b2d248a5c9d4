//! The simulated network of both simulators (`raft-sim` between replicas, `store-sim` between nodes): packets in
//! flight, delivered in random order (reordering), maybe lost or duplicated, and cut directions (partitions, also
//! one-way) that lose what would cross them. Driven by the simulator's seeded generator, so every run of a seed
//! is identical. Two ways to deliver: one packet at a time, picked at random or oldest first ([`take_one`], the
//! Raft simulator's steps), or every packet due by a step, each sent with a delay ([`take_due`], the store
//! simulator's).
//!
//! [`take_one`]: SimNetwork::take_one
//! [`take_due`]: SimNetwork::take_due

use std::collections::BTreeSet;

use flotilla_raft::Message;

use crate::sim_rng::SimRng;

/// What the network needs of a packet: its two ends (replicas, or nodes).
pub trait Routed: Clone {
    fn ends(&self) -> (u64, u64);
}

impl Routed for Message {
    fn ends(&self) -> (u64, u64) {
        (self.from, self.to)
    }
}

#[derive(Clone, Debug, Default)]
pub struct FaultRates {
    /// Probability (per mille) that a delivered message is lost.
    pub drop_per_mille: u32,
    /// Probability (per mille) that a delivered message is also kept for a second delivery.
    pub duplicate_per_mille: u32,
}

/// What happened to the message picked for delivery.
pub enum Delivery<P> {
    Delivered(P),
    /// Lost to a partition or to random loss; the sender's transport would notice for snapshots.
    Lost(P),
    Empty,
}

pub struct SimNetwork<P> {
    /// Packets in flight, with the step they are due (0: any time).
    in_flight: Vec<(u64, P)>,
    /// Directions (from, to) that are cut.
    blocked: BTreeSet<(u64, u64)>,
    pub faults: FaultRates,
    pub delivered: u64,
    pub dropped: u64,
}

impl<P: Routed> SimNetwork<P> {
    pub fn new(faults: FaultRates) -> SimNetwork<P> {
        SimNetwork { in_flight: Vec::new(), blocked: BTreeSet::new(), faults, delivered: 0, dropped: 0 }
    }

    /// Queues packets, deliverable at once; cuts and loss apply at delivery time, where the loss is reported
    /// (`Delivery::Lost`).
    pub fn send(&mut self, packets: Vec<P>) {
        self.in_flight.extend(packets.into_iter().map(|packet| (0, packet)));
    }

    /// Queues a packet, deliverable from step `due` on (see [`SimNetwork::take_due`]).
    pub fn send_at(&mut self, packet: P, due: u64) {
        self.in_flight.push((due, packet));
    }

    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    /// Picks a packet to deliver (`oldest` for FIFO, else any), applying cuts, loss and duplication.
    pub fn take_one(&mut self, rng: &mut SimRng, oldest: bool) -> Delivery<P> {
        if self.in_flight.is_empty() {
            return Delivery::Empty;
        }
        let position = if oldest { 0 } else { rng.below(self.in_flight.len() as u64) as usize };
        let (_, packet) = if oldest { self.in_flight.remove(position) } else { self.in_flight.swap_remove(position) };
        if self.blocked.contains(&packet.ends()) || rng.chance_per_mille(self.faults.drop_per_mille) {
            self.dropped += 1;
            return Delivery::Lost(packet);
        }
        if rng.chance_per_mille(self.faults.duplicate_per_mille) {
            self.in_flight.push((0, packet.clone()));
        }
        self.delivered += 1;
        Delivery::Delivered(packet)
    }

    /// Every packet due by step `now`, in random order, less those a cut loses (counted as dropped). Random loss
    /// and duplication are the sender's to apply with the delays it draws ([`SimNetwork::send_at`]).
    pub fn take_due(&mut self, now: u64, rng: &mut SimRng) -> Vec<P> {
        let mut due = Vec::new();
        let mut at = 0;
        while at < self.in_flight.len() {
            if self.in_flight[at].0 <= now {
                due.push(self.in_flight.swap_remove(at).1);
            } else {
                at += 1;
            }
        }
        let mut delivered = Vec::with_capacity(due.len());
        while !due.is_empty() {
            let packet = due.swap_remove(rng.below(due.len() as u64) as usize);
            if self.blocked.contains(&packet.ends()) {
                self.dropped += 1;
            } else {
                self.delivered += 1;
                delivered.push(packet);
            }
        }
        delivered
    }

    /// Cuts both directions between the two sides.
    pub fn partition(&mut self, side_a: &[u64], side_b: &[u64]) {
        for &a in side_a {
            for &b in side_b {
                self.blocked.insert((a, b));
                self.blocked.insert((b, a));
            }
        }
    }

    /// Cuts only `from → to`.
    pub fn cut_one_way(&mut self, from: u64, to: u64) {
        self.blocked.insert((from, to));
    }

    /// Cuts `from → to` if it is open, else opens it.
    pub fn toggle_one_way(&mut self, from: u64, to: u64) {
        if !self.blocked.remove(&(from, to)) {
            self.blocked.insert((from, to));
        }
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    pub fn is_partitioned(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// Drops every packet to `id` (it crashed: its socket buffers are gone) and returns them, so that the
    /// senders' transports can report failed snapshots.
    pub fn drop_to(&mut self, id: u64) -> Vec<P> {
        let (lost, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.in_flight).into_iter().partition(|(_, packet)| packet.ends().1 == id);
        self.in_flight = kept;
        self.dropped += lost.len() as u64;
        lost.into_iter().map(|(_, packet)| packet).collect()
    }
}
