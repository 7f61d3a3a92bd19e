//! Neural Cleanse's cost (λ) schedule, best-mask rule and early stop, as
//! its example script runs them (bolunwang/backdoor `visualizer.py` with the
//! settings of `gtsrb_visualize_example.py`): a pure state machine fed one
//! step's attack success rate and mean mask L1 at a time, so every rule can
//! be checked step by step.

use serde::{Deserialize, Serialize};

/// The schedule's constants (the example script's values by default).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleParams {
    /// The cost set once the attack first succeeds (`INIT_COST`).
    pub init_cost: f64,
    /// Attack success rate counted as success (`ATTACK_SUCC_THRESHOLD`).
    pub threshold: f64,
    /// Consecutive steps before the cost moves (`PATIENCE`).
    pub patience: usize,
    /// Factor of a cost increase (`COST_MULTIPLIER`).
    pub multiplier_up: f64,
    /// Divisor of a cost decrease (`COST_MULTIPLIER ** 1.5`).
    pub multiplier_down: f64,
    /// A step improves on the best L1 when below this share of it
    /// (`EARLY_STOP_THRESHOLD`).
    pub early_stop_threshold: f64,
    /// Steps without improvement before stopping (`EARLY_STOP_PATIENCE`).
    pub early_stop_patience: usize,
}

impl Default for ScheduleParams {
    fn default() -> Self {
        ScheduleParams {
            init_cost: 1e-3,
            threshold: 0.99,
            patience: 5,
            multiplier_up: 2.0,
            multiplier_down: 2f64.powf(1.5),
            early_stop_threshold: 1.0,
            early_stop_patience: 25,
        }
    }
}

/// What one step decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The step's mask is the new best (success and the smallest L1 so far).
    pub keep: bool,
    /// Stop this class's optimisation now (before any cost change).
    pub stop: bool,
}

/// The schedule of one class; starts at cost 0 (`RESET_COST_TO_ZERO`).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    p: ScheduleParams,
    cost: f64,
    set_counter: usize,
    up_counter: usize,
    down_counter: usize,
    up_flag: bool,
    down_flag: bool,
    reg_best: f64,
    early_stop_reg_best: f64,
    early_stop_counter: usize,
}

impl Schedule {
    /// A fresh schedule at cost 0.
    pub fn new(p: ScheduleParams) -> Schedule {
        Schedule {
            p,
            cost: 0.0,
            set_counter: 0,
            up_counter: 0,
            down_counter: 0,
            up_flag: false,
            down_flag: false,
            reg_best: f64::INFINITY,
            early_stop_reg_best: f64::INFINITY,
            early_stop_counter: 0,
        }
    }

    /// The cost the next step uses.
    pub fn cost(&self) -> f64 {
        self.cost
    }

    /// The smallest mean L1 of a successful step so far (infinite before).
    pub fn reg_best(&self) -> f64 {
        self.reg_best
    }

    /// Feeds one finished step: its attack success rate and mean L1. The
    /// order of the rules is the original's: best mask, early stop (which
    /// ends the loop before the cost moves), then the cost.
    pub fn step(&mut self, asr: f64, reg: f64) -> Outcome {
        let p = self.p;
        let success = asr >= p.threshold;
        let keep = success && reg < self.reg_best;
        if keep {
            self.reg_best = reg;
        }
        if self.reg_best < f64::INFINITY {
            if self.reg_best >= p.early_stop_threshold * self.early_stop_reg_best {
                self.early_stop_counter += 1;
            } else {
                self.early_stop_counter = 0;
            }
        }
        self.early_stop_reg_best = self.early_stop_reg_best.min(self.reg_best);
        if self.up_flag && self.down_flag && self.early_stop_counter >= p.early_stop_patience {
            return Outcome { keep, stop: true };
        }

        if self.cost == 0.0 && success {
            self.set_counter += 1;
            if self.set_counter >= p.patience {
                self.cost = p.init_cost;
                self.up_counter = 0;
                self.down_counter = 0;
                self.up_flag = false;
                self.down_flag = false;
            }
        } else {
            self.set_counter = 0;
        }
        if success {
            self.up_counter += 1;
            self.down_counter = 0;
        } else {
            self.up_counter = 0;
            self.down_counter += 1;
        }
        if self.up_counter >= p.patience {
            self.up_counter = 0;
            self.cost *= p.multiplier_up;
            self.up_flag = true;
        } else if self.down_counter >= p.patience {
            self.down_counter = 0;
            self.cost /= p.multiplier_down;
            self.down_flag = true;
        }
        Outcome { keep, stop: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: f64 = 1.0;
    const FAIL: f64 = 0.5;

    fn run(s: &mut Schedule, asrs: &[f64]) -> Vec<f64> {
        asrs.iter()
            .map(|&a| {
                s.step(a, 10.0);
                s.cost()
            })
            .collect()
    }

    #[test]
    fn cost_stays_zero_until_five_consecutive_successes_then_is_the_initial_cost() {
        let mut s = Schedule::new(ScheduleParams::default());
        // A failure in between restarts the count.
        let costs = run(&mut s, &[OK, OK, OK, OK, FAIL, OK, OK, OK, OK]);
        assert!(costs.iter().all(|&c| c == 0.0), "{costs:?}");
        assert_eq!(run(&mut s, &[OK]), vec![1e-3]);
    }

    #[test]
    fn failures_at_cost_zero_leave_it_zero() {
        let mut s = Schedule::new(ScheduleParams::default());
        assert!(run(&mut s, &[FAIL; 12]).iter().all(|&c| c == 0.0));
    }

    #[test]
    fn five_successes_double_the_cost_and_five_failures_divide_it_by_two_to_the_1_5() {
        let p = ScheduleParams::default();
        let mut s = Schedule::new(p);
        run(&mut s, &[OK; 5]);
        assert_eq!(s.cost(), p.init_cost);
        // As in the original, the step that set the cost counts as the
        // first of the five successes.
        let costs = run(&mut s, &[OK; 4]);
        assert_eq!(&costs[..3], &[p.init_cost; 3]);
        assert_eq!(costs[3], 2.0 * p.init_cost);
        // A success breaks a run of failures.
        let costs = run(
            &mut s,
            &[FAIL, FAIL, FAIL, FAIL, OK, FAIL, FAIL, FAIL, FAIL],
        );
        assert!(costs.iter().all(|&c| c == 2.0 * p.init_cost), "{costs:?}");
        assert_eq!(
            run(&mut s, &[FAIL]),
            vec![2.0 * p.init_cost / 2f64.powf(1.5)]
        );
    }

    #[test]
    fn the_kept_step_is_the_smallest_l1_among_successful_steps() {
        let mut s = Schedule::new(ScheduleParams::default());
        let keeps: Vec<bool> = [
            (OK, 50.0),
            (FAIL, 5.0),
            (OK, 60.0),
            (OK, 40.0),
            (0.99, 30.0),
        ]
        .iter()
        .map(|&(a, r)| s.step(a, r).keep)
        .collect();
        assert_eq!(keeps, vec![true, false, false, true, true]);
        assert_eq!(s.reg_best(), 30.0);
    }

    #[test]
    fn early_stop_waits_for_the_cost_to_have_moved_up_and_down_then_25_flat_steps() {
        let p = ScheduleParams::default();
        let mut s = Schedule::new(p);
        // Cost set at step 5, doubled at step 9: moved up only; the best L1
        // stays 10.
        for _ in 0..10 {
            assert!(!s.step(OK, 10.0).stop);
        }
        // Flat for long, but the cost never moved down: no stop.
        for _ in 0..40 {
            assert!(!s.step(OK, 10.0).stop);
        }
        // Five failures move it down; the flat count has long passed 25.
        for _ in 0..5 {
            assert!(!s.step(FAIL, 10.0).stop);
        }
        assert!(s.step(FAIL, 10.0).stop);

        // With an improvement every step it never stops.
        let mut s = Schedule::new(p);
        let mut reg = 1000.0;
        for i in 0..200 {
            reg *= 0.99;
            let asr = if (i / 5) % 2 == 0 { OK } else { FAIL };
            assert!(
                !s.step(asr, if asr == OK { reg } else { 1e9 }).stop,
                "step {i}"
            );
        }
    }

    #[test]
    fn a_new_best_resets_the_early_stop_count() {
        let p = ScheduleParams::default();
        let mut s = Schedule::new(p);
        for _ in 0..5 {
            s.step(OK, 10.0);
        }
        for _ in 0..5 {
            s.step(OK, 10.0);
        }
        for _ in 0..5 {
            s.step(FAIL, 10.0);
        }
        // Both flags set and 18 flat steps counted...
        for _ in 0..4 {
            s.step(OK, 10.0);
        }
        // ...when an improvement restarts the count: 24 flat steps later it
        // has not stopped, at the 25th it does.
        assert!(!s.step(OK, 9.0).stop);
        for _ in 0..24 {
            assert!(!s.step(OK, 9.0).stop);
        }
        assert!(s.step(OK, 9.0).stop);
    }
}
