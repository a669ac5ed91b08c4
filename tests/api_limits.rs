//! Holding up under abuse, over HTTP on the built-in model: per-request
//! limits answered 400 by name, per-tenant quotas answered 429 with
//! Retry-After while other tenants keep being served, slow clients timed
//! out, every response carrying an `x-request-id`, and SIGTERM draining
//! running requests (new ones get 503) before a clean exit.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{assert_openai_error, response_json, TestServer};
use serde_json::{json, Value};

#[test]
fn every_response_carries_a_request_id_echoing_a_sane_one() {
    let s = TestServer::start(None, &[]);
    let r = ureq::get(&format!("{}/v1/models", s.base)).set("x-request-id", "trace-42").call().unwrap();
    assert_eq!(r.header("x-request-id"), Some("trace-42"));
    let fresh = ureq::get(&format!("{}/v1/models", s.base)).call().unwrap();
    let id = fresh.header("x-request-id").unwrap().to_string();
    assert!(id.starts_with("req-") && id.len() > 20, "{id}");
    // Errors and unknown routes too; an oversized or unprintable id is replaced.
    match ureq::get(&format!("{}/v1/nowhere", s.base)).set("x-request-id", &"x".repeat(500)).call() {
        Err(ureq::Error::Status(404, r)) => assert!(r.header("x-request-id").unwrap().starts_with("req-")),
        other => panic!("{other:?}"),
    }
    match ureq::post(&format!("{}/v1/completions", s.base)).set("x-request-id", "bad").send_string("{") {
        Err(ureq::Error::Status(400, r)) => assert_eq!(r.header("x-request-id"), Some("bad")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn request_limits_are_settings_refused_by_name() {
    let s = TestServer::start(
        None,
        &[
            ("LIFELORA_LIMITS__MAX_PROMPT_TOKENS", "16"),
            ("LIFELORA_LIMITS__MAX_PROMPTS", "2"),
            ("LIFELORA_LIMITS__MAX_MESSAGES", "3"),
            ("LIFELORA_LIMITS__MAX_STOP_SEQUENCES", "2"),
            ("LIFELORA_LIMITS__MAX_STOP_BYTES", "8"),
        ],
    );
    let m = s.model.clone();
    let msgs = |n: usize| (0..n).map(|_| json!({"role": "user", "content": "hi"})).collect::<Vec<_>>();
    for (path, body, param) in [
        ("/v1/completions", json!({"model": m, "prompt": "a".repeat(40)}), "prompt"),
        ("/v1/completions", json!({"model": m, "prompt": ["a", "b", "c"]}), "prompt"),
        ("/v1/chat/completions", json!({"model": m, "messages": msgs(4)}), "messages"),
        ("/v1/chat/completions", json!({"model": m, "messages": [{"role": "user", "content": "b".repeat(40)}]}), "messages"),
        ("/v1/completions", json!({"model": m, "prompt": "a", "stop": ["x", "y", "z"]}), "stop"),
        ("/v1/completions", json!({"model": m, "prompt": "a", "stop": "longer than eight"}), "stop"),
    ] {
        let (status, v) = s.post(path, &body);
        assert_openai_error(status, &v, 400);
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // Within the limits all is well.
    let (status, v) = s.post("/v1/completions", &json!({"model": m, "prompt": ["a", "b"], "max_tokens": 2, "stop": ["x", "yy"]}));
    assert_eq!(status, 200, "{v}");
}

const ADMIN: &str = "quota-admin-key-for-tests-0123456789abcdef";

fn tenant(s: &TestServer, name: &str) -> String {
    let (status, v) = response_json(
        ureq::post(&format!("{}/v1/tenants", s.base)).set("authorization", &format!("Bearer {ADMIN}")).send_json(json!({"name": name})),
    );
    assert_eq!(status, 201, "{v}");
    v["api_key"].as_str().unwrap().to_string()
}

fn complete(s: &TestServer, key: &str, max_tokens: u32) -> Result<ureq::Response, ureq::Error> {
    ureq::post(&format!("{}/v1/completions", s.base))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(json!({"model": s.model, "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": true}))
}

fn expect_429(r: Result<ureq::Response, ureq::Error>) -> (u64, Value) {
    match r {
        Err(ureq::Error::Status(429, r)) => {
            let wait: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
            (wait, r.into_json().unwrap())
        }
        Ok(r) => panic!("expected 429, got {}", r.status()),
        Err(e) => panic!("expected 429, got {e}"),
    }
}

#[test]
fn a_tenant_over_its_quotas_gets_429_with_retry_after_while_others_are_served() {
    let s = TestServer::start(None, &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN), ("LIFELORA_LIMITS__MAX_CONCURRENT_PER_TENANT", "1")]);
    let (acme, globex) = (tenant(&s, "acme"), tenant(&s, "globex"));
    // A long stream holds acme's one slot.
    let stream = ureq::post(&format!("{}/v1/completions", s.base))
        .set("authorization", &format!("Bearer {acme}"))
        .send_json(json!({"model": s.model, "prompt": "hello", "max_tokens": 400, "ignore_eos": true, "stream": true}))
        .unwrap();
    let mut reader = stream.into_reader();
    let mut first = [0u8; 16];
    reader.read_exact(&mut first).unwrap();
    let (wait, body) = expect_429(complete(&s, &acme, 2));
    assert_eq!((wait, body["error"]["code"].as_str()), (1, Some("rate_limit_exceeded")), "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(complete(&s, &globex, 2).unwrap().status(), 200, "another tenant keeps its share");
    // The slot comes back when the stream ends.
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.ends_with("data: [DONE]\n\n"));
    let started = Instant::now();
    loop {
        match complete(&s, &acme, 2) {
            Ok(r) => break assert_eq!(r.status(), 200),
            Err(ureq::Error::Status(429, _)) if started.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn tokens_per_minute_are_counted_per_tenant() {
    let s = TestServer::start(None, &[("LIFELORA_AUTH__ADMIN_KEY", ADMIN), ("LIFELORA_LIMITS__TOKENS_PER_MINUTE_PER_TENANT", "40")]);
    let (acme, globex) = (tenant(&s, "acme"), tenant(&s, "globex"));
    assert_eq!(complete(&s, &acme, 40).unwrap().status(), 200);
    let (wait, body) = expect_429(complete(&s, &acme, 1));
    assert!((2..=61).contains(&wait), "Retry-After {wait}: {body}");
    assert_eq!(complete(&s, &globex, 4).unwrap().status(), 200);
}

#[test]
fn a_client_that_trickles_its_body_is_timed_out() {
    let s = TestServer::start(None, &[("LIFELORA_LIMITS__CLIENT_TIMEOUT_SECS", "1")]);
    let addr = s.base.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(conn, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\"").unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(started.elapsed() < Duration::from_secs(8), "no timeout");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // The server is fine.
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn idle_connections_are_closed() {
    let s = TestServer::start(None, &[("LIFELORA_LIMITS__CLIENT_TIMEOUT_SECS", "1")]);
    let addr = s.base.trim_start_matches("http://");
    // A connection that never sends a request, and one that goes quiet
    // after its first request, are both closed by the server.
    for send_first in [false, true] {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if send_first {
            write!(conn, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        }
        let started = Instant::now();
        let mut answer = Vec::new();
        let read = conn.read_to_end(&mut answer);
        assert!(read.is_ok(), "the server never closed the connection: {read:?}");
        // `limits.client_timeout_secs` (1 s here), not actix's default 5 s.
        assert!(started.elapsed() < Duration::from_secs(4), "closed only after {:?}", started.elapsed());
        let text = String::from_utf8_lossy(&answer);
        if send_first {
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        }
    }
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn sigterm_lets_running_requests_finish_refuses_new_ones_and_exits_zero() {
    let mut s = TestServer::start(None, &[("LIFELORA_LIMITS__SHUTDOWN_GRACE_SECS", "20")]);
    let base = s.base.clone();
    let model = s.model.clone();
    let running = std::thread::spawn(move || {
        let r = ureq::post(&format!("{base}/v1/completions"))
            .send_json(json!({"model": model, "prompt": "hello", "max_tokens": 300, "ignore_eos": true, "stream": true,
                              "stream_options": {"include_usage": true}}))
            .unwrap();
        let mut body = String::new();
        r.into_reader().read_to_string(&mut body).unwrap();
        body
    });
    // Wait until it runs.
    let started = Instant::now();
    while s.metric("lifelora_running_sequences") < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    s.terminate();
    std::thread::sleep(Duration::from_millis(200));
    match ureq::post(&format!("{}/v1/completions", s.base)).send_json(json!({"model": s.model, "prompt": "x", "max_tokens": 1})) {
        Err(ureq::Error::Status(503, r)) => {
            assert!(r.header("retry-after").is_some());
            let v: Value = r.into_json().unwrap();
            assert_eq!(v["error"]["code"], "shutting_down");
        }
        Err(ureq::Error::Transport(_)) => {} // already closed: also a refusal
        Ok(r) => panic!("a new request was served during shutdown: {}", r.status()),
        Err(e) => panic!("{e}"),
    }
    let body = running.join().unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "the running stream was cut: {}", &body[body.len().saturating_sub(200)..]);
    // Every token arrived (the usage chunk counts them; the demo model's bytes are not all text).
    assert!(body.contains("\"completion_tokens\":300"), "the stream was cut short");
    let status = s.wait_exit(Duration::from_secs(20)).expect("the server did not exit");
    assert!(status.success(), "{status:?}");
}
