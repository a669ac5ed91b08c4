//! Stop sequences over streamed text: text that could still turn into a
//! stop string is held back until it is known not to, so a stop that spans
//! token boundaries is never half-sent.

/// What one push of text released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to send; generation goes on.
    Continue(String),
    /// A stop string was hit: the text before it, and nothing after.
    Stopped(String),
}

/// Matches a request's stop strings against the growing output.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds newly decoded text and says what may be sent now.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return StopOutcome::Continue(std::mem::take(&mut self.pending));
        }
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = earliest {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(out);
        }
        let hold = self.held_suffix_len();
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Releases held text when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Longest suffix of the pending text that is a proper prefix of a stop.
    fn held_suffix_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for (start, _) in p.char_indices() {
            let suffix = &p[start..];
            if suffix.len() <= best {
                break;
            }
            if self
                .stops
                .iter()
                .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            {
                best = suffix.len();
                break; // char_indices ascend, so the first hit is the longest
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_split_across_pushes_is_held_then_cut() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), StopOutcome::Continue("hello ".into()));
        assert_eq!(m.push("N"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("Dtrailing"), StopOutcome::Stopped(String::new()));
    }

    #[test]
    fn held_text_that_diverges_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("E"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("x"), StopOutcome::Continue("Ex".into()));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(m.push("xxaxb"), StopOutcome::Stopped("xx".into()));
    }

    #[test]
    fn multibyte_text_is_never_split_inside_a_char() {
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("aé"), StopOutcome::Continue("a".into()));
        assert_eq!(m.flush(), "é");
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("abc"), StopOutcome::Continue("abc".into()));
    }

    #[test]
    fn the_stop_that_completes_first_ends_the_text_even_if_a_longer_one_began_earlier() {
        // Found by the stop_matcher fuzz target (its first oracle was wrong):
        // once "$" has appeared generation ends; "\0$\0" never gets to complete.
        let mut m = StopMatcher::new(vec!["$".into(), "\0$\0".into()]);
        assert_eq!(m.push("\0"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("#\0$"), StopOutcome::Stopped("\0#\0".into()));
    }
}
