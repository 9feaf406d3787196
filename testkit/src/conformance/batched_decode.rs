//! Conformance of the batched-decoding ops: `scatter_rows` (each sequence's
//! new key or value into its region of one cache buffer) and
//! `decode_attention_batch` (one new token per sequence against its region),
//! run together as a decoding step runs them. Same inputs and tolerances as
//! the rest of the harness; outputs are checked sequence by sequence, so a
//! wrong region or position shows as its own failing check.

use super::{Harness, compare};
use ferrotune::backend::{AttnShape, Backend};

/// The sequences and cache of one batched check: sequence s's new token is
/// at `positions[s]` (each < `capacity`).
#[derive(Debug, Clone, Copy)]
pub struct DecodeBatch<'p> {
    pub positions: &'p [usize],
    pub capacity: usize,
}

impl<R: Backend, C: Backend> Harness<'_, R, C> {
    /// One decoding step of `batch`: the new keys and values scattered into
    /// a cache of random rows (rows past each position hold values that
    /// must not be read), then decode_attention_batch. Checks the caches
    /// (exact) and each sequence's output (the attention tolerance).
    pub fn decode_attention_batch(&mut self, batch: DecodeBatch<'_>, heads: usize, kv: usize, d: usize, window: Option<usize>) {
        self.decode_attention_batch_with(batch, heads, kv, d, window, None);
    }

    /// `decode_attention_batch` with soft-capped scores (panics, as
    /// `attention_capped`, if the cap hardly moves the reference).
    pub fn decode_attention_batch_capped(
        &mut self,
        batch: DecodeBatch<'_>,
        heads: usize,
        kv: usize,
        d: usize,
        window: Option<usize>,
        cap: f32,
    ) {
        self.decode_attention_batch_with(batch, heads, kv, d, window, Some(cap));
    }

    fn decode_attention_batch_with(
        &mut self,
        batch: DecodeBatch<'_>,
        heads: usize,
        kv: usize,
        d: usize,
        window: Option<usize>,
        softcap: Option<f32>,
    ) {
        let t = self.tol;
        let DecodeBatch { positions, capacity } = batch;
        let n = positions.len();
        let shape = AttnShape { n, n_heads: heads, n_kv_heads: kv, head_dim: d, window, scale: 1.0 / (d as f32).sqrt(), softcap, max_seqlen: 0 };
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let (rp, cp) = self.ints(&pos);
        let (rq, cq, _) = self.act(n * heads * d, 2.0);
        let (mut rk, mut ck, _) = self.act(n * capacity * kv * d, 2.0);
        let (mut rv, mut cv, _) = self.act(n * capacity * kv * d, 1.0);
        let (rnk, cnk, _) = self.act(n * kv * d, 2.0);
        let (rnv, cnv, _) = self.act(n * kv * d, 1.0);
        let width = kv * d;
        self.reference.scatter_rows(&rnk, &mut rk, &rp, n, width, capacity);
        self.candidate.scatter_rows(&cnk, &mut ck, &cp, n, width, capacity);
        self.reference.scatter_rows(&rnv, &mut rv, &rp, n, width, capacity);
        self.candidate.scatter_rows(&cnv, &mut cv, &cp, n, width, capacity);
        let cap_tag = softcap.map(|c| format!(" softcap={c}")).unwrap_or_default();
        let tag = format!("capacity={capacity} d={d} h={heads}/{kv} window={window:?}{cap_tag}");
        self.check(format!("scatter_rows k_cache {tag}"), &rk, &ck, 0.0);
        self.check(format!("scatter_rows v_cache {tag}"), &rv, &cv, 0.0);

        let mut ro = self.reference.zeros(n * heads * d);
        let mut co = self.candidate.zeros(n * heads * d);
        self.reference.decode_attention_batch(&rq, &rk, &rv, &rp, capacity, shape, &mut ro);
        self.candidate.decode_attention_batch(&cq, &ck, &cv, &cp, capacity, shape, &mut co);
        if softcap.is_some() {
            let mut uo = self.reference.zeros(n * heads * d);
            self.reference.decode_attention_batch(&rq, &rk, &rv, &rp, capacity, AttnShape { softcap: None, ..shape }, &mut uo);
            self.assert_cap_bites(&uo, &ro, "decode_attention_batch");
        }
        let (want, got) = (self.reference.download(&ro), self.candidate.download(&co));
        let row = heads * d;
        for (s, p) in positions.iter().enumerate() {
            let span = s * row..(s + 1) * row;
            let op = format!("decode_attention_batch seq {s}/{n} position {p} {tag}");
            self.checks.push(compare(op, &got[span.clone()], &want[span], t.attention));
        }
    }

    /// scatter_rows alone, in both storage types (activation and f32), into
    /// a destination of random rows: the written rows and every other row
    /// must be exactly the reference's.
    pub fn scatter_rows(&mut self, positions: &[usize], width: usize, capacity: usize) {
        let rows = positions.len();
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let (rp, cp) = self.ints(&pos);
        let tag = format!("rows={rows} width={width} capacity={capacity}");
        let (rs, cs, _) = self.act(rows * width, 1.0);
        let (mut rd, mut cd, _) = self.act(rows * capacity * width, 1.0);
        self.reference.scatter_rows(&rs, &mut rd, &rp, rows, width, capacity);
        self.candidate.scatter_rows(&cs, &mut cd, &cp, rows, width, capacity);
        self.check(format!("scatter_rows activations {tag}"), &rd, &cd, 0.0);
        let (rs, cs, _) = self.f32s(rows * width, 1.0);
        let (mut rd, mut cd, _) = self.f32s(rows * capacity * width, 1.0);
        self.reference.scatter_rows(&rs, &mut rd, &rp, rows, width, capacity);
        self.candidate.scatter_rows(&cs, &mut cd, &cp, rows, width, capacity);
        self.check(format!("scatter_rows f32 {tag}"), &rd, &cd, 0.0);
    }
}
