//! Crashes at any instant: the server runs a mixed load (completions on
//! several adapters, streamed and plain, uploads, promotes, rollbacks,
//! feedback, training jobs) and is killed with SIGKILL at a random moment,
//! then restarted over the same state. After every restart: it starts, the
//! registry equals the store on disk, every version listed is complete and
//! serves, every feedback item answered 202 is there, and no job is left
//! queued or running. `KILL_ROUNDS` sets the rounds (CI runs 5; the full
//! check is `KILL_ROUNDS=30 cargo test --release --test kill_harness`).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestServer;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const BOUNDARY: &str = "lifelora-kill-boundary";
const NAMES: [&str; 3] = ["alpha", "beta", "main"];

fn fixture() -> (Vec<u8>, Vec<u8>) {
    let dir = common::fixtures_dir().join("adapters/q_v_r8");
    (std::fs::read(dir.join("adapter_config.json")).unwrap(), std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
}

fn upload_body(name: &str, config: &[u8], weights: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (part, data) in [("config", config), ("weights", weights)] {
        body.extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"{part}\"\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// What the load was told had happened, and so must survive.
#[derive(Default)]
struct Acknowledged {
    /// Adapter name → versions answered 201.
    versions: BTreeMap<String, Vec<u64>>,
    feedback: Vec<String>,
}

fn post(base: &str, path: &str, body: Value) -> Option<(u16, Value)> {
    match ureq::post(&format!("{base}{path}")).timeout(Duration::from_secs(30)).send_json(body) {
        Ok(r) => Some((r.status(), r.into_json().unwrap_or(Value::Null))),
        Err(ureq::Error::Status(code, r)) => Some((code, r.into_json().unwrap_or(Value::Null))),
        Err(_) => None, // killed mid-request
    }
}

/// One load worker: until `stop`, a random mix of everything the server does.
fn load(base: String, seed: u64, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acknowledged>>, model: String) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (config, weights) = fixture();
    while !stop.load(Ordering::Relaxed) {
        let pick = rng.gen_range(0..10);
        let name = NAMES[rng.gen_range(0..NAMES.len())];
        match pick {
            0..=4 => {
                let target = if rng.gen_bool(0.4) { model.clone() } else { name.to_string() };
                let stream = rng.gen_bool(0.3);
                let body = json!({"model": target, "prompt": [1, 482, 82], "max_tokens": 6, "temperature": 0, "stream": stream});
                if stream {
                    let _ = ureq::post(&format!("{base}/v1/completions")).timeout(Duration::from_secs(30)).send_json(body).map(|r| r.into_string());
                    continue;
                }
                let Some((200, c)) = post(&base, "/v1/completions", body) else { continue };
                let rating = if rng.gen_bool(0.5) { 1 } else { -1 };
                if let Some((202, f)) = post(&base, "/v1/feedback", json!({"completion_id": c["id"], "rating": rating})) {
                    acked.lock().unwrap().feedback.push(f["id"].as_str().unwrap().to_string());
                }
            }
            5 | 6 => {
                let r = ureq::post(&format!("{base}/v1/adapters"))
                    .timeout(Duration::from_secs(30))
                    .set("content-type", &format!("multipart/form-data; boundary={BOUNDARY}"))
                    .send_bytes(&upload_body(name, &config, &weights));
                if let Ok(r) = r {
                    if r.status() == 201 {
                        let v: Value = r.into_json().unwrap_or(Value::Null);
                        if let Some(n) = v["version"].as_u64() {
                            acked.lock().unwrap().versions.entry(name.to_string()).or_default().push(n);
                        }
                    }
                }
            }
            7 => {
                let _ = post(&base, &format!("/v1/adapters/{name}/rollback"), json!({}));
            }
            8 => {
                let v = rng.gen_range(1..4);
                let _ = post(&base, &format!("/v1/adapters/{name}/versions/{v}/promote"), json!({}));
            }
            _ => {
                let _ = post(&base, "/v1/adapters/main/train", json!({"hyperparameters": {"n_steps": 20}}));
            }
        }
    }
}

fn json_of(s: &TestServer, path: &str) -> Value {
    let (status, body) = s.get(path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The checks after a restart.
fn assert_recovered(s: &TestServer, acked: &Acknowledged) {
    let root = s.root.join("adapters/default");
    let listed = json_of(s, "/v1/adapters");
    let mut listed_names = Vec::new();
    for a in listed["data"].as_array().unwrap() {
        let name = a["name"].as_str().unwrap().to_string();
        let versions: Vec<u64> = a["versions"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        // The registry equals the store: the same versions, complete, and the same current one.
        let dir = root.join(&name);
        let mut on_disk: Vec<u64> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix('v')).and_then(|n| n.parse().ok()))
            .collect();
        on_disk.sort();
        let mut sorted = versions.clone();
        sorted.sort();
        assert_eq!(sorted, on_disk, "{name}: listed versions differ from the store");
        let leftovers: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{name}: leftovers {leftovers:?}");
        let pointer: Value = serde_json::from_slice(&std::fs::read(dir.join("pointer.json")).unwrap_or_else(|_| b"{}".to_vec())).unwrap();
        assert_eq!(pointer.get("current").cloned().unwrap_or(Value::Null), a["version"], "{name}: current version differs from the store");
        for v in &versions {
            assert!(dir.join(format!("v{v}/manifest.json")).exists(), "{name} v{v} has no manifest");
            let (status, body) = post(&s.base, "/v1/completions", json!({"model": format!("{name}@v{v}"), "prompt": [1, 482], "max_tokens": 2})).unwrap();
            assert_eq!(status, 200, "{name}@v{v} does not serve: {body}");
        }
        for v in acked.versions.get(&name).into_iter().flatten() {
            assert!(versions.contains(v), "{name}: acknowledged v{v} is missing from {versions:?}");
        }
        listed_names.push(name);
    }
    for name in acked.versions.keys() {
        assert!(listed_names.contains(name), "acknowledged adapter {name} is gone");
    }
    // Every acknowledged feedback item is there.
    let mut seen = std::collections::HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/feedback?limit=1000&after={a}"),
            None => "/v1/feedback?limit=1000".to_string(),
        };
        let page = json_of(s, &path);
        for f in page["data"].as_array().unwrap() {
            seen.insert(f["id"].as_str().unwrap().to_string());
        }
        if page["has_more"] != true {
            break;
        }
        after = page["last_id"].as_str().map(str::to_string);
    }
    let lost: Vec<&String> = acked.feedback.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged feedback lost: {lost:?}");
    // No job stuck.
    let jobs = json_of(s, "/v1/fine_tuning/jobs?limit=100");
    for j in jobs["data"].as_array().unwrap() {
        assert!(j["status"] != "running" && j["status"] != "queued", "job left {}: {j}", j["status"]);
    }
}

#[test]
fn killed_at_random_moments_under_mixed_load_the_server_always_recovers() {
    let dir = common::stories_dir();
    let rounds: u64 = std::env::var("KILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let root = tempfile::tempdir().unwrap();
    let env = [
        ("LIFELORA_LEARNING__MIN_NEW_FEEDBACK", "8"),
        ("LIFELORA_LEARNING__MAX_BASE_DRIFT", "100"),
        ("LIFELORA_LEARNING__MIN_BASE_AGREEMENT", "0"),
        ("LIFELORA_LEARNING__MAX_REGRESSION", "100"),
    ];
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut server = TestServer::start_in(root.path(), Some(&dir), &env);
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (base, stop, acked, model) = (server.base.clone(), stop.clone(), acked.clone(), server.model.clone());
                std::thread::spawn(move || load(base, round * 16 + w, stop, acked, model))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..1500)));
        server.kill();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        server = TestServer::start_in(root.path(), Some(&dir), &env);
        let a = acked.lock().unwrap();
        eprintln!("round {round}: {} versions and {} feedback items acknowledged so far", a.versions.values().map(Vec::len).sum::<usize>(), a.feedback.len());
        assert_recovered(&server, &a);
    }
}
