//! A simulated network between replicas: messages in flight are delivered in random order (reordering), may be
//! dropped or duplicated, and partitions (also one-way) block chosen directions. Driven by the simulator's seeded
//! generator, so every run of a seed is identical.

use std::collections::BTreeSet;

use flotilla_raft::Message;

use crate::sim_rng::SimRng;

#[derive(Clone, Debug, Default)]
pub struct FaultRates {
    /// Probability (per mille) that a delivered message is lost.
    pub drop_per_mille: u32,
    /// Probability (per mille) that a delivered message is also kept for a second delivery.
    pub duplicate_per_mille: u32,
}

/// What happened to the message picked for delivery.
pub enum Delivery {
    Delivered(Message),
    /// Lost to a partition or to random loss; the sender's transport would notice for snapshots.
    Lost(Message),
    Empty,
}

#[derive(Default)]
pub struct SimNetwork {
    in_flight: Vec<Message>,
    /// Directions (from, to) that are cut.
    blocked: BTreeSet<(u64, u64)>,
    pub faults: FaultRates,
    pub delivered: u64,
    pub dropped: u64,
}

impl SimNetwork {
    pub fn new(faults: FaultRates) -> SimNetwork {
        SimNetwork { faults, ..Default::default() }
    }

    /// Queues messages; cuts and loss apply at delivery time, where the loss is reported (`Delivery::Lost`).
    pub fn send(&mut self, messages: Vec<Message>) {
        self.in_flight.extend(messages);
    }

    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    /// Picks a message to deliver (`oldest` for FIFO, else any), applying loss and duplication.
    pub fn take_one(&mut self, rng: &mut SimRng, oldest: bool) -> Delivery {
        if self.in_flight.is_empty() {
            return Delivery::Empty;
        }
        let position = if oldest { 0 } else { rng.below(self.in_flight.len() as u64) as usize };
        let message = if oldest { self.in_flight.remove(position) } else { self.in_flight.swap_remove(position) };
        if self.blocked.contains(&(message.from, message.to)) || rng.chance_per_mille(self.faults.drop_per_mille) {
            self.dropped += 1;
            return Delivery::Lost(message);
        }
        if rng.chance_per_mille(self.faults.duplicate_per_mille) {
            self.in_flight.push(message.clone());
        }
        self.delivered += 1;
        Delivery::Delivered(message)
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

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    pub fn is_partitioned(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// Drops every message to `id` (it crashed: its socket buffers are gone) and returns them, so that the
    /// senders' transports can report failed snapshots.
    pub fn drop_to(&mut self, id: u64) -> Vec<Message> {
        let (lost, kept) = std::mem::take(&mut self.in_flight).into_iter().partition(|m| m.to == id);
        self.in_flight = kept;
        let lost: Vec<Message> = lost;
        self.dropped += lost.len() as u64;
        lost
    }
}
