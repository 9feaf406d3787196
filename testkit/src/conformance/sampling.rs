//! Conformance of `sample_rows`: the token each backend chooses for the
//! same logits, sampling settings and uniforms must be the same (exact:
//! the two differ only when a uniform lies within rounding of a cumulative
//! probability, which random inputs at a fixed seed do not hit).

use super::{Harness, compare};
use ferrotune::backend::{Backend, SamplingParams};

impl<R: Backend, C: Backend> Harness<'_, R, C> {
    /// `rows` rows of f32 logits [rows, vocab] in [-8, 8], each setting
    /// (greedy, temperature alone, every filter, all of them) with a fresh
    /// uniform per row; one exact check per setting.
    pub fn sample_rows(&mut self, rows: usize, vocab: usize) {
        let (rl, cl, _) = self.f32s(rows * vocab, 8.0);
        let base = SamplingParams { temperature: 0.8, top_k: None, top_p: None, min_p: None };
        let settings = [
            ("greedy", SamplingParams::greedy()),
            ("temperature", base),
            ("top_k", SamplingParams { top_k: Some(vocab / 3 + 1), ..base }),
            ("top_p", SamplingParams { top_p: Some(0.7), ..base }),
            ("min_p", SamplingParams { min_p: Some(0.05), ..base }),
            ("all filters", SamplingParams { temperature: 1.2, top_k: Some(vocab / 2 + 1), top_p: Some(0.9), min_p: Some(0.02) }),
        ];
        for (name, params) in settings {
            let uniforms: Vec<f64> = (0..rows).map(|_| (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64).collect();
            let r = self.reference.sample_rows(&rl, rows, vocab, &params, &uniforms);
            let c = self.candidate.sample_rows(&cl, rows, vocab, &params, &uniforms);
            let as_f32 = |t: Vec<u32>| t.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
            self.checks.push(compare(format!("sample_rows {name}"), &as_f32(c), &as_f32(r), 0.0));
        }
    }
}
