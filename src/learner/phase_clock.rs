//! Where a learner run's time goes, phase by phase: the job's metrics
//! report it, so a run that misses its time target says which part to
//! look at (paraphrasing, training steps, drift checkpoints, writing).

use std::time::Instant;

use serde_json::{Map, Value};

/// Seconds spent per named phase, in the order phases first ran; a phase
/// entered several times accumulates.
#[derive(Debug)]
pub struct PhaseClock {
    last: Instant,
    spent: Vec<(&'static str, f64)>,
}

impl PhaseClock {
    /// Starts timing now.
    pub fn start() -> Self {
        PhaseClock { last: Instant::now(), spent: Vec::new() }
    }

    /// Books the time since the previous lap (or the start) to `phase`.
    pub fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        let seconds = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        match self.spent.iter_mut().find(|(name, _)| *name == phase) {
            Some((_, total)) => *total += seconds,
            None => self.spent.push((phase, seconds)),
        }
    }

    /// Seconds booked to `phase` so far (0 if it never ran).
    pub fn seconds(&self, phase: &str) -> f64 {
        self.spent.iter().find(|(name, _)| *name == phase).map_or(0.0, |(_, s)| *s)
    }

    /// `{phase: seconds}`, rounded to milliseconds.
    pub fn to_json(&self) -> Value {
        let map: Map<String, Value> = self.spent.iter().map(|(name, s)| (name.to_string(), Value::from((s * 1000.0).round() / 1000.0))).collect();
        Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_phase_entered_twice_accumulates_both_stays() {
        let mut clock = PhaseClock::start();
        std::thread::sleep(Duration::from_millis(5));
        clock.lap("steps");
        std::thread::sleep(Duration::from_millis(5));
        clock.lap("checkpoint");
        std::thread::sleep(Duration::from_millis(5));
        clock.lap("steps");
        assert!(clock.seconds("steps") >= 0.010, "both stays count: {}", clock.seconds("steps"));
        assert!(clock.seconds("checkpoint") >= 0.005 && clock.seconds("checkpoint") < clock.seconds("steps"));
        assert_eq!(clock.seconds("never"), 0.0);
        let json = clock.to_json();
        assert_eq!(json.as_object().map(|m| m.len()), Some(2));
        assert!(json["steps"].as_f64().is_some_and(|s| s >= 0.010));
    }
}
