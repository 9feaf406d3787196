//! AdamW over every LoRA parameter (f32 master weights and moments), with
//! global-norm gradient clipping as torch.nn.utils.clip_grad_norm_ does it.

use crate::backend::{AdamW, Backend};
use crate::model::Model;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (None or <= 0: no clipping).
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults, with weight decay 0 as Axolotl/TRL use.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: Some(1.0) }
    }
}

/// First and second moments of one LoRA module's A and B.
struct Moments<B: Backend> {
    m_a: B::Buf,
    v_a: B::Buf,
    m_b: B::Buf,
    v_b: B::Buf,
}

pub struct Optimizer<B: Backend> {
    pub cfg: AdamWConfig,
    /// Steps taken so far.
    pub step: u64,
    moments: Vec<Moments<B>>,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(be: &B, model: &Model<B>, cfg: AdamWConfig) -> Optimizer<B> {
        let moments = model
            .loras()
            .map(|(_, _, l)| {
                let (na, nb) = (be.len(&l.a), be.len(&l.b));
                Moments { m_a: be.zeros_f32(na), v_a: be.zeros_f32(na), m_b: be.zeros_f32(nb), v_b: be.zeros_f32(nb) }
            })
            .collect();
        Optimizer { cfg, step: 0, moments }
    }

    /// Global L2 norm of all LoRA gradients (accumulated in f64).
    pub fn grad_norm(be: &B, model: &Model<B>) -> f64 {
        let grads: Vec<&B::Buf> = model.loras().flat_map(|(_, _, l)| [&l.grad_a, &l.grad_b]).collect();
        be.sum_sq_all(&grads).sqrt()
    }

    /// Clip, then update every parameter. Returns the pre-clip gradient norm.
    pub fn step(&mut self, be: &B, model: &mut Model<B>, lr: f32) -> f64 {
        let norm = Self::grad_norm(be, model);
        if let Some(max) = self.cfg.max_grad_norm.filter(|m| *m > 0.0) {
            // torch: coef = max_norm / (total_norm + 1e-6), applied when < 1.
            let coef = (max as f64 / (norm + 1e-6)) as f32;
            if coef < 1.0 {
                for (_, _, l) in model.loras_mut() {
                    be.scale(&mut l.grad_a, coef);
                    be.scale(&mut l.grad_b, coef);
                }
            }
        }
        self.step += 1;
        let hp = AdamW {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step: self.step,
        };
        for ((_, _, l), mo) in model.loras_mut().zip(self.moments.iter_mut()) {
            be.adamw(&mut l.a, &l.grad_a, &mut mo.m_a, &mut mo.v_a, hp);
            be.adamw(&mut l.b, &l.grad_b, &mut mo.m_b, &mut mo.v_b, hp);
        }
        norm
    }
}

/// The optimiser's state on the host, for checkpoints: per LoRA module (in
/// `Model::loras` order) the first and second moments of A and of B.
#[derive(Debug, Clone, PartialEq)]
pub struct MomentsHost {
    pub exp_avg_a: Vec<f32>,
    pub exp_avg_sq_a: Vec<f32>,
    pub exp_avg_b: Vec<f32>,
    pub exp_avg_sq_b: Vec<f32>,
}

impl<B: Backend> Optimizer<B> {
    pub fn moments_to_host(&self, be: &B) -> Vec<MomentsHost> {
        self.moments
            .iter()
            .map(|m| MomentsHost {
                exp_avg_a: be.download(&m.m_a),
                exp_avg_sq_a: be.download(&m.v_a),
                exp_avg_b: be.download(&m.m_b),
                exp_avg_sq_b: be.download(&m.v_b),
            })
            .collect()
    }

    /// Restore moments saved by `moments_to_host` (exact: f32 both ways).
    pub fn load_moments(&mut self, be: &B, host: &[MomentsHost]) -> anyhow::Result<()> {
        anyhow::ensure!(
            host.len() == self.moments.len(),
            "optimizer state holds {} LoRA modules but the model has {}",
            host.len(),
            self.moments.len()
        );
        for (i, (m, h)) in self.moments.iter_mut().zip(host).enumerate() {
            let sizes = [(be.len(&m.m_a), h.exp_avg_a.len()), (be.len(&m.v_a), h.exp_avg_sq_a.len()),
                         (be.len(&m.m_b), h.exp_avg_b.len()), (be.len(&m.v_b), h.exp_avg_sq_b.len())];
            if let Some((want, got)) = sizes.into_iter().find(|(w, g)| w != g) {
                anyhow::bail!("optimizer state of LoRA module {i} has {got} values where the model needs {want}");
            }
            m.m_a = be.upload(&h.exp_avg_a);
            m.v_a = be.upload(&h.exp_avg_sq_a);
            m.m_b = be.upload(&h.exp_avg_b);
            m.v_b = be.upload(&h.exp_avg_sq_b);
        }
        Ok(())
    }
}
