//! Over HTTP, greedy completions equal golden.jsonl, also when 16 requests
//! run at once (greedy output must not depend on the batch).

mod common;

use common::TestServer;
use serde_json::{json, Value};

fn cases(dir: &std::path::Path) -> Vec<(Vec<u64>, Vec<u64>)> {
    std::fs::read_to_string(dir.join("golden.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let ids = |k: &str| {
                v[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect::<Vec<_>>()
            };
            let expected = if v.get("completion_token_ids_ignoring_bos_stop").is_some() {
                ids("completion_token_ids_ignoring_bos_stop")
            } else {
                ids("completion_token_ids")
            };
            (ids("prompt_token_ids"), expected)
        })
        .collect()
}

fn greedy(server: &TestServer, prompt: &[u64], n: usize) -> Vec<u64> {
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"model": server.model, "prompt": prompt, "max_tokens": n, "temperature": 0, "return_token_ids": true}),
    );
    assert_eq!(status, 200, "{body}");
    body["choices"][0]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// The golden continuation up to and including the first EOS (the server stops there).
fn until_eos(expected: &[u64]) -> Vec<u64> {
    match expected.iter().position(|&t| t == 2) {
        Some(i) => expected[..=i].to_vec(),
        None => expected.to_vec(),
    }
}

#[test]
fn greedy_stories_equal_golden_alone_and_sixteen_at_once() {
    let dir = common::stories_dir();
    let server = TestServer::start(Some(&dir), &[]);
    let cases = cases(&dir);
    for (prompt, expected) in &cases {
        assert_eq!(greedy(&server, prompt, expected.len()), until_eos(expected));
    }
    // 16 concurrent requests cycling through the cases, with different lengths in flight.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (prompt, expected) = &cases[i % cases.len()];
                let server = &server;
                s.spawn(move || (greedy(server, prompt, expected.len()), until_eos(expected)))
            })
            .collect();
        for h in handles {
            let (got, want) = h.join().unwrap();
            assert_eq!(got, want);
        }
    });
}

#[test]
fn chunked_prefill_gives_the_same_greedy_stories() {
    let dir = common::stories_dir();
    // 16-token steps: every prompt is read in several chunks beside other sequences' decodes.
    let server = TestServer::start(
        Some(&dir),
        &[("LIFELORA_ENGINE__MAX_TOKENS_PER_STEP", "16")],
    );
    let cases = cases(&dir);
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(prompt, expected)| {
                let server = &server;
                s.spawn(move || (greedy(server, prompt, expected.len()), until_eos(expected)))
            })
            .collect();
        for h in handles {
            let (got, want) = h.join().unwrap();
            assert_eq!(got, want);
        }
    });
}
