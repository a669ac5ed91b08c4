//! Stop sequences in streams on arbitrary text split at arbitrary points:
//! the matcher stops exactly when a stop string has appeared in the text so
//! far, releases the text before the earliest one (never a stop string), and
//! otherwise releases everything (with the flush).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifelora::engine::stop::{StopMatcher, StopOutcome};

fuzz_target!(|input: (Vec<String>, Vec<String>)| {
    let (stops, chunks) = input;
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).take(4).collect();
    let mut m = StopMatcher::new(stops.clone());
    let mut released = String::new();
    // The oracle: generation stops at the first chunk after which any stop
    // string appears in the text so far, cut where the earliest one begins.
    let mut so_far = String::new();
    for c in &chunks {
        so_far.push_str(c);
        let first = stops.iter().filter_map(|s| so_far.find(s.as_str())).min();
        match (m.push(c), first) {
            (StopOutcome::Continue(t), None) => released.push_str(&t),
            (StopOutcome::Stopped(t), Some(at)) => {
                released.push_str(&t);
                assert_eq!(released, so_far[..at]);
                for s in &stops {
                    assert!(!released.contains(s.as_str()), "released text contains a stop string");
                }
                return;
            }
            (outcome, first) => panic!("matcher said {outcome:?} where the text has a stop at {first:?}"),
        }
    }
    released.push_str(&m.flush());
    assert_eq!(released, so_far);
});
