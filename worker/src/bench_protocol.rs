//! The measurement protocol of the side-by-side benchmarks: every side warm in a
//! persistent process, the same warm-up for all, the order of the sides rotated every
//! round, rounds of a minimum length, medians with their min–max, the machine's load
//! recorded, and no ratio printed where either side's spread is beyond a stated bound.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Result, WorkerError};

/// How a side-by-side benchmark is run.
#[derive(Debug, Clone, Copy)]
pub struct Protocol {
    /// Timed rounds per side.
    pub rounds: usize,
    /// Minimum seconds of one round (a round runs whole steps until it has passed).
    pub round_s: f64,
    /// Untimed seconds each side runs before the first round.
    pub warmup_s: f64,
    /// The largest spread, `(max − min) / median` of a side's rounds, at which a ratio is
    /// still printed.
    pub max_spread: f64,
}

impl Default for Protocol {
    fn default() -> Self {
        Protocol {
            rounds: 5,
            round_s: 10.0,
            warmup_s: 10.0,
            max_spread: 0.25,
        }
    }
}

impl Protocol {
    /// Checks the settings: at least one round, finite non-negative round and warm-up
    /// lengths, a finite positive spread bound; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(WorkerError::Data(format!("benchmark protocol: {m}")));
        if self.rounds == 0 {
            return bad("--rounds must be at least 1".into());
        }
        for (flag, v) in [
            ("--round-seconds", self.round_s),
            ("--warmup-seconds", self.warmup_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{flag} must be a finite number >= 0, not {v}"));
            }
        }
        if !(self.max_spread.is_finite() && self.max_spread > 0.0) {
            return bad(format!(
                "--max-spread must be a finite number > 0, not {}",
                self.max_spread
            ));
        }
        Ok(())
    }
}

/// One side of a comparison: something that runs its unit of work (a training step, a
/// batch embedded) repeatedly.
pub trait Contender {
    /// Its name in the table.
    fn name(&self) -> &str;
    /// Runs for at least `seconds`, untimed.
    fn warm(&mut self, seconds: f64) -> Result<()>;
    /// Runs whole units until at least `seconds` have passed; returns (units, seconds).
    fn round(&mut self, seconds: f64) -> Result<(u64, f64)>;
}

/// Runs `f` (one unit of work) until at least `seconds` have passed; returns (units,
/// seconds). For contenders that run in this process.
pub fn run_for(seconds: f64, mut f: impl FnMut()) -> (u64, f64) {
    let t = Instant::now();
    let mut n = 0;
    loop {
        f();
        n += 1;
        let dt = t.elapsed().as_secs_f64();
        if dt >= seconds {
            return (n, dt);
        }
    }
}

/// A side's rates (units per second), one per round, and their summary.
#[derive(Debug, Clone, Serialize)]
pub struct Rates {
    /// The side's name.
    pub name: String,
    /// Units/s of each round, in round order.
    pub rounds: Vec<f64>,
    /// Their median.
    pub median: f64,
    /// Their minimum.
    pub min: f64,
    /// Their maximum.
    pub max: f64,
}

impl Rates {
    /// Summarises `rounds`.
    pub fn new(name: &str, rounds: Vec<f64>) -> Rates {
        let mut s = rounds.clone();
        s.sort_by(f64::total_cmp);
        let median = match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
        };
        Rates {
            name: name.to_string(),
            median,
            min: s.first().copied().unwrap_or(f64::NAN),
            max: s.last().copied().unwrap_or(f64::NAN),
            rounds,
        }
    }

    /// `(max − min) / median`.
    pub fn spread(&self) -> f64 {
        (self.max - self.min) / self.median
    }
}

/// `a.median / b.median`, or why it is not given: a spread of either side beyond `bound`.
pub fn ratio(a: &Rates, b: &Rates, bound: f64) -> std::result::Result<f64, String> {
    for r in [a, b] {
        let s = r.spread();
        if s.is_nan() || s > bound {
            return Err(format!(
                "no ratio: {} spread {:.0}% > {:.0}%",
                r.name,
                100.0 * s,
                100.0 * bound
            ));
        }
    }
    Ok(a.median / b.median)
}

/// The machine's 1-, 5- and 15-minute load averages (`/proc/loadavg`), or `None`.
pub fn load_average() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// What one protocol run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Each side's rates, in the order given.
    pub sides: Vec<Rates>,
    /// Load averages at the start and at the end.
    pub load_before: Option<[f64; 3]>,
    /// See `load_before`.
    pub load_after: Option<[f64; 3]>,
}

/// The order of the sides in round `r`: rotated by `r`, and reversed every other round,
/// so that with two sides the order alternates and with more each goes first and last.
pub fn round_order(sides: usize, r: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..sides).map(|i| (i + r / 2) % sides).collect();
    if r % 2 == 1 {
        o.reverse();
    }
    o
}

/// Warms every side, then runs `protocol.rounds` rounds in [`round_order`], printing
/// each round's rates to stderr.
pub fn measure(protocol: &Protocol, sides: &mut [Box<dyn Contender + '_>]) -> Result<Measured> {
    protocol.validate()?;
    let load_before = load_average();
    for s in sides.iter_mut() {
        s.warm(protocol.warmup_s)?;
    }
    let mut rates = vec![Vec::new(); sides.len()];
    for r in 0..protocol.rounds {
        let mut line = format!("  round {r}:");
        for i in round_order(sides.len(), r) {
            let (n, dt) = sides[i].round(protocol.round_s)?;
            let rate = n as f64 / dt;
            rates[i].push(rate);
            line += &format!(" {} {rate:.3}/s ({n} in {dt:.1} s);", sides[i].name());
        }
        eprintln!("{line}");
    }
    Ok(Measured {
        sides: sides
            .iter()
            .zip(rates)
            .map(|(s, r)| Rates::new(s.name(), r))
            .collect(),
        load_before,
        load_after: load_average(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_spreads_and_refused_ratios() {
        let a = Rates::new("a", vec![10.0, 12.0, 11.0, 9.0]);
        assert_eq!(a.median, 10.5);
        assert_eq!((a.min, a.max), (9.0, 12.0));
        let b = Rates::new("b", vec![5.0, 5.0, 5.5]);
        assert_eq!(b.median, 5.0);
        assert!((ratio(&a, &b, 0.3).unwrap() - 2.1).abs() < 1e-12);
        let e = ratio(&a, &b, 0.2).unwrap_err();
        assert!(e.contains("a spread 29%"), "{e}");
        let nan = Rates::new("n", vec![]);
        assert!(ratio(&a, &nan, 1.0).is_err());
    }

    #[test]
    fn bad_settings_are_errors_naming_the_flag() {
        assert!(Protocol::default().validate().is_ok());
        for (p, flag) in [
            (
                Protocol {
                    rounds: 0,
                    ..Protocol::default()
                },
                "--rounds",
            ),
            (
                Protocol {
                    round_s: f64::NAN,
                    ..Protocol::default()
                },
                "--round-seconds",
            ),
            (
                Protocol {
                    warmup_s: -1.0,
                    ..Protocol::default()
                },
                "--warmup-seconds",
            ),
            (
                Protocol {
                    max_spread: 0.0,
                    ..Protocol::default()
                },
                "--max-spread",
            ),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    #[test]
    fn every_side_leads_and_two_sides_alternate() {
        assert_eq!(round_order(2, 0), vec![0, 1]);
        assert_eq!(round_order(2, 1), vec![1, 0]);
        assert_eq!(round_order(2, 2), vec![1, 0]);
        assert_eq!(round_order(2, 3), vec![0, 1]);
        let firsts: std::collections::BTreeSet<usize> =
            (0..6).map(|r| round_order(3, r)[0]).collect();
        assert_eq!(firsts.len(), 3);
    }

    struct Fixed(&'static str, u64);
    impl Contender for Fixed {
        fn name(&self) -> &str {
            self.0
        }
        fn warm(&mut self, _: f64) -> Result<()> {
            Ok(())
        }
        fn round(&mut self, s: f64) -> Result<(u64, f64)> {
            Ok((self.1, s))
        }
    }

    #[test]
    fn measure_records_every_round_of_every_side() {
        let p = Protocol {
            rounds: 3,
            round_s: 2.0,
            warmup_s: 0.0,
            max_spread: 0.1,
        };
        let mut sides: Vec<Box<dyn Contender>> =
            vec![Box::new(Fixed("x", 4)), Box::new(Fixed("y", 2))];
        let m = measure(&p, &mut sides).unwrap();
        assert_eq!(m.sides[0].rounds, vec![2.0; 3]);
        assert_eq!(m.sides[1].median, 1.0);
        assert_eq!(ratio(&m.sides[0], &m.sides[1], p.max_spread).unwrap(), 2.0);
    }
}
