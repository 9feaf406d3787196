//! Conformance of the per-layer op variants some model families need on
//! top of the Llama set: the GeGLU activation, RMSNorm scaled by (1 + w)
//! (also per attention head: many short rows), partial rotary embeddings
//! with a cos/sin multiplier, and column copies out of and into a fused
//! projection's output. Same inputs, tolerances and checks as the rest of
//! the harness.

use super::Harness;
use ferrotune::backend::{Backend, ColsShape, GluAct, GluShape, NormShape, RopeShape};

impl<R: Backend, C: Backend> Harness<'_, R, C> {
    /// Every variant at the harness's shapes: `n` tokens, `hidden`, `inter`.
    pub(super) fn layer_variants(&mut self, n: usize, hidden: usize, inter: usize) {
        self.geglu(n * inter);
        // The model's norm, a head_dim-256 per-head norm over n·4 rows, and a
        // long odd row (each kernel layout on every scale).
        for (rows, h) in [(n, hidden), (n * 4, 256), (6, 1000)] {
            self.rmsnorm_plus_one(rows, h);
        }
        self.partial_rope(n, 4, 128, 96, 1.19);
        self.copy_cols(n, [hidden, hidden / 4, hidden / 4]);
    }

    fn geglu(&mut self, len: usize) {
        let t = self.tol;
        let shape = GluShape { len, act: GluAct::GeluTanh };
        let (rg, cg, _) = self.act(len, 4.0);
        let (ru, cu, _) = self.act(len, 2.0);
        let (mut ro, mut co) = (self.reference.zeros(len), self.candidate.zeros(len));
        self.reference.glu(&rg, &ru, &mut ro, shape);
        self.candidate.glu(&cg, &cu, &mut co, shape);
        self.check("geglu".into(), &ro, &co, t.elementwise);
        let (rd, cd, _) = self.act(len, 1.0);
        let (mut rdg, mut cdg) = (self.reference.zeros(len), self.candidate.zeros(len));
        let (mut rdu, mut cdu) = (self.reference.zeros(len), self.candidate.zeros(len));
        self.reference.glu_backward(&rd, &rg, &ru, &mut rdg, &mut rdu, shape);
        self.candidate.glu_backward(&cd, &cg, &cu, &mut cdg, &mut cdu, shape);
        self.check("geglu_backward dgate".into(), &rdg, &cdg, t.elementwise);
        self.check("geglu_backward dup".into(), &rdu, &cdu, t.elementwise);
    }

    fn rmsnorm_plus_one(&mut self, rows: usize, hidden: usize) {
        let t = self.tol;
        let shape = NormShape { rows, hidden, plus_one: true };
        let (rx, cx, _) = self.act(rows * hidden, 2.0);
        // Stored as offsets from one, so around zero.
        let (rw, cw) = self.weight(hidden, 0.5);
        let (mut ry, mut cy) = (self.reference.zeros(rows * hidden), self.candidate.zeros(rows * hidden));
        let (mut rinv, mut cinv) = (self.reference.zeros_f32(rows), self.candidate.zeros_f32(rows));
        self.reference.rmsnorm(&rx, &rw, &mut ry, &mut rinv, shape, 1e-6);
        self.candidate.rmsnorm(&cx, &cw, &mut cy, &mut cinv, shape, 1e-6);
        let tag = format!("(1 + w) {rows}x{hidden}");
        self.check(format!("rmsnorm y {tag}"), &ry, &cy, t.elementwise);
        self.check(format!("rmsnorm inv_rms {tag}"), &rinv, &cinv, t.f32_outputs);
        let (rdy, cdy, _) = self.act(rows * hidden, 1.0);
        let (mut rdx, mut cdx, _) = self.act(rows * hidden, 1.0);
        self.reference.rmsnorm_backward(&rdy, &rx, &rw, &rinv, &mut rdx, shape);
        self.candidate.rmsnorm_backward(&cdy, &cx, &cw, &cinv, &mut cdx, shape);
        self.check(format!("rmsnorm_backward dx (accumulated) {tag}"), &rdx, &cdx, t.elementwise);
    }

    fn partial_rope(&mut self, n: usize, heads: usize, d: usize, rot_dim: usize, mscale: f32) {
        let t = self.tol;
        let shape = RopeShape { n, heads, head_dim: d, rot_dim, mscale };
        let inv: Vec<f32> = (0..rot_dim / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rot_dim as f32)).collect();
        let (rf, cf) = (self.reference.upload(&inv), self.candidate.upload(&inv));
        let pos: Vec<i32> = (0..n).map(|i| (i * 389 % 131072) as i32).collect();
        let (rp, cp) = self.ints(&pos);
        let (mut rx, mut cx, _) = self.act(n * heads * d, 1.0);
        self.reference.rope(&mut rx, &rp, &rf, shape);
        self.candidate.rope(&mut cx, &cp, &cf, shape);
        let tag = format!("rot_dim={rot_dim}/{d} mscale={mscale}");
        self.check(format!("rope {tag}"), &rx, &cx, t.elementwise);
        self.reference.rope_backward(&mut rx, &rp, &rf, shape);
        self.candidate.rope_backward(&mut cx, &cp, &cf, shape);
        self.check(format!("rope_backward (of rope) {tag}"), &rx, &cx, t.elementwise);
    }

    /// A fused [q | k | v]-like row layout of `widths`: each part split out,
    /// then written back into a destination holding other values (which
    /// must stay). A copy of stored values: exact, in both storage types.
    fn copy_cols(&mut self, rows: usize, widths: [usize; 3]) {
        let cols: usize = widths.iter().sum();
        for f32_storage in [false, true] {
            let (rs, cs, _) = if f32_storage { self.f32s(rows * cols, 1.0) } else { self.act(rows * cols, 1.0) };
            let (mut rback, mut cback, _) = if f32_storage { self.f32s(rows * cols, 1.0) } else { self.act(rows * cols, 1.0) };
            let mut off = 0;
            for w in widths {
                let (mut rpart, mut cpart) = if f32_storage {
                    (self.reference.zeros_f32(rows * w), self.candidate.zeros_f32(rows * w))
                } else {
                    (self.reference.zeros(rows * w), self.candidate.zeros(rows * w))
                };
                let split = ColsShape { rows, src_cols: cols, src_off: off, dst_cols: w, dst_off: 0, width: w };
                self.reference.copy_cols(&rs, &mut rpart, split);
                self.candidate.copy_cols(&cs, &mut cpart, split);
                let tag = format!("{rows}x{cols} cols {off}..{} f32={f32_storage}", off + w);
                self.check(format!("copy_cols split {tag}"), &rpart, &cpart, 0.0);
                let join = ColsShape { rows, src_cols: w, src_off: 0, dst_cols: cols, dst_off: off, width: w };
                self.reference.copy_cols(&rpart, &mut rback, join);
                self.candidate.copy_cols(&cpart, &mut cback, join);
                self.check(format!("copy_cols join {tag}"), &rback, &cback, 0.0);
                off += w;
            }
        }
    }
}
