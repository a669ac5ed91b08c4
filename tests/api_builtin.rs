//! The built-in default over HTTP: starts with no model, says it is a demo,
//! refuses with 429 when its queue is full, and frees a stream whose client
//! disconnects.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{assert_openai_error, TestServer};
use serde_json::json;

#[test]
fn the_builtin_model_serves_and_says_it_is_a_demo() {
    let s = TestServer::start(None, &[]);
    let (_, body) = s.get("/v1/models");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["data"][0]["description"]
        .as_str()
        .unwrap()
        .contains("lifelora serve --model"));
    let (status, v) = s.post("/v1/chat/completions", &json!({"model": s.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn a_full_queue_answers_429_with_an_openai_error() {
    let s = TestServer::start(
        None,
        &[
            ("LIFELORA_ENGINE__MAX_RUNNING", "1"),
            ("LIFELORA_ENGINE__MAX_WAITING", "1"),
        ],
    );
    let results: Vec<(u16, serde_json::Value)> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let s = &s;
                scope.spawn(move || s.post("/v1/completions", &json!({"model": s.model, "prompt": "x", "max_tokens": 1500, "ignore_eos": true})))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(
        !refused.is_empty(),
        "no 429 among {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    for (status, body) in &refused {
        assert_openai_error(*status, body, 429);
    }
    assert!(results.iter().all(|r| r.0 == 200 || r.0 == 429));
}

#[test]
fn a_disconnected_stream_frees_its_sequence() {
    let s = TestServer::start(None, &[]);
    let resp = ureq::post(&format!("{}/v1/completions", s.base))
        .send_json(json!({"model": s.model, "prompt": "x", "max_tokens": 2000, "ignore_eos": true, "stream": true}))
        .unwrap();
    let mut reader = resp.into_reader();
    let mut buf = [0u8; 64];
    assert!(reader.read(&mut buf).unwrap() > 0);
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.metric("lifelora_running_sequences") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "sequence still running after disconnect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        s.metric("lifelora_generated_tokens_total") < 1900.0,
        "the abandoned stream ran to completion"
    );
}

#[test]
fn sequence_gauges_return_to_zero_when_the_engine_goes_idle() {
    let s = TestServer::start(None, &[]);
    let (status, _) = s.post("/v1/completions", &serde_json::json!({"model": s.model, "prompt": "hi", "max_tokens": 4}));
    assert_eq!(status, 200);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(s.metric("lifelora_running_sequences"), 0.0);
    assert_eq!(s.metric("lifelora_waiting_sequences"), 0.0);
}
