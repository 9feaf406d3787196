//! A sequence's token sampler: `SamplingParams` plus the seeded RNG that
//! draws one uniform per token. The choice itself (temperature, top-k,
//! top-p, min-p, the draw) is the backend's `sample_rows`, whose CPU
//! reference is `backend::cpu::sample`; the uniforms stay here, on the
//! host, one RNG per sequence, so tokens depend only on the seed, the
//! parameters and the logits.

pub use crate::backend::SamplingParams;
pub use crate::backend::cpu::sample::argmax;
use crate::util::rng::Rng;

/// Draws tokens with `SamplingParams` from a seeded RNG: the same seed,
/// parameters and logits give the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Sampler {
        Sampler { params, rng: Rng::new(seed) }
    }

    /// The uniform in [0, 1) of this sequence's next token (53 bits), for
    /// `Backend::sample_rows`. Greedy decoding draws nothing (and returns
    /// 0, which the op ignores), so the RNG advances once per sampled token.
    pub fn next_uniform(&mut self) -> f64 {
        if self.params.is_greedy() {
            return 0.0;
        }
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token for one position's logits [vocab], chosen on the host
    /// by the CPU reference of `sample_rows`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let u = self.next_uniform();
        crate::backend::cpu::sample::choose(logits, &self.params, u)
    }
}

#[cfg(test)]
mod tests {
    //! The sampler draws from the filters' survivors in transformers' order;
    //! logits are ln of simple probabilities, so each expectation follows
    //! from the definition by hand.
    use super::*;
    use crate::backend::cpu::sample::test_logits::{kept, logits_of};
    use crate::backend::cpu::sample::{min_p_filter, top_p_filter};

    #[test]
    fn min_p_applies_after_top_p() {
        // Probabilities 0.5, 0.25, 0.15, 0.1 (tokens 2, 0, 3, 1); top_p 0.8,
        // min_p 0.25. In transformers' order top_p keeps {2, 0, 3} (0.75 <
        // 0.8 <= 0.9), then min_p's bound is 0.25 · 0.5 = 0.125 of the
        // unnormalised survivors (ratios to the top do not change with
        // renormalisation): 0.15 stays -> {0, 2, 3}. The other order would
        // drop token 1 first (0.1 < 0.125), renormalise to 5/9, 5/18, 3/18,
        // and top_p would stop at 5/9 + 5/18 = 0.83 >= 0.8 -> {0, 2}.
        let probs = [0.25, 0.1, 0.5, 0.15];
        let mut l = logits_of(&probs);
        top_p_filter(&mut l, 0.8);
        min_p_filter(&mut l, 0.25);
        assert_eq!(kept(&l), vec![0, 2, 3]);
        let mut other = logits_of(&probs);
        min_p_filter(&mut other, 0.25);
        top_p_filter(&mut other, 0.8);
        assert_eq!(kept(&other), vec![0, 2], "the order matters for this example");
        // The sampler uses transformers' order: token 3 (probability 1/6
        // among the survivors) is drawn in 300 tries, token 1 never.
        let params = SamplingParams { temperature: 1.0, top_k: None, top_p: Some(0.8), min_p: Some(0.25) };
        let mut s = Sampler::new(params, 7);
        let drawn: Vec<u32> = (0..300).map(|_| s.sample(&logits_of(&probs))).collect();
        assert!(drawn.contains(&3) && !drawn.contains(&1), "{drawn:?}");
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_filters() {
        let logits = logits_of(&[0.25, 0.1, 0.5, 0.15]);
        let params = SamplingParams { temperature: 1.0, top_k: Some(3), top_p: Some(0.7), min_p: None };
        let run = |seed| {
            let mut s = Sampler::new(params, seed);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        let a = run(11);
        assert_eq!(a, run(11), "same seed, same tokens");
        assert_ne!(a, run(12), "another seed, other tokens");
        // Only the survivors {0, 2} are ever drawn (kept probabilities 1/3, 2/3),
        // and both are drawn in 200 tries.
        assert!(a.iter().all(|&t| t == 0 || t == 2), "{a:?}");
        assert!(a.contains(&0) && a.contains(&2));
        // Greedy ignores the RNG.
        let mut g = Sampler::new(SamplingParams::greedy(), 5);
        assert_eq!(g.sample(&logits), 2);
    }

    #[test]
    fn out_of_range_parameters_are_refused() {
        let ok = SamplingParams { temperature: 0.7, top_k: Some(50), top_p: Some(0.9), min_p: Some(0.05) };
        ok.validate().unwrap();
        let bad = |p: SamplingParams, needle: &str| {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        };
        bad(SamplingParams { top_p: Some(1.5), ..ok }, "top_p must be in (0, 1]");
        bad(SamplingParams { top_p: Some(0.0), ..ok }, "top_p must be in (0, 1]");
        bad(SamplingParams { top_k: Some(0), ..ok }, "top_k must be at least 1");
        bad(SamplingParams { temperature: -1.0, ..ok }, "temperature must be");
        bad(SamplingParams { temperature: f32::NAN, ..ok }, "temperature must be");
        bad(SamplingParams { min_p: Some(1.5), ..ok }, "min_p must be in [0, 1], got 1.5");
        bad(SamplingParams { min_p: Some(-0.1), ..ok }, "min_p must be in [0, 1]");
        bad(SamplingParams { min_p: Some(f32::NAN), ..ok }, "min_p must be in [0, 1]");
        // The ends of the range are allowed.
        SamplingParams { min_p: Some(0.0), ..ok }.validate().unwrap();
        SamplingParams { min_p: Some(1.0), ..ok }.validate().unwrap();
    }
}
