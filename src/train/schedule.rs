//! Learning-rate schedules, computed exactly as transformers' LambdaLR
//! schedules do: the rate of optimiser step `s` (0-based, the number of
//! steps already taken) is base_lr · λ(s).

use anyhow::{Result, bail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Constant after the warmup (transformers' constant_with_warmup; with
    /// no warmup it is plain constant).
    Constant,
    /// Linear decay to 0 at the last step (get_linear_schedule_with_warmup).
    Linear,
    /// Half a cosine down to 0 (get_cosine_schedule_with_warmup, 0.5 cycles).
    Cosine,
}

impl Kind {
    pub fn parse(name: &str) -> Result<Kind> {
        Ok(match name {
            "constant" | "constant_with_warmup" => Kind::Constant,
            "linear" => Kind::Linear,
            "cosine" => Kind::Cosine,
            other => bail!("lr_scheduler \"{other}\": expected constant, linear or cosine"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: Kind,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// warmup_ratio becomes ceil(ratio · total) steps, as transformers'
    /// TrainingArguments.get_warmup_steps computes it.
    pub fn warmup_from(warmup_steps: Option<usize>, warmup_ratio: Option<f64>, total_steps: usize) -> usize {
        match (warmup_steps, warmup_ratio) {
            (Some(s), _) => s,
            (None, Some(r)) => (r * total_steps as f64).ceil() as usize,
            (None, None) => 0,
        }
    }

    /// λ(step) in [0, 1].
    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            Kind::Constant => 1.0,
            Kind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Kind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of optimiser step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    /// When the warmup lasts the whole run, the rate never reaches base_lr:
    /// one line saying so, with the peak the run does reach, naming the key
    /// that set the warmup (the config's warmup_steps / warmup_ratio).
    pub fn warmup_overrun(&self, warmup_steps: Option<usize>, warmup_ratio: Option<f64>) -> Option<String> {
        if self.warmup_steps == 0 || self.warmup_steps < self.total_steps {
            return None;
        }
        let asked = match (warmup_steps, warmup_ratio) {
            (Some(n), _) => format!("warmup_steps {n}"),
            (None, r) => format!("warmup_ratio {} ({} steps)", r.unwrap_or(0.0), self.warmup_steps),
        };
        // The rate only rises during warmup, so the run's last step is its peak.
        let peak = self.lr(self.total_steps.saturating_sub(1));
        let how = if self.warmup_steps > self.total_steps { "reaches past" } else { "lasts all of" };
        Some(format!(
            "{asked} {how} the run's {} optimizer steps: the learning rate peaks at {} and never reaches learning_rate {}",
            self.total_steps,
            short(peak),
            short(self.base_lr)
        ))
    }
}

/// A rate in three significant digits: 5.5e-6, 0.0002 stays 2e-4.
fn short(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let s = format!("{x:.2e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
    format!("{mantissa}e{exp}")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values are transformers' schedule formulas evaluated by hand
    // (get_linear/cosine/constant_schedule_with_warmup, torch LambdaLR).
    #[test]
    fn linear_with_warmup_matches_transformers() {
        let s = Schedule { kind: Kind::Linear, base_lr: 2e-3, warmup_steps: 1, total_steps: 3 };
        let lrs: Vec<f64> = (0..3).map(|i| s.lr(i)).collect();
        assert_eq!(lrs, vec![0.0, 2e-3, 1e-3]);
        assert_eq!(s.lr(3), 0.0);
        assert_eq!(s.lr(10), 0.0);
    }

    #[test]
    fn cosine_and_constant_with_warmup() {
        let c = Schedule { kind: Kind::Cosine, base_lr: 1.0, warmup_steps: 2, total_steps: 6 };
        assert_eq!(c.factor(0), 0.0);
        assert_eq!(c.factor(1), 0.5);
        assert_eq!(c.factor(2), 1.0);
        // progress 0.5 at step 4: 0.5·(1 + cos(π/2)) = 0.5.
        assert!((c.factor(4) - 0.5).abs() < 1e-15);
        assert!(c.factor(6).abs() < 1e-15);
        let k = Schedule { kind: Kind::Constant, base_lr: 3.0, warmup_steps: 4, total_steps: 10 };
        assert_eq!(k.lr(1), 0.75);
        assert_eq!(k.lr(4), 3.0);
        assert_eq!(k.lr(9), 3.0);
    }

    #[test]
    fn warmup_longer_than_the_run_is_reported_with_its_peak() {
        // 12 steps of a 100-step warmup: the last step (11) runs at 11/100 of the rate.
        let s = Schedule { kind: Kind::Cosine, base_lr: 5e-5, warmup_steps: 100, total_steps: 12 };
        assert_eq!(
            s.warmup_overrun(Some(100), None).unwrap(),
            "warmup_steps 100 reaches past the run's 12 optimizer steps: the learning rate peaks at 5.5e-6 \
             and never reaches learning_rate 5e-5"
        );
        let whole = Schedule { kind: Kind::Linear, base_lr: 2e-4, warmup_steps: 4, total_steps: 4 };
        assert!(whole.warmup_overrun(Some(4), None).unwrap().contains("lasts all of the run's 4 optimizer steps: the learning rate peaks at 1.5e-4"));
        let ratio = Schedule { kind: Kind::Constant, base_lr: 1e-4, warmup_steps: Schedule::warmup_from(None, Some(0.9), 3), total_steps: 3 };
        assert!(ratio.warmup_overrun(None, Some(0.9)).unwrap().starts_with("warmup_ratio 0.9 (3 steps) lasts all of the run's 3 optimizer steps"));
        let fine = Schedule { kind: Kind::Linear, base_lr: 2e-4, warmup_steps: 3, total_steps: 4 };
        assert_eq!(fine.warmup_overrun(Some(3), None), None);
        assert_eq!(Schedule { warmup_steps: 0, ..fine }.warmup_overrun(Some(0), None), None);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        assert_eq!(Schedule::warmup_from(None, Some(0.1), 15), 2);
        assert_eq!(Schedule::warmup_from(Some(3), None, 15), 3);
        assert_eq!(Schedule::warmup_from(None, None, 15), 0);
        assert!(Kind::parse("polynomial").unwrap_err().to_string().contains("expected constant, linear or cosine"));
    }
}
