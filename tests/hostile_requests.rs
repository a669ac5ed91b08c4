//! Generation requests as a hostile tenant sends them: a small request
//! asking for a response of gigabytes, a prompt of megabytes, and a flood
//! of sequences that would crowd out every other tenant. Each is refused
//! up front or held to its share, at the default settings.

mod common;

use std::time::{Duration, Instant};

use common::{rss_kib, TestServer};
use serde_json::{json, Value};

#[test]
fn a_request_for_too_many_logprobs_is_refused_up_front_by_field() {
    let s = TestServer::start(None, &[]);
    let m = s.model.clone();
    // 64 prompts of 500 ids, echoed with 20 alternatives each, 4 choices:
    // a 93 KiB request that asks for 2.7 million entries.
    let prompts: Vec<Vec<u32>> = (0..64).map(|p| (0..500).map(|i| ((p * 7 + i) % 250) as u32 + 3).collect()).collect();
    let started = Instant::now();
    let (status, v) = s.post("/v1/completions", &json!({"model": m, "prompt": prompts, "echo": true, "logprobs": 20, "n": 4, "max_tokens": 1}));
    common::assert_openai_error(status, &v, 400);
    assert_eq!(v["error"]["param"], "logprobs", "{v}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"model": m, "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 20, "max_tokens": 2000, "n": 16}),
    );
    common::assert_openai_error(status, &v, 400);
    assert_eq!(v["error"]["param"], "logprobs", "{v}");
    // Within the limit all is well.
    let (status, v) = s.post("/v1/completions", &json!({"model": m, "prompt": prompts[0], "echo": true, "logprobs": 5, "max_tokens": 4}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), 504);
}

#[test]
fn one_tenant_may_fill_at_most_half_of_the_waiting_queue() {
    let s = TestServer::start(None, &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN), ("LIFELORA_ENGINE__MAX_WAITING", "64"), ("LIFELORA_ENGINE__MAX_RUNNING", "4")]);
    let (flood, quiet) = (tenant_key(&s, "flood"), tenant_key(&s, "quiet"));
    let post = |key: &str, body: Value, timeout: u64| {
        common::response_json(
            ureq::post(&format!("{}/v1/completions", s.base))
                .set("authorization", &format!("Bearer {key}"))
                .timeout(Duration::from_secs(timeout))
                .send_json(body),
        )
    };
    // More than half of the queue in one request can never be queued.
    let (status, v) = post(&flood, json!({"model": s.model, "prompt": vec![[1, 2]; 4], "n": 9, "max_tokens": 1}), 30);
    common::assert_openai_error(status, &v, 400);
    std::thread::scope(|scope| {
        // Half of it, held: 4 prompts × n 8 (4 run, 28 wait), generating for a long time.
        let (base, model, f) = (s.base.clone(), s.model.clone(), flood.clone());
        scope.spawn(move || {
            let _ = ureq::post(&format!("{base}/v1/completions"))
                .set("authorization", &format!("Bearer {f}"))
                .timeout(Duration::from_secs(4))
                .send_json(json!({"model": model, "prompt": vec![[1, 2]; 4], "n": 8, "max_tokens": 2000, "ignore_eos": true}));
        });
        let started = Instant::now();
        while s.metric("lifelora_waiting_sequences") < 28.0 {
            assert!(started.elapsed() < Duration::from_secs(3));
            std::thread::sleep(Duration::from_millis(10));
        }
        let (status, v) = post(&flood, json!({"model": s.model, "prompt": vec![[1, 2]; 4], "n": 8, "max_tokens": 1}), 30);
        assert_eq!(status, 429, "{v}");
        assert_eq!(v["error"]["code"], "tenant_queue_full", "{v}");
        let (status, v) = post(&quiet, json!({"model": s.model, "prompt": [1, 2], "max_tokens": 2}), 30);
        assert_eq!(status, 200, "the other half is the others': {v}");
    });
}

#[test]
fn a_prompt_of_megabytes_is_refused_before_it_is_tokenized() {
    let s = TestServer::start(None, &[("LIFELORA_SERVER__MAX_BODY_BYTES", "16777216")]);
    let text = "lorem ipsum dolor sit amet ".repeat(4 << 20 >> 4).chars().take(4 << 20).collect::<String>();
    for (path, body, param) in [
        ("/v1/completions", json!({"model": s.model, "prompt": text, "max_tokens": 1}), "prompt"),
        ("/v1/chat/completions", json!({"model": s.model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}), "messages"),
    ] {
        let (_, peak_before) = rss_kib(s.pid());
        let started = Instant::now();
        let (status, v) = s.post(path, &body);
        let took = started.elapsed();
        let (_, peak_after) = rss_kib(s.pid());
        eprintln!("{path}: a 4 MiB prompt answered {status} in {:.0} ms, peak RSS growth {:.1} MiB", took.as_secs_f64() * 1e3, peak_after.saturating_sub(peak_before) as f64 / 1024.0);
        common::assert_openai_error(status, &v, 400);
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        assert_eq!(v["error"]["param"], param);
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert!(peak_after.saturating_sub(peak_before) < 128 * 1024, "the server grew {} KiB", peak_after.saturating_sub(peak_before));
    }
}

const ADMIN: &str = "fair-share-admin-key-0123456789abcdef0123";

fn tenant_key(s: &TestServer, name: &str) -> String {
    let r = ureq::post(&format!("{}/v1/tenants", s.base)).set("authorization", &format!("Bearer {ADMIN}")).send_json(json!({"name": name})).unwrap();
    r.into_json::<Value>().unwrap()["api_key"].as_str().unwrap().to_string()
}

/// Seconds to the first content chunk of a streamed completion.
fn time_to_first_token(s: &TestServer, key: &str, model: &str) -> f64 {
    use std::io::BufRead;
    let started = Instant::now();
    let r = ureq::post(&format!("{}/v1/completions", s.base))
        .set("authorization", &format!("Bearer {key}"))
        .timeout(Duration::from_secs(120))
        .send_json(json!({"model": model, "prompt": [1, 400, 401], "max_tokens": 8, "stream": true}))
        .unwrap();
    let mut first = None;
    for line in std::io::BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        if first.is_none() && line.starts_with("data: {") {
            first = Some(started.elapsed().as_secs_f64());
        }
    }
    first.expect("no chunk")
}

#[test]
fn a_quiet_tenant_is_served_promptly_while_another_keeps_128_sequences_in_flight() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN)]);
    let (flood, quiet) = (tenant_key(&s, "flood"), tenant_key(&s, "quiet"));
    let model = s.model.clone();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let ttft = std::thread::scope(|scope| {
        // 8 streams of n = 16, each renewed as soon as it ends: 128 in flight.
        for _ in 0..8 {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let r = ureq::post(&format!("{}/v1/completions", s.base))
                        .set("authorization", &format!("Bearer {flood}"))
                        .timeout(Duration::from_secs(300))
                        .send_json(json!({"model": model, "prompt": [1, 300, 301], "max_tokens": 400, "n": 16, "ignore_eos": true, "stream": true}));
                    if let Ok(r) = r {
                        let _ = std::io::copy(&mut r.into_reader(), &mut std::io::sink());
                    }
                }
            });
        }
        // Wait until the flood holds every running slot.
        let started = Instant::now();
        while s.metric("lifelora_running_sequences") < 64.0 {
            assert!(started.elapsed() < Duration::from_secs(60), "the flood never filled the batch");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut ttft: Vec<f64> = (0..30).map(|_| time_to_first_token(&s, &quiet, &model)).collect();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        ttft.sort_by(f64::total_cmp);
        ttft
    });
    let p = |q: f64| ttft[((ttft.len() as f64 * q) as usize).min(ttft.len() - 1)];
    eprintln!("quiet tenant's TTFT beside 128 flood sequences: p50 {:.3} s, p99 {:.3} s; {} preemptions", p(0.5), p(0.99), s.metric("lifelora_preemptions_total"));
    assert!(s.metric("lifelora_preemptions_total") >= 1.0, "the flood was never made to yield");
    assert!(p(0.99) < 2.0, "p99 TTFT {:.3} s", p(0.99));
}
