//! The warning of a preference run whose policy drifts away from all the
//! data: the log-probs of chosen and rejected completions both collapsing.

use super::objectives::Metrics;

/// Watches the log-probs of preference runs: when those of both chosen and
/// rejected completions fall far below where they started, the policy is
/// leaving the data altogether rather than preferring the chosen side.
#[derive(Default)]
pub struct CollapseWatch {
    first: Option<(f64, f64)>,
    warned: bool,
}

impl CollapseWatch {
    pub fn check(&mut self, m: &Metrics) -> Option<String> {
        let (c, r) = (m.get("logps/chosen")?, m.get("logps/rejected")?);
        let (c0, r0) = *self.first.get_or_insert((c, r));
        // Summed log-probs are negative; "collapsing" = both at least twice
        // as negative as at the start, and by more than 10 nats.
        let collapsing = c < 2.0 * c0 && r < 2.0 * r0 && c < c0 - 10.0 && r < r0 - 10.0;
        if !collapsing || self.warned {
            return None;
        }
        self.warned = true;
        Some(format!(
            "warning: the log-probs of both chosen and rejected completions are collapsing \
             (logps/chosen {c0:.1} -> {c:.1}, logps/rejected {r0:.1} -> {r:.1}): the model is drifting away from \
             all the data, not just the rejected side. Usual causes: learning_rate too high, rl_beta too low, or \
             chosen and rejected completions that are nearly the same"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(c: f64, r: f64) -> Metrics {
        Metrics(vec![("logps/chosen", c), ("logps/rejected", r)])
    }

    #[test]
    fn collapse_is_reported_once_when_both_sides_fall() {
        let mut w = CollapseWatch::default();
        assert_eq!(w.check(&m(-20.0, -25.0)), None);
        // Rejected falls, chosen holds: the objective working as meant.
        assert_eq!(w.check(&m(-19.0, -90.0)), None);
        let warning = w.check(&m(-45.0, -80.0)).expect("both sides collapsed");
        assert!(warning.contains("logps/chosen -20.0 -> -45.0") && warning.contains("learning_rate too high"), "{warning}");
        assert_eq!(w.check(&m(-90.0, -120.0)), None, "said once");
        assert_eq!(CollapseWatch::default().check(&Metrics::default()), None, "SFT runs have no log-prob metrics");
    }
}
