//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures` of this repository: every fixture the tests read
/// (see its README). Missing: the test fails, it never skips.
pub fn fixtures_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    assert!(dir.join("stories260K/config.json").exists(), "the test fixtures are missing at {}", dir.display());
    dir
}

/// The Python the tests run: the repository's `.venv` (scripts/test makes
/// it), else `python3` on the PATH.
pub fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The stories260K model directory.
pub fn stories_dir() -> PathBuf {
    fixtures_dir().join("stories260K")
}

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `lifelora serve` child process on an ephemeral port; killed on drop.
pub struct TestServer {
    child: Child,
    /// The state root (adapter store, tenants file, database), removed with
    /// the server unless given by the caller.
    pub root: PathBuf,
    _owned_root: Option<tempfile::TempDir>,
    pub base: String,
    pub model: String,
}

impl TestServer {
    /// Serves `model_dir` (None: the built-in model) with extra env settings.
    pub fn start(model_dir: Option<&std::path::Path>, env: &[(&str, &str)]) -> TestServer {
        let temp = tempfile::tempdir().expect("temp dir");
        let root = temp.path().to_path_buf();
        let mut server = Self::start_in(&root, model_dir, env);
        server._owned_root = Some(temp);
        server
    }

    /// Like [`TestServer::start`] with its state under `root`, which
    /// outlives it: for restarts over the same store.
    pub fn start_in(root: &std::path::Path, model_dir: Option<&std::path::Path>, env: &[(&str, &str)]) -> TestServer {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lifelora"));
        cmd.args(["serve", "--port", "0", "--host", "127.0.0.1"]);
        if let Some(d) = model_dir {
            cmd.arg("--model").arg(d);
        }
        cmd.env("LIFELORA_LOG__LEVEL", "warn");
        cmd.env("LIFELORA_STORAGE__ADAPTERS_DIR", root.join("adapters"));
        cmd.env("LIFELORA_STORAGE__TENANTS_FILE", root.join("tenants.json"));
        cmd.env("LIFELORA_STORAGE__DATABASE", root.join("lifelora.db"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lifelora");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .expect("read stdout");
            if let Some(url) = line.strip_prefix("lifelora listening on ") {
                break url.trim().to_string();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let mut server = TestServer { child, root: root.to_path_buf(), _owned_root: None, base, model: String::new() };
        // /health names the model without a key (the server may require one);
        // if this fails, dropping `server` kills the child.
        let health: serde_json::Value =
            ureq::get(&format!("{}/health", server.base)).call().expect("health").into_json().expect("health json");
        server.model = health["model"].as_str().expect("model id").to_string();
        server
    }

    /// POSTs JSON; returns (status, body) for success and error statuses alike.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        self.post_raw(path, &body.to_string())
    }

    /// POSTs a raw body.
    pub fn post_raw(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let r = ureq::post(&format!("{}{path}", self.base))
            .set("content-type", "application/json")
            .timeout(Duration::from_secs(120))
            .send_string(body);
        response_json(r)
    }

    /// GETs a path.
    pub fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&format!("{}{path}", self.base)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// POSTs a streaming request and returns every `data:` payload in order.
    pub fn stream(&self, path: &str, body: &serde_json::Value) -> Vec<String> {
        let r = ureq::post(&format!("{}{path}", self.base))
            .timeout(Duration::from_secs(120))
            .send_json(body.clone())
            .expect("stream request");
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        BufReader::new(r.into_reader())
            .lines()
            .map(|l| l.unwrap())
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    /// The value of a Prometheus metric line (first sample whose name matches).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found"))
    }
}

/// Status and JSON body of a ureq result.
pub fn response_json(r: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap_or(serde_json::Value::Null)),
        Err(ureq::Error::Status(code, r)) => {
            (code, r.into_json().unwrap_or(serde_json::Value::Null))
        }
        Err(e) => panic!("request failed: {e}"),
    }
}

/// Asserts an OpenAI error object with the given status.
pub fn assert_openai_error(status: u16, body: &serde_json::Value, expected: u16) {
    assert_eq!(status, expected, "body: {body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {body}"
    );
    assert!(e["type"].as_str().is_some(), "no type: {body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "param/code missing: {body}"
    );
}

impl TestServer {
    /// SIGKILL: the process dies at once, mid-write if it was writing.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM; returns once the process is signalled.
    pub fn terminate(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit (at most `timeout`), returning its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The SmolLM2 GGUF fetched by `lifelora fetch smollm2` (scripts/test does
/// it first). Missing: the test fails.
pub fn smollm2_gguf() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run `lifelora fetch smollm2` (scripts/test does)", path.display());
    path
}

/// llama.cpp's reference for the SmolLM2 GGUF.
pub fn smollm2_reference() -> serde_json::Value {
    let path = fixtures_dir().join("smollm2/llamacpp_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference json")).expect("valid json")
}

/// A process's resident memory now and at its peak, in KiB (`VmRSS`, `VmHWM`).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A multipart/form-data body: `(name, filename, bytes)` per part.
pub fn multipart_body(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        let file = filename.map(|f| format!("; filename=\"{f}\"")).unwrap_or_default();
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

/// One LoRA site of a base model: module name, in and out features.
pub type Site = (&'static str, usize, usize);

/// The built-in demo model's sites, per layer (it has 4 layers).
pub const BUILTIN_SITES: &[Site] =
    &[("q_proj", 128, 128), ("k_proj", 128, 64), ("v_proj", 128, 64), ("o_proj", 128, 128), ("gate_proj", 128, 344), ("up_proj", 128, 344), ("down_proj", 344, 128)];
pub const BUILTIN_LAYERS: usize = 4;

/// SmolLM2-135M's sites, per layer (30 layers).
pub const SMOLLM2_SITES: &[Site] =
    &[("q_proj", 576, 576), ("k_proj", 576, 192), ("v_proj", 576, 192), ("o_proj", 576, 576), ("gate_proj", 576, 1536), ("up_proj", 576, 1536), ("down_proj", 1536, 576)];

/// A PEFT adapter as `save_pretrained` writes it (config and safetensors
/// bytes) with every site of `sites` on `layers` layers at `rank`; small
/// deterministic weights, `patch` may change one tensor's values by key.
pub fn peft_adapter(layers: usize, sites: &[Site], rank: usize, config: serde_json::Value, patch: &dyn Fn(&str, &mut [f32])) -> (Vec<u8>, Vec<u8>) {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for layer in 0..layers {
        for (module, inf, outf) in sites {
            let group = if module.ends_with("_proj") && ["gate_proj", "up_proj", "down_proj"].contains(module) { "mlp" } else { "self_attn" };
            for (ab, shape) in [("A", [rank, *inf]), ("B", [*outf, rank])] {
                let key = format!("base_model.model.model.layers.{layer}.{group}.{module}.lora_{ab}.weight");
                let mut values: Vec<f32> = (0..shape[0] * shape[1]).map(|i| ((i % 7) as f32 - 3.0) * 1e-3).collect();
                patch(&key, &mut values);
                let start = data.len();
                for v in values {
                    data.extend_from_slice(&v.to_le_bytes());
                }
                header.insert(key, serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}));
            }
        }
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut weights = (h.len() as u64).to_le_bytes().to_vec();
    weights.extend_from_slice(&h);
    weights.extend_from_slice(&data);
    let mut config = config;
    let defaults = serde_json::json!({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sites.iter().map(|s| s.0).collect::<Vec<_>>()});
    for (k, v) in defaults.as_object().unwrap() {
        if config.get(k).is_none() {
            config[k] = v.clone();
        }
    }
    (config.to_string().into_bytes(), weights)
}

/// Sends a raw HTTP/1.1 request (head then body, written by `write` from
/// another thread so the server may answer before it is all sent) and
/// returns the response's status and body.
pub fn raw_request(base: &str, head: &str, write: impl FnOnce(&mut std::net::TcpStream) + Send + 'static) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    conn.write_all(head.as_bytes()).expect("write head");
    let mut writer = conn.try_clone().expect("clone");
    let sender = std::thread::spawn(move || write(&mut writer));
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    // Read until the response is complete (headers plus content-length) or the server closes.
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&answer);
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)));
            if let Some(len) = len {
                if answer.len() >= end + 4 + len {
                    break;
                }
            }
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
