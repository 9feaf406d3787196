//! The reference of `Backend::sample_rows`: choosing the next token from
//! one row of logits. Temperature, top-k, top-p (nucleus) and min-p filters
//! apply in transformers' order (temperature, then top-k, then top-p, then
//! min-p, as its logits warpers), then one draw from the softmax of what is
//! left, given a uniform in [0, 1) the caller drew from its seeded RNG.
//! Temperature 0 is greedy decoding (the argmax; the lowest index wins a
//! tie, as `torch.argmax`). A filtered-out token gets logit −∞
//! (probability 0). Softmax masses are f64.

use crate::backend::SamplingParams;
use rayon::prelude::*;

/// The token of each of `rows` rows of `logits` [rows, vocab]: row r with
/// the uniform `uniforms[r]` (see `Backend::sample_rows`). Rows run in
/// parallel; each is independent of the others.
pub fn sample_rows(logits: &[f32], rows: usize, vocab: usize, params: &SamplingParams, uniforms: &[f64]) -> Vec<u32> {
    assert!(vocab > 0, "sample_rows: vocab is 0");
    super::check_len("sample_rows", "logits", logits.len(), rows * vocab);
    super::check_len("sample_rows", "uniforms", uniforms.len(), rows);
    logits[..rows * vocab].par_chunks(vocab).zip(uniforms).map(|(row, &u)| choose(row, params, u)).collect()
}

/// The token for one row of logits [vocab] and the uniform `u` ∈ [0, 1)
/// (unused when greedy).
pub fn choose(logits: &[f32], p: &SamplingParams, u: f64) -> u32 {
    if p.is_greedy() {
        return argmax(logits) as u32;
    }
    let mut l = logits.to_vec();
    apply_temperature(&mut l, p.temperature);
    if let Some(k) = p.top_k {
        top_k_filter(&mut l, k);
    }
    if let Some(top_p) = p.top_p {
        top_p_filter(&mut l, top_p);
    }
    if let Some(min_p) = p.min_p {
        min_p_filter(&mut l, min_p);
    }
    draw(&softmax(&l), u) as u32
}

/// Index of the largest logit (the first of equal maxima; NaN never wins).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best
}

/// logits /= temperature (transformers' TemperatureLogitsWarper).
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    for x in logits.iter_mut() {
        *x /= temperature;
    }
}

/// transformers' TopKLogitsWarper: every logit below the k-th largest
/// becomes −∞ (so ties with the k-th largest are all kept). k ≥ vocab keeps
/// everything.
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    let k = k.max(1);
    if k >= logits.len() {
        return;
    }
    // The k-th largest by selection, not a sort: linear in the vocabulary.
    let mut values: Vec<f32> = logits.to_vec();
    let (_, &mut kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    for x in logits.iter_mut() {
        if *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f64 (−∞ logits get probability 0).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let mut p: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    p
}

/// transformers' TopPLogitsWarper (min_tokens_to_keep 1): sort ascending,
/// take the cumulative softmax, and drop every token whose cumulative
/// probability (itself and all less likely tokens) is ≤ 1 − p; the most
/// likely token is always kept. What remains is the smallest set of most
/// likely tokens whose probability reaches p.
pub fn top_p_filter(logits: &mut [f32], p: f32) {
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Ascending by logit; equal logits by index, so the result is reproducible.
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(a.cmp(&b)));
    let threshold = 1.0 - p as f64;
    let mut cum = 0.0f64;
    for &i in &order[..order.len().saturating_sub(1)] {
        cum += probs[i];
        if cum > threshold {
            break;
        }
        logits[i] = f32::NEG_INFINITY;
    }
}

/// transformers' MinPLogitsWarper (min_tokens_to_keep 1): with p the
/// softmax of the logits, every token whose p is below min_p · max p becomes
/// −∞. The most likely token is never below that bound (min_p ≤ 1), so at
/// least one token is always kept.
pub fn min_p_filter(logits: &mut [f32], min_p: f32) {
    let probs = softmax(logits);
    let bound = min_p as f64 * probs.iter().fold(0.0f64, |a, &b| a.max(b));
    for (x, p) in logits.iter_mut().zip(probs) {
        if p < bound {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// The token where the cumulative probability first exceeds `u` ∈ [0, 1);
/// rounding that leaves the total just below `u` falls back to the last
/// token with non-zero probability.
pub fn draw(probs: &[f64], u: f64) -> usize {
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last = i;
            if u < cum {
                return i;
            }
        }
    }
    last
}

/// Hand-made logits for the filter tests (here and in model/sample.rs).
#[cfg(test)]
pub(crate) mod test_logits {
    pub(crate) const NEG: f32 = f32::NEG_INFINITY;

    /// Logits whose softmax is `probs` (ln p; the softmax is shift-invariant).
    pub(crate) fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    /// The indices a filter kept (not −∞).
    pub(crate) fn kept(logits: &[f32]) -> Vec<usize> {
        (0..logits.len()).filter(|&i| logits[i] > NEG).collect()
    }
}

#[cfg(test)]
mod tests {
    //! The filters are exact arithmetic on hand-worked examples: logits are
    //! chosen as ln of simple probabilities, so each expectation below
    //! follows from the definition by hand.
    use super::*;
    use super::test_logits::{NEG, kept, logits_of};

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0]), 1);
        assert_eq!(argmax(&[3.0]), 0);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.0]), 1);
    }

    #[test]
    fn temperature_divides_the_logits() {
        let mut l = vec![1.0, -2.0, 0.5];
        apply_temperature(&mut l, 0.5);
        assert_eq!(l, vec![2.0, -4.0, 1.0]);
        // T = 2 halves the log-odds: probabilities (0.8, 0.2) -> ln odds ln 4 -> ln 2,
        // i.e. (2/3, 1/3).
        let mut l = logits_of(&[0.8, 0.2]);
        apply_temperature(&mut l, 2.0);
        let p = softmax(&l);
        assert!((p[0] - 2.0 / 3.0).abs() < 1e-6 && (p[1] - 1.0 / 3.0).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_ties_with_the_kth() {
        let mut l = vec![1.0, 4.0, 3.0, 2.0, 0.0];
        top_k_filter(&mut l, 2);
        assert_eq!(l, vec![NEG, 4.0, 3.0, NEG, NEG]);
        // The 2nd largest (3.0) appears twice: both stay.
        let mut l = vec![3.0, 4.0, 3.0, 2.0];
        top_k_filter(&mut l, 2);
        assert_eq!(kept(&l), vec![0, 1, 2]);
        // k >= vocab keeps everything; k = 1 keeps the maximum only.
        let mut l = vec![1.0, 2.0];
        top_k_filter(&mut l, 5);
        assert_eq!(l, vec![1.0, 2.0]);
        let mut l = vec![1.0, 2.0, 0.5];
        top_k_filter(&mut l, 1);
        assert_eq!(kept(&l), vec![1]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.25, 0.15, 0.1 (tokens 2, 0, 3, 1).
        let probs = [0.25, 0.1, 0.5, 0.15];
        // p = 0.6: 0.5 < 0.6, 0.5 + 0.25 = 0.75 >= 0.6 -> {2, 0}.
        let mut l = logits_of(&probs);
        top_p_filter(&mut l, 0.6);
        assert_eq!(kept(&l), vec![0, 2]);
        // p = 0.8: 0.75 < 0.8, 0.9 >= 0.8 -> {2, 0, 3}.
        let mut l = logits_of(&probs);
        top_p_filter(&mut l, 0.8);
        assert_eq!(kept(&l), vec![0, 2, 3]);
        // p = 0.3: the top token alone (0.5) already reaches it.
        let mut l = logits_of(&probs);
        top_p_filter(&mut l, 0.3);
        assert_eq!(kept(&l), vec![2]);
        // A tiny p still keeps one token; p = 1 keeps every token.
        let mut l = logits_of(&probs);
        top_p_filter(&mut l, 1e-6);
        assert_eq!(kept(&l), vec![2]);
        let mut l = logits_of(&probs);
        top_p_filter(&mut l, 1.0);
        assert_eq!(kept(&l), vec![0, 1, 2, 3]);
        // Kept logits are unchanged.
        let mut l = logits_of(&probs);
        let orig = l.clone();
        top_p_filter(&mut l, 0.6);
        assert_eq!((l[0], l[2]), (orig[0], orig[2]));
    }

    #[test]
    fn top_k_then_top_p_renormalises_over_the_survivors() {
        // top_k 3 drops 0.1 (token 1); over the rest (0.25, 0.5, 0.15, total
        // 0.9) the probabilities are 5/18, 10/18, 3/18; top_p 0.7: 10/18 ≈
        // 0.556 < 0.7, 15/18 ≈ 0.833 >= 0.7 -> {2, 0}.
        let mut l = logits_of(&[0.25, 0.1, 0.5, 0.15]);
        top_k_filter(&mut l, 3);
        top_p_filter(&mut l, 0.7);
        assert_eq!(kept(&l), vec![0, 2]);
    }

    #[test]
    fn min_p_drops_tokens_below_min_p_times_the_top_probability() {
        // Probabilities 0.5, 0.25, 0.15, 0.1 (tokens 2, 0, 3, 1).
        let probs = [0.25, 0.1, 0.5, 0.15];
        // min_p 0.4: bound 0.2 -> 0.25 and 0.5 stay, 0.15 and 0.1 go.
        let mut l = logits_of(&probs);
        min_p_filter(&mut l, 0.4);
        assert_eq!(kept(&l), vec![0, 2]);
        // min_p 0.25: bound 0.125 -> 0.15 stays too (0.1 < 0.125 goes).
        let mut l = logits_of(&probs);
        min_p_filter(&mut l, 0.25);
        assert_eq!(kept(&l), vec![0, 2, 3]);
        // min_p 0.19: bound 0.095, below every probability: all stay.
        let mut l = logits_of(&probs);
        min_p_filter(&mut l, 0.19);
        assert_eq!(kept(&l), vec![0, 1, 2, 3]);
        // min_p 1 keeps the top token only; min_p 0 keeps everything.
        let mut l = logits_of(&probs);
        min_p_filter(&mut l, 1.0);
        assert_eq!(kept(&l), vec![2]);
        let mut l = logits_of(&probs);
        let orig = l.clone();
        min_p_filter(&mut l, 0.0);
        assert_eq!(l, orig, "min_p 0 changes nothing");
        // Tied maxima are both kept by min_p 1.
        let mut l = logits_of(&[0.4, 0.4, 0.2]);
        min_p_filter(&mut l, 1.0);
        assert_eq!(kept(&l), vec![0, 1]);
    }

    #[test]
    fn draw_inverts_the_cumulative_distribution() {
        let p = [0.0, 0.25, 0.0, 0.75];
        assert_eq!(draw(&p, 0.0), 1);
        assert_eq!(draw(&p, 0.2499), 1);
        assert_eq!(draw(&p, 0.25), 3);
        assert_eq!(draw(&p, 0.9999), 3);
        // Rounding that leaves the total below u: the last possible token.
        assert_eq!(draw(&[0.3, 0.3, 0.0], 0.99), 1);
    }

}
