//! Stop sequences in streams on arbitrary text split at arbitrary points:
//! what is released never contains a stop string, and equals the text up to
//! the first stop (or all of it, with the flush, when none occurs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifelora::engine::stop::{StopMatcher, StopOutcome};

fuzz_target!(|input: (Vec<String>, Vec<String>)| {
    let (stops, chunks) = input;
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).take(4).collect();
    let full: String = chunks.concat();
    let mut m = StopMatcher::new(stops.clone());
    let mut released = String::new();
    let mut stopped = false;
    for c in &chunks {
        match m.push(c) {
            StopOutcome::Continue(t) => released.push_str(&t),
            StopOutcome::Stopped(t) => {
                released.push_str(&t);
                stopped = true;
                break;
            }
        }
    }
    let first = stops.iter().filter_map(|s| full.find(s.as_str())).min();
    match first {
        Some(at) => {
            assert!(stopped, "a stop occurs in the text but was not hit");
            assert_eq!(released, full[..at]);
        }
        None => {
            assert!(!stopped);
            released.push_str(&m.flush());
            assert_eq!(released, full);
        }
    }
    for s in &stops {
        assert!(!released.contains(s.as_str()), "released text contains a stop string");
    }
});
