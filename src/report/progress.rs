//! What `--progress` says, as a line: the phase (hashing, comparing, sending, flushing,
//! verifying), bytes done of the total, the rate over the last few seconds of bytes
//! really read or sent, the time left at that rate, the time so far, and the changes
//! found. Bytes a state vouches for count as done but not towards the rate, so a run
//! that reads nothing never shows a rate it did not reach. Pure bookkeeping; `report`
//! draws it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How far back the rate looks.
const WINDOW: Duration = Duration::from_secs(5);

/// The progress of one pass.
#[derive(Debug)]
pub struct Progress {
    phase: String,
    total: u64,
    done: u64,
    /// Bytes read or sent, the rate's measure.
    moved: u64,
    /// `(when, moved)` samples of the last [`WINDOW`].
    samples: VecDeque<(Instant, u64)>,
    differing: u64,
    started: Instant,
}

impl Progress {
    /// A pass over `total` bytes, starting now in `phase`.
    pub fn new(phase: &str, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            phase: phase.to_string(),
            total,
            done: 0,
            moved: 0,
            samples: VecDeque::from([(now, 0)]),
            differing: 0,
            started: now,
        }
    }

    /// The pass is in `phase` now.
    pub fn phase(&mut self, phase: &str) {
        phase.clone_into(&mut self.phase);
    }

    /// `bytes` more were read or sent.
    pub fn moved(&mut self, bytes: u64) {
        self.done = (self.done + bytes).min(self.total);
        self.moved += bytes;
        self.sample(Instant::now());
    }

    /// `bytes` more are done without being read (a state vouches for them).
    pub fn skipped(&mut self, bytes: u64) {
        self.done = (self.done + bytes).min(self.total);
    }

    /// Bytes done, read or vouched for.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// One more differing block was found.
    pub fn differs(&mut self) {
        self.differing += 1;
    }

    fn sample(&mut self, now: Instant) {
        self.samples.push_back((now, self.moved));
        while self.samples.len() > 2 && self.samples.get(1).is_some_and(|(t, _)| now.duration_since(*t) > WINDOW) {
            self.samples.pop_front();
        }
    }

    /// Bytes per second read or sent over the last few seconds; `None` before there is
    /// a fair measure (nothing moved, or less than a fifth of a second of it).
    pub fn rate(&self, now: Instant) -> Option<f64> {
        let (t0, m0) = *self.samples.front()?;
        let span = now.duration_since(t0).as_secs_f64();
        let moved = self.moved - m0;
        (moved > 0 && span >= 0.2).then(|| moved as f64 / span)
    }

    /// The line, short enough for a bar beside it in 80 columns:
    /// `comparing  42.0% 860M/2.0G 310M/s ETA 4s elapsed 3s 17 differ`.
    pub fn line(&self, now: Instant) -> String {
        let pct = if self.total == 0 { 100.0 } else { self.done as f64 * 100.0 / self.total as f64 };
        let (rate_text, eta) = match self.rate(now) {
            Some(r) => (format!("{}/s", short(r)), clock((self.total - self.done) as f64 / r)),
            None => ("-".to_string(), "-".to_string()),
        };
        let elapsed = clock(now.duration_since(self.started).as_secs_f64());
        format!(
            "{:<9} {pct:5.1}% {}/{} {rate_text} ETA {eta} elapsed {elapsed} {} differ",
            self.phase,
            short(self.done as f64),
            short(self.total as f64),
            self.differing
        )
    }
}

/// Bytes in binary units of one letter, as `--bwlimit` takes them, to three digits:
/// `512B`, `860M`, `64.0G`, `1.5T`.
fn short(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let (mut v, mut u) = (bytes, 0);
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    match (u, v) {
        (0, _) => format!("{v:.0}B"),
        (_, 100.0..) => format!("{v:.0}{}", UNITS[u]),
        _ => format!("{v:.1}{}", UNITS[u]),
    }
}

/// `4s`, `3m07s`, `2h05m`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..360_000 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => ">100h".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_a_state_vouches_for_make_no_rate() {
        let mut p = Progress::new("comparing", 1 << 40);
        p.skipped(1 << 40);
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(p.rate(later), None);
        let line = p.line(later);
        assert!(line.starts_with("comparing 100.0% 1.0T/1.0T - ETA -"), "{line}");
    }

    #[test]
    fn the_rate_is_of_the_last_seconds_and_the_eta_follows_it() {
        let mut p = Progress::new("sending", 100 << 20);
        let t0 = p.started;
        // 10 MiB in the first second, then nothing for 10 s: the old burst leaves the window.
        p.samples.clear();
        p.samples.push_back((t0, 0));
        p.moved = 10 << 20;
        p.done = 10 << 20;
        p.samples.push_back((t0 + Duration::from_secs(1), 10 << 20));
        let r = p.rate(t0 + Duration::from_secs(1)).unwrap();
        assert!((r - (10 << 20) as f64).abs() < 1.0, "{r}");
        p.sample(t0 + Duration::from_secs(11));
        let r = p.rate(t0 + Duration::from_secs(11)).unwrap_or(0.0);
        assert!(r < (2 << 20) as f64, "an idle stretch must pull the rate down: {r}");
        p.differs();
        let line = p.line(t0 + Duration::from_secs(11));
        assert!(line.contains("10.0%") && line.contains("elapsed 11s") && line.ends_with("1 differ"), "{line}");
    }

    #[test]
    fn the_longest_line_leaves_room_for_a_bar_in_80_columns() {
        // A 64 TiB device, a day in, with a million differing blocks.
        let mut p = Progress::new("verifying", 64 << 40);
        p.samples.clear();
        let t0 = p.started + Duration::from_secs(86_000);
        p.samples.push_back((t0, 0));
        p.moved = 1000 << 20;
        p.done = 60 << 40;
        p.samples.push_back((t0 + Duration::from_secs(1), 1000 << 20));
        p.differing = 999_999;
        let line = p.line(t0 + Duration::from_secs(1));
        // The bar takes what is left of the terminal's width ("[", "] " and the line).
        assert!(line.len() + 3 <= 80, "{} columns: {line}", line.len());
        assert_eq!(short(512.0), "512B");
        assert_eq!(short(1.5 * (1u64 << 40) as f64), "1.5T");
    }

    #[test]
    fn clocks_read_as_people_write_them() {
        assert_eq!(clock(4.4), "4s");
        assert_eq!(clock(187.0), "3m07s");
        assert_eq!(clock(7500.0), "2h05m");
        assert_eq!(clock(1e9), ">100h");
    }
}
