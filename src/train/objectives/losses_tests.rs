//! The objectives' losses, metrics and derivatives: values worked by hand
//! and derivatives against central finite differences.

use super::*;
use super::reward::PairRewards;


fn seq(policy: f64, reference: f64, tokens: usize) -> SeqLogps {
    SeqLogps { policy, reference, tokens }
}

/// Three pairs of mixed sign margins and lengths, NLL sums included.
fn pairs() -> Vec<PairLogps> {
    vec![
        PairLogps { chosen: seq(-12.5, -13.0, 5), rejected: seq(-20.0, -18.5, 7), chosen_nll: Some(NllSum { sum: 30.0, tokens: 12 }) },
        PairLogps { chosen: seq(-8.0, -7.0, 3), rejected: seq(-9.5, -10.25, 4), chosen_nll: Some(NllSum { sum: 21.5, tokens: 9 }) },
        PairLogps { chosen: seq(-30.0, -31.5, 11), rejected: seq(-4.0, -4.5, 2), chosen_nll: Some(NllSum { sum: 55.0, tokens: 20 }) },
    ]
}

fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    let scale = want.abs().max(1e-3);
    assert!((got - want).abs() <= tol * scale, "{what}: got {got}, want {want}");
}

/// Central differences (h = 1e-5) of a loss in each input it is
/// differentiated by, against the analytic derivatives.
fn check_pair_grads(objective: &dyn PairObjective, base: &[PairLogps]) {
    let out = objective.loss(base).unwrap();
    let h = 1e-5;
    let eval = |f: &dyn Fn(&mut PairLogps, f64), i: usize| {
        let mut plus = base.to_vec();
        let mut minus = base.to_vec();
        f(&mut plus[i], h);
        f(&mut minus[i], -h);
        (objective.loss(&plus).unwrap().loss - objective.loss(&minus).unwrap().loss) / (2.0 * h)
    };
    for i in 0..base.len() {
        let fc = eval(&|p: &mut PairLogps, d| p.chosen.policy += d, i);
        let fr = eval(&|p: &mut PairLogps, d| p.rejected.policy += d, i);
        let fn_ = eval(&|p: &mut PairLogps, d| p.chosen_nll.as_mut().unwrap().sum += d, i);
        assert_close(out.grads[i].chosen, fc, 1e-7, &format!("{objective:?} pair {i} chosen"));
        assert_close(out.grads[i].rejected, fr, 1e-7, &format!("{objective:?} pair {i} rejected"));
        assert_close(out.grads[i].chosen_nll, fn_, 1e-7, &format!("{objective:?} pair {i} nll"));
    }
}

#[test]
fn pair_objective_derivatives_match_finite_differences() {
    let variants: [&dyn PairObjective; 12] = [
        &DpoConfig::default(),
        &DpoConfig { label_smoothing: 0.2, beta: 0.5, ..DpoConfig::default() },
        &DpoConfig { loss_type: DpoLoss::Ipo, ..DpoConfig::default() },
        &DpoConfig { loss_type: DpoLoss::Hinge, ..DpoConfig::default() },
        &DpoConfig { loss_type: DpoLoss::Robust, label_smoothing: 0.1, beta: 0.3 },
        &OrpoConfig::default(),
        &OrpoConfig { beta: 0.7 },
        &CpoConfig::default(),
        &CpoConfig::simpo(),
        &CpoConfig { label_smoothing: 0.1, cpo_alpha: 0.5, ..CpoConfig::simpo() },
        &CpoConfig { loss_type: CpoLoss::Hinge, ..CpoConfig::default() },
        &CpoConfig { loss_type: CpoLoss::Ipo, ..CpoConfig::default() },
    ];
    for v in variants {
        check_pair_grads(v, &pairs());
    }
}

#[test]
fn hinge_is_flat_past_the_margin() {
    // βΔ = 2·(1 − (−1)) = 4 > 1: no loss, no gradient.
    let p = [PairLogps { chosen: seq(-1.0, -2.0, 2), rejected: seq(-3.0, -2.0, 2), chosen_nll: None }];
    let out = DpoConfig { loss_type: DpoLoss::Hinge, beta: 2.0, label_smoothing: 0.0 }.loss(&p).unwrap();
    assert_eq!(out.loss, 0.0);
    assert_eq!(out.grads[0], PairGrad::default());
}

#[test]
fn dpo_values_by_hand() {
    // Δ = (−1 − −2) − (−3 − −2) = 2, β = 0.1: loss = −logσ(0.2) = ln(1 + e^−0.2).
    let p = [PairLogps { chosen: seq(-1.0, -2.0, 2), rejected: seq(-3.0, -2.0, 4), chosen_nll: None }];
    let out = DpoConfig::default().loss(&p).unwrap();
    assert_close(out.loss, (1.0 + (-0.2f64).exp()).ln(), 1e-15, "sigmoid");
    assert_close(out.metrics.get("rewards/chosen").unwrap(), 0.1, 1e-15, "rewards/chosen");
    assert_close(out.metrics.get("rewards/rejected").unwrap(), -0.1, 1e-15, "rewards/rejected");
    assert_close(out.metrics.get("rewards/margins").unwrap(), 0.2, 1e-15, "margins");
    assert_eq!(out.metrics.get("rewards/accuracies"), Some(1.0));
    assert_eq!(out.metrics.get("logps/rejected"), Some(-3.0));
    // IPO: Δ̄ = 1/2 − (−1/4) = 0.75; (0.75 − 5)² = 18.0625.
    let ipo = DpoConfig { loss_type: DpoLoss::Ipo, ..DpoConfig::default() }.loss(&p).unwrap();
    assert_close(ipo.loss, 18.0625, 1e-15, "ipo");
    // Hinge: 1 − 0.2.
    let hinge = DpoConfig { loss_type: DpoLoss::Hinge, ..DpoConfig::default() }.loss(&p).unwrap();
    assert_close(hinge.loss, 0.8, 1e-15, "hinge");
    // Robust with ε = 0 is plain sigmoid; ε ≥ 0.5 is refused.
    let robust = DpoConfig { loss_type: DpoLoss::Robust, ..DpoConfig::default() }.loss(&p).unwrap();
    assert_close(robust.loss, out.loss, 1e-15, "robust ε=0");
    let e = DpoConfig { loss_type: DpoLoss::Robust, label_smoothing: 0.5, beta: 0.1 }.loss(&p).unwrap_err();
    assert!(e.to_string().contains("[0, 0.5)"), "{e}");
}

#[test]
fn orpo_values_by_hand() {
    // Averages ln 0.5 and ln 0.25: odds 1 and 1/3, log-odds ratio ln 3.
    let p = [PairLogps {
        chosen: seq(2.0 * 0.5f64.ln(), 0.0, 2),
        rejected: seq(3.0 * 0.25f64.ln(), 0.0, 3),
        chosen_nll: Some(NllSum { sum: 6.0, tokens: 4 }),
    }];
    let out = OrpoConfig::default().loss(&p).unwrap();
    let log_odds = 3f64.ln();
    assert_close(out.metrics.get("log_odds_chosen").unwrap(), log_odds, 1e-14, "log_odds_chosen");
    assert_close(out.metrics.get("log_odds_ratio").unwrap(), log_sigmoid(log_odds), 1e-14, "log_odds_ratio");
    assert_close(out.metrics.get("nll_loss").unwrap(), 1.5, 1e-15, "nll");
    assert_close(out.loss, 1.5 - 0.1 * (0.75f64).ln(), 1e-14, "loss");
    assert!(OrpoConfig::default().loss(&[PairLogps { chosen_nll: None, ..p[0] }]).is_err());
}

#[test]
fn simpo_values_by_hand() {
    // Averages −1 and −2: −logσ(β·1 − γ) = −logσ(−0.4).
    let p = [PairLogps { chosen: seq(-2.0, 0.0, 2), rejected: seq(-6.0, 0.0, 3), chosen_nll: None }];
    let out = CpoConfig::simpo().loss(&p).unwrap();
    assert_close(out.loss, -log_sigmoid(-0.4), 1e-15, "simpo");
    assert_close(out.metrics.get("rewards/chosen").unwrap(), -0.1, 1e-15, "rewards/chosen");
    assert_eq!(out.metrics.get("nll_loss"), Some(0.0));
    // CPO (sigmoid on sums) with its NLL term: −logσ(0.1·4) + 1·(5/2).
    let with_nll = [PairLogps { chosen_nll: Some(NllSum { sum: 5.0, tokens: 2 }), ..p[0] }];
    let cpo = CpoConfig::default().loss(&with_nll).unwrap();
    assert_close(cpo.loss, -log_sigmoid(0.4) + 2.5, 1e-15, "cpo");
}

fn kto_examples() -> Vec<KtoExample> {
    vec![
        KtoExample { logps: seq(-10.0, -11.0, 4), desirable: true, kl_policy: -20.0, kl_reference: -21.0 },
        KtoExample { logps: seq(-15.0, -14.0, 6), desirable: false, kl_policy: -12.0, kl_reference: -12.5 },
        KtoExample { logps: seq(-7.0, -9.0, 3), desirable: true, kl_policy: -30.0, kl_reference: -30.1 },
        KtoExample { logps: seq(-22.0, -21.0, 8), desirable: false, kl_policy: -9.0, kl_reference: -8.0 },
    ]
}

#[test]
fn kto_derivatives_match_finite_differences() {
    for cfg in [KtoConfig::default(), KtoConfig { beta: 0.4, desirable_weight: 1.33, undesirable_weight: 0.7 }] {
        let base = kto_examples();
        let out = cfg.loss(&base).unwrap();
        let h = 1e-5;
        for i in 0..base.len() {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[i].logps.policy += h;
            minus[i].logps.policy -= h;
            let fd = (cfg.loss(&plus).unwrap().loss - cfg.loss(&minus).unwrap().loss) / (2.0 * h);
            assert_close(out.grads[i], fd, 1e-7, &format!("kto example {i}"));
        }
    }
}

#[test]
fn kto_values_by_hand() {
    let ex = kto_examples();
    let out = KtoConfig::default().loss(&ex).unwrap();
    // KL: mean(1, 0.5, 0.1, −1) = 0.15.
    let z = 0.15;
    assert_close(out.metrics.get("kl").unwrap(), z, 1e-14, "kl");
    let want = ((1.0 - sigmoid(0.1 * (1.0 - z)))
        + (1.0 - sigmoid(0.1 * (z + 1.0)))
        + (1.0 - sigmoid(0.1 * (2.0 - z)))
        + (1.0 - sigmoid(0.1 * (z + 1.0))))
        / 4.0;
    assert_close(out.loss, want, 1e-15, "loss");
    assert_close(out.metrics.get("rewards/chosen").unwrap(), 0.15, 1e-14, "rewards/chosen");
    assert_close(out.metrics.get("rewards/rejected").unwrap(), -0.1, 1e-14, "rewards/rejected");
    assert_close(out.metrics.get("rewards/margins").unwrap(), 0.25, 1e-14, "margins");
    assert_close(out.metrics.get("logps/chosen").unwrap(), -8.5, 1e-15, "logps/chosen");
    // A negative KL estimate is clamped at 0.
    let mut neg = ex.clone();
    for e in &mut neg {
        e.kl_policy = e.kl_reference - 1.0;
    }
    assert_eq!(KtoConfig::default().loss(&neg).unwrap().metrics.get("kl"), Some(0.0));
    // Only desirable examples: no rejected metrics, no margin.
    let only = KtoConfig::default().loss(&ex[..1]).unwrap();
    assert_eq!(only.metrics.get("rewards/rejected"), None);
    assert_eq!(only.metrics.get("rewards/margins"), None);
}

#[test]
fn reward_loss_values_and_derivatives() {
    let pairs = [
        PairRewards { chosen: 1.5, rejected: -0.5, margin: 0.0 },
        PairRewards { chosen: -0.25, rejected: 0.75, margin: 0.5 },
    ];
    let cfg = RewardConfig { center_rewards_coefficient: Some(0.01) };
    let out = cfg.loss(&pairs).unwrap();
    let want = (-log_sigmoid(2.0) - log_sigmoid(-1.5)) / 2.0 + 0.01 * (1.0 + 0.25) / 2.0;
    assert_close(out.loss, want, 1e-15, "loss");
    assert_eq!(out.metrics.get("accuracy"), Some(0.5));
    assert_eq!(out.metrics.get("min_reward"), Some(-0.5));
    assert_eq!(out.metrics.get("max_reward"), Some(1.5));
    assert_close(out.metrics.get("margin").unwrap(), 0.5, 1e-15, "margin");
    let h = 1e-5;
    for i in 0..2 {
        for chosen in [true, false] {
            let (mut plus, mut minus) = (pairs, pairs);
            let (p, m) = if chosen {
                (&mut plus[i].chosen, &mut minus[i].chosen)
            } else {
                (&mut plus[i].rejected, &mut minus[i].rejected)
            };
            *p += h;
            *m -= h;
            let fd = (cfg.loss(&plus).unwrap().loss - cfg.loss(&minus).unwrap().loss) / (2.0 * h);
            let g = if chosen { out.grads[i].chosen } else { out.grads[i].rejected };
            assert_close(g, fd, 1e-7, &format!("reward pair {i} chosen={chosen}"));
        }
    }
}

#[test]
fn stable_at_extremes() {
    assert_eq!(log_sigmoid(1000.0), 0.0);
    assert_eq!(log_sigmoid(-1000.0), -1000.0);
    assert_eq!(sigmoid(-1000.0), 0.0);
    assert_close(log1mexp(-1e-10), (1e-10f64).ln(), 1e-9, "log1mexp near 0");
    assert_close(log1mexp(-50.0), -(-50f64).exp(), 1e-12, "log1mexp far");
}

#[test]
fn bad_inputs_are_errors() {
    let mut p = pairs();
    p[1].rejected.tokens = 0;
    let e = DpoConfig::default().loss(&p).unwrap_err().to_string();
    assert!(e.contains("pair 1: rejected") && e.contains("no tokens"), "{e}");
    p[1].rejected.tokens = 3;
    p[2].chosen.policy = f64::NAN;
    assert!(DpoConfig::default().loss(&p).unwrap_err().to_string().contains("finite"));
    assert!(DpoConfig::default().loss(&[]).is_err());
    // A pair is not a KTO example: the KTO objective refuses pairs.
    let e = kto::examples_of(&Examples::Pairs(Vec::new())).unwrap_err().to_string();
    assert!(e.contains("unpaired"), "{e}");
    assert!(DpoLoss::parse("sppo").unwrap_err().to_string().contains("sigmoid, ipo, hinge, robust"));
}
