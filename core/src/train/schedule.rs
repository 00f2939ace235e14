//! Learning-rate schedules as Hugging Face computes them. With `total`
//! optimizer steps, `warmup = ceil(warmup_ratio · total)`, and step `s`
//! (0-based) using:
//! - during warmup (`s < warmup`): `lr · s / warmup` (so a warmed-up run's first step uses 0);
//! - `cosine`: `lr · 0.5 · (1 + cos(π · (s − warmup) / (total − warmup)))`;
//! - `linear`: `lr · (total − s) / (total − warmup)`, down to 0;
//! - `constant`: `lr` throughout (no warmup).
//!
//! ```
//! use fusechat_core::train::schedule::{Schedule, Scheduler};
//! let s = Scheduler::new(Schedule::Cosine, 1e-3, 0.1, 100);
//! assert_eq!(s.warmup, 10);
//! assert_eq!(s.lr(0), 0.0);
//! assert!((s.lr(5) - 5e-4).abs() < 1e-15);
//! assert!((s.lr(10) - 1e-3).abs() < 1e-15);
//! assert!((s.lr(55) - 5e-4).abs() < 1e-12);
//! ```

use crate::{Error, Result};
use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Schedule> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(Error::msg(format!(
                "unknown scheduler `{other}` (use constant, linear or cosine)"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }
}

/// A schedule over a known number of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scheduler {
    pub schedule: Schedule,
    pub lr: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Scheduler {
    pub fn new(schedule: Schedule, lr: f64, warmup_ratio: f64, total: u64) -> Scheduler {
        let warmup = if schedule == Schedule::Constant {
            0
        } else {
            (warmup_ratio * total as f64).ceil() as u64
        };
        Scheduler {
            schedule,
            lr,
            warmup,
            total,
        }
    }

    /// The learning rate optimizer step `s` (0-based) uses.
    pub fn lr(&self, s: u64) -> f64 {
        if self.schedule == Schedule::Constant {
            return self.lr;
        }
        if s < self.warmup {
            return self.lr * s as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let factor = match self.schedule {
            Schedule::Cosine => {
                let progress = (s - self.warmup) as f64 / span;
                (0.5 * (1.0 + (PI * progress).cos())).max(0.0)
            }
            Schedule::Linear => (self.total.saturating_sub(s) as f64 / span).max(0.0),
            Schedule::Constant => 1.0,
        };
        self.lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_schedules_step_by_step() {
        // total 10, ratio 0.03: warmup = ceil(0.3) = 1
        let c = Scheduler::new(Schedule::Cosine, 2.0, 0.03, 10);
        assert_eq!(c.warmup, 1);
        let want: Vec<f64> = (0..10)
            .map(|s| {
                if s == 0 {
                    0.0
                } else {
                    2.0 * 0.5 * (1.0 + (PI * (s - 1) as f64 / 9.0).cos())
                }
            })
            .collect();
        for s in 0..10 {
            assert!(
                (c.lr(s) - want[s as usize]).abs() < 1e-15,
                "cosine step {s}"
            );
        }
        let l = Scheduler::new(Schedule::Linear, 2.0, 0.2, 10);
        assert_eq!(l.warmup, 2);
        assert_eq!(l.lr(1), 1.0);
        assert_eq!(l.lr(2), 2.0);
        assert_eq!(l.lr(6), 2.0 * 4.0 / 8.0);
        assert_eq!(l.lr(10), 0.0);
        let k = Scheduler::new(Schedule::Constant, 2.0, 0.5, 10);
        assert!((0..10).all(|s| k.lr(s) == 2.0));
        assert!(Schedule::parse("cosin").is_err());
    }
}
