//! A batch in the varlen layout the backend expects: the token sequences of
//! a batch laid end to end, with per-token positions and next-token targets,
//! and sequence boundaries (`cu_seqlens`). Padding never enters the model.

use anyhow::{Result, bail};

/// The ignore index of transformers' causal-LM loss.
pub const IGNORE_INDEX: i32 = -100;

/// One training/eval example: token ids and per-token labels (-100 = not a
/// target). Labels are aligned with input_ids as in transformers; the shift
/// by one happens when the batch is built.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Sequence {
    /// Labels default to the input ids (every next token is a target).
    pub fn unmasked(input_ids: Vec<u32>) -> Sequence {
        let labels = input_ids.iter().map(|&t| t as i32).collect();
        Sequence { input_ids, labels }
    }

    /// Tokens the loss is computed on: those whose label is not -100,
    /// except the first (no earlier token predicts it; see `Batch::from_sequences`).
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Token ids, all sequences concatenated [n].
    pub ids: Vec<i32>,
    /// Rotary position of each token (restarts at 0 per sequence) [n].
    pub positions: Vec<i32>,
    /// The label of the next token in the same sequence, or -100 [n].
    pub targets: Vec<i32>,
    /// Sequence starts, plus n at the end [n_seqs + 1].
    pub cu_seqlens: Vec<i32>,
}

impl Batch {
    /// Build from whole sequences; each is its own attention segment.
    /// Every id must be below `vocab`.
    pub fn from_sequences<'a>(seqs: impl IntoIterator<Item = &'a Sequence>, vocab: usize) -> Result<Batch> {
        let mut b = Batch { ids: vec![], positions: vec![], targets: vec![], cu_seqlens: vec![0] };
        for (si, s) in seqs.into_iter().enumerate() {
            if s.input_ids.len() != s.labels.len() {
                bail!("example {si}: {} input_ids but {} labels", s.input_ids.len(), s.labels.len());
            }
            if s.input_ids.is_empty() {
                bail!("example {si} has no tokens");
            }
            if let Some((t, id)) = s.input_ids.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
                bail!("example {si}: token id {id} at position {t} is outside the vocabulary (size {vocab})");
            }
            for (t, &id) in s.input_ids.iter().enumerate() {
                b.ids.push(id as i32);
                b.positions.push(t as i32);
                let target = s.labels.get(t + 1).copied().unwrap_or(IGNORE_INDEX);
                if target != IGNORE_INDEX && (target < 0 || target as usize >= vocab) {
                    bail!("example {si}: label {target} at position {} is neither -100 nor a token id below {vocab}", t + 1);
                }
                b.targets.push(target);
            }
            b.cu_seqlens.push(b.ids.len() as i32);
        }
        Ok(b)
    }

    pub fn n_tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn n_seqs(&self) -> usize {
        self.cu_seqlens.len() - 1
    }

    /// Length of the longest sequence.
    pub fn max_seqlen(&self) -> usize {
        self.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }

    /// Number of tokens that are scored (the loss denominator's share).
    pub fn n_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_shift_within_each_sequence() {
        let seqs = vec![
            Sequence { input_ids: vec![5, 6, 7], labels: vec![-100, 6, 7] },
            Sequence::unmasked(vec![1, 2]),
        ];
        let b = Batch::from_sequences(&seqs, 10).unwrap();
        assert_eq!(b.ids, vec![5, 6, 7, 1, 2]);
        assert_eq!(b.positions, vec![0, 1, 2, 0, 1]);
        assert_eq!(b.targets, vec![6, 7, -100, 2, -100]);
        assert_eq!(b.cu_seqlens, vec![0, 3, 5]);
        assert_eq!(b.n_targets(), 3);
    }

    #[test]
    fn out_of_vocabulary_ids_are_errors() {
        let err = Batch::from_sequences(&[Sequence::unmasked(vec![1, 12])], 10).unwrap_err();
        assert!(err.to_string().contains("token id 12 at position 1"), "{err}");
    }
}
