//! Learning-rate schedules, evaluated at every step.

use std::f64::consts::PI;
use std::str::FromStr;

use crate::{Error, Result};

/// How the learning rate moves during training. Steps count optimizer updates from 0;
/// `total_steps` is epochs × batches per epoch.
///
/// # Examples
/// ```
/// use candle_functional::train::LrSchedule;
/// let s = LrSchedule::Step { every_epochs: 10, gamma: 0.1 };
/// assert_eq!(s.learning_rate(1e-3, 0, 0, 100), 1e-3);
/// assert!((s.learning_rate(1e-3, 10, 1000, 2000) - 1e-4).abs() < 1e-12);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum LrSchedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Multiplied by `gamma` every `every_epochs` epochs.
    Step {
        /// Epochs between decays.
        every_epochs: usize,
        /// Factor applied at each decay.
        gamma: f64,
    },
    /// Cosine decay from the base rate to `min_fraction` of it over the run, after a linear
    /// warm-up of `warmup_steps`.
    Cosine {
        /// Final rate as a fraction of the base rate.
        min_fraction: f64,
        /// Steps of linear warm-up from 0.
        warmup_steps: usize,
    },
    /// Smith's one-cycle policy (PyTorch's `OneCycleLR`, cosine annealing): from
    /// `base / div_factor` up to `base` over `pct_start` of the run, then down to
    /// `base / (div_factor · final_div_factor)`.
    OneCycle {
        /// Fraction of the run spent warming up.
        pct_start: f64,
        /// Initial rate = base / div_factor.
        div_factor: f64,
        /// Final rate = initial / final_div_factor.
        final_div_factor: f64,
    },
}

fn cosine(from: f64, to: f64, progress: f64) -> f64 {
    to + (from - to) * 0.5 * (1.0 + (PI * progress.clamp(0.0, 1.0)).cos())
}

impl LrSchedule {
    /// The default one-cycle policy (PyTorch's defaults: 30% warm-up, /25, /1e4).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::LrSchedule;
    /// let s = LrSchedule::one_cycle();
    /// assert!((s.learning_rate(0.1, 0, 0, 100) - 0.004).abs() < 1e-12);
    /// assert!((s.learning_rate(0.1, 0, 30, 100) - 0.1).abs() < 1e-3);
    /// ```
    pub fn one_cycle() -> Self {
        LrSchedule::OneCycle {
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
        }
    }

    /// Checks the schedule's settings: a step schedule decays every 1 or more epochs by a
    /// positive finite `gamma`; a cosine schedule ends at a `min_fraction` in `[0, 1]`; a
    /// one-cycle schedule warms up over a `pct_start` in `(0, 1)` and divides by positive
    /// finite factors. [`Trainer::fit`](crate::train::Trainer::fit) refuses a schedule that
    /// fails this before its first step (a NaN factor would otherwise write NaN into every
    /// weight).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::LrSchedule;
    /// assert!(LrSchedule::one_cycle().validate().is_ok());
    /// assert!(LrSchedule::Step { every_epochs: 5, gamma: f64::NAN }.validate().is_err());
    /// let cycle = LrSchedule::OneCycle { pct_start: 0.3, div_factor: 0.0, final_div_factor: 1e4 };
    /// assert!(cycle.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let problem = match *self {
            LrSchedule::Constant => None,
            LrSchedule::Step {
                every_epochs,
                gamma,
            } => (every_epochs == 0 || !positive(gamma))
                .then_some("every_epochs must be at least 1 and gamma positive and finite"),
            LrSchedule::Cosine { min_fraction, .. } => {
                (!(0.0..=1.0).contains(&min_fraction)).then_some("min_fraction must be in [0, 1]")
            }
            LrSchedule::OneCycle {
                pct_start,
                div_factor,
                final_div_factor,
            } => (!(pct_start > 0.0
                && pct_start < 1.0
                && positive(div_factor)
                && positive(final_div_factor)))
            .then_some(
                "pct_start must be in (0, 1), div_factor and final_div_factor positive and finite",
            ),
        };
        match problem {
            Some(problem) => Err(Error::InvalidArgument(format!(
                "learning-rate schedule {self:?}: {problem}"
            ))),
            None => Ok(()),
        }
    }

    /// The rate for a step (and the epoch it belongs to) of a run of `total_steps`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::LrSchedule;
    /// let c = LrSchedule::Cosine { min_fraction: 0.0, warmup_steps: 0 };
    /// assert!((c.learning_rate(1.0, 0, 50, 100) - 0.5).abs() < 1e-12);
    /// ```
    pub fn learning_rate(&self, base: f64, epoch: usize, step: usize, total_steps: usize) -> f64 {
        let total = total_steps.max(1) as f64;
        let step_f = step as f64;
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step {
                every_epochs,
                gamma,
            } => base * gamma.powi((epoch / every_epochs.max(1)) as i32),
            LrSchedule::Cosine {
                min_fraction,
                warmup_steps,
            } => {
                if step < warmup_steps {
                    base * (step_f + 1.0) / warmup_steps as f64
                } else {
                    let span = (total - warmup_steps as f64).max(1.0);
                    cosine(
                        base,
                        base * min_fraction,
                        (step_f - warmup_steps as f64) / span,
                    )
                }
            }
            LrSchedule::OneCycle {
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                let initial = base / div_factor;
                let last = initial / final_div_factor;
                let up = (pct_start * total - 1.0).max(1.0);
                if step_f <= up {
                    cosine(initial, base, step_f / up)
                } else {
                    cosine(base, last, (step_f - up) / (total - 1.0 - up).max(1.0))
                }
            }
        }
    }
}

/// Parses `constant`, `step` (÷10 every 10 epochs), `step:EVERY:GAMMA`, `cosine`,
/// `cosine:WARMUP_STEPS`, `one-cycle`.
///
/// # Examples
/// ```
/// use candle_functional::train::LrSchedule;
/// assert_eq!("constant".parse::<LrSchedule>()?, LrSchedule::Constant);
/// assert_eq!("step:5:0.5".parse::<LrSchedule>()?, LrSchedule::Step { every_epochs: 5, gamma: 0.5 });
/// assert!("sometimes".parse::<LrSchedule>().is_err());
/// assert!("step:0:0.5".parse::<LrSchedule>().is_err());
/// assert!("cosine:-3".parse::<LrSchedule>().is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
impl FromStr for LrSchedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || {
            Error::InvalidArgument(format!(
                "unknown schedule `{s}` (constant, step[:EVERY:GAMMA], cosine[:WARMUP], one-cycle)"
            ))
        };
        let count = |i: usize| -> Result<usize> { parts[i].parse::<usize>().map_err(|_| bad()) };
        Ok(match (parts[0], parts.len()) {
            ("constant", 1) => LrSchedule::Constant,
            ("step", 1) => LrSchedule::Step {
                every_epochs: 10,
                gamma: 0.1,
            },
            ("step", 3) => {
                let every_epochs = count(1)?;
                let gamma = parts[2].parse::<f64>().map_err(|_| bad())?;
                if every_epochs == 0 || !(gamma.is_finite() && gamma > 0.0) {
                    return Err(Error::InvalidArgument(format!(
                        "schedule `{s}`: EVERY must be at least 1 and GAMMA positive and finite"
                    )));
                }
                LrSchedule::Step {
                    every_epochs,
                    gamma,
                }
            }
            ("cosine", 1) => LrSchedule::Cosine {
                min_fraction: 0.0,
                warmup_steps: 0,
            },
            ("cosine", 2) => LrSchedule::Cosine {
                min_fraction: 0.0,
                warmup_steps: count(1)?,
            },
            ("one-cycle" | "onecycle", 1) => LrSchedule::one_cycle(),
            _ => return Err(bad()),
        })
    }
}
