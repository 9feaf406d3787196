//! AdamW over every LoRA parameter (f32 master weights and moments) and
//! over any extra trainable tensors (`ExtraParam`: a reward model's score
//! head), with global-norm gradient clipping over all of them together as
//! torch.nn.utils.clip_grad_norm_ does it.

use crate::backend::{AdamW, Backend};
use crate::model::Model;

pub use crate::config::AdamWConfig;

/// First and second moments of one LoRA module's A and B.
struct Moments<B: Backend> {
    m_a: B::Buf,
    v_a: B::Buf,
    m_b: B::Buf,
    v_b: B::Buf,
}

/// A trainable f32 tensor outside the LoRA modules (a reward model's score
/// head, which PEFT trains as a module to save), with its gradient.
pub struct ExtraParam<B: Backend> {
    /// The key the tensor has in a PEFT adapter file (e.g.
    /// "base_model.model.score.weight"); its optimiser moments are saved
    /// under this key + ".exp_avg" / ".exp_avg_sq".
    pub name: String,
    pub shape: Vec<usize>,
    pub value: B::Buf,
    pub grad: B::Buf,
}

impl<B: Backend> ExtraParam<B> {
    pub fn from_host(be: &B, name: &str, shape: &[usize], value: &[f32]) -> ExtraParam<B> {
        assert_eq!(shape.iter().product::<usize>(), value.len(), "{name}: {} values for shape {shape:?}", value.len());
        ExtraParam { name: name.to_string(), shape: shape.to_vec(), value: be.upload(value), grad: be.zeros_f32(value.len()) }
    }

    pub fn zero_grad(&mut self, be: &B) {
        be.fill(&mut self.grad, 0.0);
    }
}

/// First and second moments of one extra tensor.
struct ExtraMoments<B: Backend> {
    name: String,
    m: B::Buf,
    v: B::Buf,
}

pub struct Optimizer<B: Backend> {
    pub cfg: AdamWConfig,
    /// Steps taken so far.
    pub step: u64,
    moments: Vec<Moments<B>>,
    /// One per extra tensor, in the order `with_extras` was given them.
    extra: Vec<ExtraMoments<B>>,
}

impl<B: Backend> Optimizer<B> {
    /// AdamW over the model's LoRA modules only.
    pub fn new(be: &B, model: &Model<B>, cfg: AdamWConfig) -> Optimizer<B> {
        Self::with_extras(be, model, &[], cfg)
    }

    /// AdamW over the model's LoRA modules and `extras`; every later
    /// `step_with` must pass the same extras in the same order.
    pub fn with_extras(be: &B, model: &Model<B>, extras: &[&ExtraParam<B>], cfg: AdamWConfig) -> Optimizer<B> {
        let extra = extras
            .iter()
            .map(|p| {
                let len = be.len(&p.value);
                ExtraMoments { name: p.name.clone(), m: be.zeros_f32(len), v: be.zeros_f32(len) }
            })
            .collect();
        let moments = model
            .loras()
            .map(|(_, _, l)| {
                let (na, nb) = (be.len(&l.a), be.len(&l.b));
                Moments { m_a: be.zeros_f32(na), v_a: be.zeros_f32(na), m_b: be.zeros_f32(nb), v_b: be.zeros_f32(nb) }
            })
            .collect();
        Optimizer { cfg, step: 0, moments, extra }
    }

    /// Global L2 norm of all LoRA gradients (accumulated in f64).
    pub fn grad_norm(be: &B, model: &Model<B>) -> f64 {
        Self::grad_norm_with(be, model, &[])
    }

    /// Global L2 norm of all LoRA gradients and the extras' gradients.
    pub fn grad_norm_with(be: &B, model: &Model<B>, extras: &[&mut ExtraParam<B>]) -> f64 {
        let mut grads: Vec<&B::Buf> = model.loras().flat_map(|(_, _, l)| [&l.grad_a, &l.grad_b]).collect();
        grads.extend(extras.iter().map(|p| &p.grad));
        be.sum_sq_all(&grads).sqrt()
    }

    /// Clip, then update every LoRA parameter. Returns the pre-clip
    /// gradient norm. Panics when the optimiser was built with extras (use
    /// `step_with`).
    pub fn step(&mut self, be: &B, model: &mut Model<B>, lr: f32) -> f64 {
        self.step_with(be, model, &mut [], lr).expect("an optimiser built with extra tensors steps through step_with")
    }

    /// Clip (one global norm over the LoRA tensors and `extras`), then
    /// update every parameter. `extras` must be those given to
    /// `with_extras`, in the same order. Returns the pre-clip gradient norm.
    pub fn step_with(&mut self, be: &B, model: &mut Model<B>, extras: &mut [&mut ExtraParam<B>], lr: f32) -> anyhow::Result<f64> {
        let given: Vec<&str> = extras.iter().map(|p| p.name.as_str()).collect();
        let held: Vec<&str> = self.extra.iter().map(|m| m.name.as_str()).collect();
        anyhow::ensure!(given == held, "the optimiser holds moments for extra tensors {held:?} but the step was given {given:?}");
        let norm = Self::grad_norm_with(be, model, extras);
        if let Some(max) = self.cfg.max_grad_norm.filter(|m| *m > 0.0) {
            // torch: coef = max_norm / (total_norm + 1e-6), applied when < 1.
            let coef = (max as f64 / (norm + 1e-6)) as f32;
            if coef < 1.0 {
                for (_, _, l) in model.loras_mut() {
                    be.scale(&mut l.grad_a, coef);
                    be.scale(&mut l.grad_b, coef);
                }
                for p in extras.iter_mut() {
                    be.scale(&mut p.grad, coef);
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
        for (p, mo) in extras.iter_mut().zip(self.extra.iter_mut()) {
            be.adamw(&mut p.value, &p.grad, &mut mo.m, &mut mo.v, hp);
        }
        Ok(norm)
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

/// The optimiser's state of one extra tensor on the host, for checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraMomentsHost {
    /// The tensor's `ExtraParam::name`.
    pub name: String,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl<B: Backend> Optimizer<B> {
    /// The extras' moments, in `with_extras` order.
    pub fn extra_moments_to_host(&self, be: &B) -> Vec<ExtraMomentsHost> {
        self.extra
            .iter()
            .map(|m| ExtraMomentsHost { name: m.name.clone(), exp_avg: be.download(&m.m), exp_avg_sq: be.download(&m.v) })
            .collect()
    }

    /// Restore moments saved by `extra_moments_to_host` (exact: f32 both
    /// ways); names and sizes must match the optimiser's extras.
    pub fn load_extra_moments(&mut self, be: &B, host: &[ExtraMomentsHost]) -> anyhow::Result<()> {
        let held: Vec<&str> = self.extra.iter().map(|m| m.name.as_str()).collect();
        let given: Vec<&str> = host.iter().map(|h| h.name.as_str()).collect();
        anyhow::ensure!(held == given, "optimizer state holds extra tensors {given:?} but the run trains {held:?}");
        for (m, h) in self.extra.iter_mut().zip(host) {
            let want = be.len(&m.m);
            if h.exp_avg.len() != want || h.exp_avg_sq.len() != want {
                anyhow::bail!("optimizer state of {} has {} values where the run needs {want}", h.name, h.exp_avg.len());
            }
            m.m = be.upload(&h.exp_avg);
            m.v = be.upload(&h.exp_avg_sq);
        }
        Ok(())
    }
}
