//! Hot swap under load and crashes during upload, black-box over HTTP on
//! stories260K with PEFT-made fixtures.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{response_json, TestServer};
use serde_json::{json, Value};

const BOUNDARY: &str = "lifelora-durability-boundary";

fn multipart(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, data) in parts {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn upload(base: &str, query: &str, parts: &[(&str, &[u8])]) -> (u16, Value) {
    response_json(
        ureq::post(&format!("{base}/v1/adapters{query}"))
            .set("content-type", &format!("multipart/form-data; boundary={BOUNDARY}"))
            .send_bytes(&multipart(parts)),
    )
}

fn fixture(name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = common::fixtures_dir().join("adapters").join(name);
    (std::fs::read(dir.join("adapter_config.json")).unwrap(), std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
}

fn completion(base: &str, model: &str, prompt: &[u32], stream: bool) -> Result<String, String> {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": true, "stream": stream});
    let resp = ureq::post(&format!("{base}/v1/completions")).timeout(Duration::from_secs(120)).send_json(body).map_err(|e| e.to_string())?;
    if !stream {
        let v: Value = resp.into_json().map_err(|e| e.to_string())?;
        return Ok(v["choices"][0]["text"].as_str().unwrap_or_default().to_string());
    }
    let mut text = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(resp.into_reader())) {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            return Ok(text);
        }
        let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if v.get("error").is_some() {
            return Err(data.to_string());
        }
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    Err("stream ended without [DONE]".into())
}

#[test]
fn promote_and_rollback_under_load_fail_nothing_and_never_mix_versions() {
    let dir = common::stories_dir();
    let s = TestServer::start(Some(&dir), &[]);
    let (c1, w1) = fixture("q_v_r8");
    let (c2, w2) = fixture("all_linear_r4");
    assert_eq!(upload(&s.base, "", &[("name", b"bot"), ("config", &c1), ("weights", &w1)]).0, 201);
    assert_eq!(upload(&s.base, "?promote=false", &[("name", b"bot"), ("config", &c2), ("weights", &w2)]).0, 201);
    let prompts: Vec<Vec<u32>> = vec![vec![1, 482, 82, 508], vec![1, 300, 301], vec![1, 77, 400, 90, 12]];
    // Each prompt's answer under each version, pinned, one at a time.
    let expected: Vec<[String; 2]> = prompts
        .iter()
        .map(|p| [completion(&s.base, "bot@v1", p, false).unwrap(), completion(&s.base, "bot@v2", p, false).unwrap()])
        .collect();
    assert!(expected.iter().all(|[a, b]| a != b), "the two versions must answer differently for the test to mean anything");

    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::sync::Mutex::new([0usize; 2]);
    std::thread::scope(|scope| {
        for client in 0..8 {
            let (s, prompts, expected, stop, seen) = (&s, &prompts, &expected, &stop, &seen);
            scope.spawn(move || {
                let mut i = client;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let k = i % prompts.len();
                    let got = completion(&s.base, "bot", &prompts[k], i % 2 == 0).expect("no request may fail during a swap");
                    let which = expected[k].iter().position(|e| *e == got);
                    let which = which.unwrap_or_else(|| panic!("answer matches neither version (a mix?): {got:?}"));
                    seen.lock().unwrap()[which] += 1;
                    i += 1;
                }
            });
        }
        for round in 0..12 {
            std::thread::sleep(Duration::from_millis(150));
            let (status, v) = if round % 2 == 0 {
                s.post("/v1/adapters/bot/versions/2/promote", &json!({}))
            } else {
                s.post("/v1/adapters/bot/rollback", &json!({}))
            };
            assert_eq!(status, 200, "{v}");
        }
        std::thread::sleep(Duration::from_millis(150));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let seen = *seen.lock().unwrap();
    assert!(seen[0] > 0 && seen[1] > 0, "both versions must have served during the test: {seen:?}");
}

/// Every version the server lists loads and serves, and the store holds
/// nothing the server does not list.
fn assert_store_consistent(s: &TestServer, acknowledged: u32) {
    let (status, body) = s.get("/v1/adapters/bot/versions");
    assert_eq!(status, 200, "{body}");
    let listed: Vec<u64> =
        serde_json::from_str::<Value>(&body).unwrap()["data"].as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect();
    assert!(listed.len() as u32 >= acknowledged, "an acknowledged version is missing: {listed:?}, {acknowledged} acknowledged");
    for v in &listed {
        completion(&s.base, &format!("bot@v{v}"), &[1, 482, 82], false).unwrap_or_else(|e| panic!("v{v} does not serve: {e}"));
    }
    let adapter_dir = s.root.join("adapters/default/bot");
    let on_disk: Vec<String> = std::fs::read_dir(&adapter_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('v') || n.starts_with(".tmp"))
        .collect();
    assert_eq!(on_disk.len(), listed.len(), "store holds versions or leftovers the server does not list: {on_disk:?} vs {listed:?}");
}

#[test]
fn a_server_killed_during_uploads_restarts_with_only_complete_versions() {
    let dir = common::stories_dir();
    let root = tempfile::tempdir().unwrap();
    let (c, w) = fixture("all_linear_r4");
    let s = TestServer::start_in(root.path(), Some(&dir), &[]);
    assert_eq!(upload(&s.base, "", &[("name", b"bot"), ("config", &c), ("weights", &w)]).0, 201);
    let mut acknowledged = 1;
    let mut s = Some(s);
    for round in 0..12u64 {
        let server = s.take().unwrap();
        let base = server.base.clone();
        let body = multipart(&[("name", b"bot"), ("config", &c), ("weights", &w)]);
        let half = round % 2 == 1;
        // Even rounds: the whole upload, killed a few milliseconds in (while
        // it is validated or written). Odd rounds: half a body, then the kill.
        let uploader = std::thread::spawn(move || {
            let addr = base.trim_start_matches("http://").to_string();
            // The kill may come before the connection: then nothing was sent.
            let Ok(mut tcp) = TcpStream::connect(&addr) else { return false };
            let head = format!(
                "POST /v1/adapters HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = tcp.write_all(head.as_bytes());
            let end = if half { body.len() / 2 } else { body.len() };
            let _ = tcp.write_all(&body[..end]);
            let mut answer = String::new();
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = std::io::Read::read_to_string(&mut tcp, &mut answer);
            answer.starts_with("HTTP/1.1 201")
        });
        std::thread::sleep(Duration::from_millis(if half { 50 } else { 1 + round / 2 }));
        server.kill();
        if uploader.join().unwrap() {
            acknowledged += 1;
        }
        let restarted = TestServer::start_in(root.path(), Some(&dir), &[]);
        eprintln!("round {round}: {acknowledged} acknowledged, listed {}", restarted.get("/v1/adapters/bot/versions").1.matches("\"version\"").count());
        assert_store_consistent(&restarted, acknowledged);
        s = Some(restarted);
    }
}
