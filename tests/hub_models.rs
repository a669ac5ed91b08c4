//! `--model org/name`: a model already in the Hugging Face cache is served
//! from it (offline), under the id typed; a model not there is downloaded
//! through the Hub's URL layout (here a local server standing in for the
//! Hub, with `HF_ENDPOINT`, checking `HF_TOKEN`) into that cache.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::json;

const FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Lays out `repo` in a Hub cache under `home` (HF_HOME), as the Hub's clients do.
fn lay_out_cache(home: &Path, repo: &str) {
    let dir = home.join("hub").join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs").join("main"), COMMIT).unwrap();
    let snapshot = dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in FILES {
        std::fs::copy(common::stories_dir().join(f), snapshot.join(f)).unwrap();
    }
}

fn greedy(s: &common::TestServer) -> serde_json::Value {
    let (status, v) = s.post("/v1/completions", &json!({"model": s.model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}));
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].clone()
}

#[test]
fn a_model_in_the_hugging_face_cache_is_served_offline_under_the_id_typed() {
    let home = tempfile::tempdir().unwrap();
    lay_out_cache(home.path(), "test-org/tiny-stories");
    let h = home.path().to_str().unwrap();
    let s = common::TestServer::start(Some(Path::new("test-org/tiny-stories")), &[("HF_HOME", h), ("HF_HUB_OFFLINE", "1")]);
    assert_eq!(s.model, "test-org/tiny-stories");
    let (status, body) = s.get("/v1/models/test-org/tiny-stories");
    assert_eq!(status, 200, "{body}");
    let direct = common::TestServer::start(Some(&common::stories_dir()), &[]);
    assert_eq!(greedy(&s), greedy(&direct), "the cached snapshot is the same model");
}

#[test]
fn a_model_missing_from_an_offline_cache_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lifelora"))
        .args(["serve", "--port", "0", "--model", "test-org/not-here"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("test-org/not-here") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

/// A stand-in for the Hub: `/api/models/{repo}/revision/{rev}` and
/// `/{repo}/resolve/{rev}/{file}` with ranges, etags and the commit header;
/// every request must carry `token`. Records the paths asked for.
fn fake_hub(repo: &'static str, files: BTreeMap<String, Vec<u8>>, token: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (mut range, mut auth) = (None, None);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or(("", ""));
                match k.trim().to_ascii_lowercase().as_str() {
                    "range" => range = v.trim().strip_prefix("bytes=").map(str::to_string),
                    "authorization" => auth = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            log.lock().unwrap().push(path.clone());
            let reply = |stream: &mut std::net::TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
                let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            };
            if auth.as_deref() != Some(&format!("Bearer {token}")) {
                reply(&mut stream, "401 Unauthorized", &[], b"{\"error\":\"token\"}");
                continue;
            }
            if path == format!("/api/models/{repo}/revision/main") {
                let siblings: Vec<_> = files.keys().map(|f| json!({"rfilename": f})).collect();
                let body = json!({"sha": COMMIT, "siblings": siblings}).to_string();
                reply(&mut stream, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes());
                continue;
            }
            let prefix = format!("/{repo}/resolve/main/");
            let Some(bytes) = path.strip_prefix(&prefix).and_then(|f| files.get(f)) else {
                reply(&mut stream, "404 Not Found", &[], b"");
                continue;
            };
            let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                Some((a, b)) => {
                    let a: usize = a.parse().unwrap_or(0);
                    let b: usize = b.parse().unwrap_or(bytes.len().saturating_sub(1));
                    (a.min(bytes.len()), (b + 1).min(bytes.len()))
                }
                None => (0, bytes.len()),
            };
            let etag = format!("\"{:016x}{:08x}\"", bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3)), bytes.len());
            let headers = [
                ("ETag".to_string(), etag),
                ("X-Repo-Commit".to_string(), COMMIT.to_string()),
                ("Content-Range".to_string(), format!("bytes {start}-{}/{}", end.saturating_sub(1), bytes.len())),
            ];
            reply(&mut stream, "206 Partial Content", &headers, &bytes[start..end]);
        }
    });
    (base, seen)
}

#[test]
fn a_model_not_in_the_cache_is_downloaded_through_the_hub_layout_with_the_token_then_served_offline() {
    let mut files: BTreeMap<String, Vec<u8>> = FILES.iter().map(|f| (f.to_string(), std::fs::read(common::stories_dir().join(f)).unwrap())).collect();
    files.insert("README.md".into(), b"# tiny stories".to_vec());
    let (endpoint, seen) = fake_hub("remote-org/stories", files.clone(), "hf_test_token");
    let home = tempfile::tempdir().unwrap();

    // Without the token the Hub refuses, and the error says which model.
    let out = Command::new(env!("CARGO_BIN_EXE_lifelora"))
        .args(["fetch", "remote-org/stories"])
        .env("HF_HOME", home.path())
        .env("HF_ENDPOINT", &endpoint)
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("remote-org/stories"));

    let out = Command::new(env!("CARGO_BIN_EXE_lifelora"))
        .args(["fetch", "remote-org/stories"])
        .env("HF_HOME", home.path())
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_TOKEN", "hf_test_token")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Off a terminal, progress is plain lines: no escape codes, no carriage returns.
    assert!(stderr.contains("model.safetensors: done"), "{stderr}");
    assert!(!stderr.contains('\u{1b}') && !stderr.contains('\r'), "{stderr:?}");
    let snapshot = Path::new(String::from_utf8_lossy(&out.stdout).trim()).to_path_buf();
    assert!(snapshot.ends_with(format!("models--remote-org--stories/snapshots/{COMMIT}")), "{}", snapshot.display());
    for f in FILES {
        assert_eq!(std::fs::read(snapshot.join(f)).unwrap(), files[f], "{f} arrived whole");
    }
    assert!(!snapshot.join("README.md").exists(), "only what the model needs is downloaded");
    assert!(seen.lock().unwrap().iter().any(|p| p == "/api/models/remote-org/stories/revision/main"));

    // Now in the cache: served with the Hub unreachable.
    let h = home.path().to_str().unwrap();
    let s = common::TestServer::start(Some(Path::new("remote-org/stories")), &[("HF_HOME", h), ("HF_HUB_OFFLINE", "1")]);
    assert_eq!(s.model, "remote-org/stories");
    let direct = common::TestServer::start(Some(&common::stories_dir()), &[]);
    assert_eq!(greedy(&s), greedy(&direct));
}

#[test]
fn serve_downloads_a_missing_model_itself() {
    let files: BTreeMap<String, Vec<u8>> = FILES.iter().map(|f| (f.to_string(), std::fs::read(common::stories_dir().join(f)).unwrap())).collect();
    let (endpoint, _) = fake_hub("serve-org/stories", files, "tok");
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    let s = common::TestServer::start(Some(Path::new("serve-org/stories")), &[("HF_HOME", h), ("HF_ENDPOINT", &endpoint), ("HF_TOKEN", "tok")]);
    assert_eq!(s.model, "serve-org/stories");
    assert!(greedy(&s).as_str().is_some_and(|t| !t.is_empty()));
}
