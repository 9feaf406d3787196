//! The order in which training examples are seen: per epoch, an order of
//! the examples (file order, or a seeded shuffle), grouped into rows (one
//! example per row, or several packed up to sequence_len tokens), grouped
//! into micro-batches of micro_batch_size rows; gradient_accumulation_steps
//! micro-batches make an optimiser step, the last step of an epoch taking
//! what is left (as transformers' Trainer does).
//!
//! Everything is a pure function of the lengths, the settings and the seed,
//! so a resumed run recomputes exactly the batches the interrupted one saw.

use crate::util::rng::Rng;

#[derive(Debug, Clone)]
pub struct DataPlan {
    /// Tokens of each training example.
    pub lengths: Vec<usize>,
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Pack several examples per row (each keeps its own attention segment
    /// and positions: the model's batches are varlen).
    pub sample_packing: bool,
    pub sequence_len: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Each micro-batch is trained on this many consecutive times (GRPO's
    /// num_iterations: one generation, several optimiser steps).
    pub repeat: usize,
    /// Leave out an epoch's last micro-batch when it is short (GRPO's
    /// generation batches are whole, as TRL's sampler makes them).
    pub drop_last: bool,
}

/// One micro-batch: the indices of its examples, in order.
pub type MicroBatch = Vec<usize>;

impl DataPlan {
    /// The example order of epoch `epoch`.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        if self.shuffle {
            // Fisher-Yates with a per-epoch seed.
            let mut rng = Rng::new(self.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..order.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    /// Rows of epoch `epoch`: with packing, consecutive examples fill a row
    /// until the next one would pass sequence_len.
    fn rows(&self, epoch: usize) -> Vec<Vec<usize>> {
        let order = self.order(epoch);
        if !self.sample_packing {
            return order.into_iter().map(|i| vec![i]).collect();
        }
        let mut rows: Vec<Vec<usize>> = Vec::new();
        let mut used = usize::MAX;
        for i in order {
            let len = self.lengths[i];
            if used.saturating_add(len) > self.sequence_len {
                rows.push(Vec::new());
                used = 0;
            }
            rows.last_mut().expect("a row was just opened").push(i);
            used += len;
        }
        rows
    }

    /// Rows of epoch `epoch` and the fraction of their capacity
    /// (rows × sequence_len) the examples fill: the packing efficiency.
    pub fn fill(&self, epoch: usize) -> (usize, f64) {
        let rows = self.rows(epoch);
        let tokens: usize = self.lengths.iter().sum();
        let capacity = rows.len() * self.sequence_len;
        (rows.len(), if capacity == 0 { 0.0 } else { tokens as f64 / capacity as f64 })
    }

    /// The micro-batches of epoch `epoch`.
    pub fn micro_batches(&self, epoch: usize) -> Vec<MicroBatch> {
        let rows = self.rows(epoch);
        let size = self.micro_batch_size.max(1);
        let whole = |c: &&[Vec<usize>]| !self.drop_last || c.len() == size;
        let once = rows.chunks(size).filter(whole).map(|rows| rows.concat());
        once.flat_map(|mb| std::iter::repeat_n(mb, self.repeat.max(1))).collect()
    }

    /// Optimiser steps in epoch `epoch` (the last one may be short).
    pub fn steps_in_epoch(&self, epoch: usize) -> usize {
        self.micro_batches(epoch).len().div_ceil(self.gradient_accumulation_steps.max(1))
    }

    /// The step's micro-batches: step `step_in_epoch` of `micro_batches`.
    pub fn step_slice<'a>(&self, micro_batches: &'a [MicroBatch], step_in_epoch: usize) -> &'a [MicroBatch] {
        let ga = self.gradient_accumulation_steps.max(1);
        let start = (step_in_epoch * ga).min(micro_batches.len());
        &micro_batches[start..(start + ga).min(micro_batches.len())]
    }

    /// Total optimiser steps: max_steps when given (epochs repeat as
    /// needed), else num_epochs (a fractional last epoch rounds up).
    pub fn total_steps(&self, num_epochs: f64, max_steps: Option<usize>) -> usize {
        if let Some(m) = max_steps {
            return m;
        }
        let full = num_epochs.floor() as usize;
        let mut total: usize = (0..full).map(|e| self.steps_in_epoch(e)).sum();
        let frac = num_epochs - full as f64;
        if frac > 0.0 {
            total += (frac * self.steps_in_epoch(full) as f64).ceil() as usize;
        }
        total.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(lengths: Vec<usize>, packing: bool, shuffle: bool) -> DataPlan {
        DataPlan { lengths, micro_batch_size: 2, gradient_accumulation_steps: 2, sample_packing: packing, sequence_len: 10, shuffle, seed: 7, repeat: 1, drop_last: false }
    }

    #[test]
    fn file_order_without_shuffle_and_short_last_step() {
        let p = plan(vec![3; 5], false, false);
        let mbs = p.micro_batches(0);
        assert_eq!(mbs, vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(p.steps_in_epoch(0), 2);
        assert_eq!(p.step_slice(&mbs, 1), &[vec![4]]);
        assert_eq!(p.total_steps(2.0, None), 4);
        assert_eq!(p.total_steps(1.5, None), 3);
        assert_eq!(p.total_steps(1.0, Some(9)), 9);
    }

    #[test]
    fn repeat_trains_each_micro_batch_several_times() {
        let p = DataPlan { repeat: 2, gradient_accumulation_steps: 1, ..plan(vec![3; 3], false, false) };
        assert_eq!(p.micro_batches(0), vec![vec![0, 1], vec![0, 1], vec![2], vec![2]]);
        assert_eq!(p.steps_in_epoch(0), 4);
        let p = DataPlan { drop_last: true, ..p };
        assert_eq!(p.micro_batches(0), vec![vec![0, 1], vec![0, 1]]);
    }

    #[test]
    fn packing_fills_rows_up_to_sequence_len() {
        let p = plan(vec![4, 4, 3, 9, 10, 1], true, false);
        // File order is kept: [0,1] holds 8 tokens; 2 starts a row (8+3 > 10);
        // 3 does not fit after 2 (3+9); 4 and 5 neither (9+10, 10+1).
        assert_eq!(p.rows(0), vec![vec![0, 1], vec![2], vec![3], vec![4], vec![5]]);
        assert_eq!(p.micro_batches(0), vec![vec![0, 1, 2], vec![3, 4], vec![5]]);
        // 31 tokens in 5 rows of 10.
        assert_eq!(p.fill(0), (5, 0.62));
    }

    #[test]
    fn shuffle_is_seeded_per_epoch_and_a_permutation() {
        let p = plan((0..50).map(|i| i % 7 + 1).collect(), false, true);
        let (a, b) = (p.order(0), p.order(1));
        assert_ne!(a, b);
        assert_eq!(a, p.order(0));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }
}
