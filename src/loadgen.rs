//! A load generator: N concurrent streaming clients against a running
//! server, reporting aggregate tokens/s, time to first token and latency
//! percentiles.

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to send and how hard.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub base_url: String,
    /// Model ids, request `i` naming `models[i % len]` (so streams spread
    /// across adapters); empty: the first model the server lists.
    pub models: Vec<String>,
    /// Sent as `Authorization: Bearer` when set.
    pub api_key: Option<String>,
    pub concurrency: usize,
    pub requests: usize,
    pub max_tokens: usize,
    pub prompt: String,
    pub ignore_eos: bool,
}

/// One finished request.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ttft: Duration,
    latency: Duration,
    tokens: usize,
}

/// The figures of a run.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub requests: usize,
    pub errors: usize,
    pub wall: Duration,
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub ttft_p50: Duration,
    pub ttft_p99: Duration,
    pub latency_p50: Duration,
    pub latency_p99: Duration,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "requests: {} ok, {} errors in {:.2}s",
            self.requests,
            self.errors,
            self.wall.as_secs_f64()
        )?;
        writeln!(
            f,
            "generated tokens: {}  aggregate: {:.1} tok/s",
            self.tokens, self.tokens_per_second
        )?;
        writeln!(
            f,
            "time to first token: p50 {:.1} ms, p99 {:.1} ms",
            ms(self.ttft_p50),
            ms(self.ttft_p99)
        )?;
        write!(
            f,
            "request latency:     p50 {:.1} ms, p99 {:.1} ms",
            ms(self.latency_p50),
            ms(self.latency_p99)
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
}

/// Asks the server which model it serves.
fn discover_model(base: &str, api_key: Option<&str>) -> Result<String, LoadError> {
    let url = format!("{base}/v1/models");
    let mut req = ureq::get(&url);
    if let Some(key) = api_key {
        req = req.set("Authorization", &format!("Bearer {key}"));
    }
    let v: serde_json::Value = req
        .call()
        .map_err(|e| LoadError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?
        .into_json()
        .map_err(|e| LoadError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or(LoadError::Unreachable {
            url,
            message: "no model listed".into(),
        })
}

fn one_request(spec: &LoadSpec, model: &str) -> Result<Sample, String> {
    let started = Instant::now();
    let body = serde_json::json!({
        "model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": spec.ignore_eos,
    });
    let mut req = ureq::post(&format!("{}/v1/completions", spec.base_url)).timeout(Duration::from_secs(600));
    if let Some(key) = &spec.api_key {
        req = req.set("Authorization", &format!("Bearer {key}"));
    }
    let resp = req
        .send_json(body)
        .map_err(|e| e.to_string())?;
    let mut ttft = None;
    let mut tokens = 0;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if v.get("error").is_some() {
            return Err(data.to_string());
        }
        if ttft.is_none() && v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
            ttft = Some(started.elapsed());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    Ok(Sample {
        ttft: ttft.unwrap_or_else(|| started.elapsed()),
        latency: started.elapsed(),
        tokens,
    })
}

/// Runs the load and gathers the figures.
pub fn run(spec: &LoadSpec) -> Result<LoadReport, LoadError> {
    let base = spec.base_url.trim_end_matches('/').to_string();
    let spec = LoadSpec {
        base_url: base.clone(),
        ..spec.clone()
    };
    let models = if spec.models.is_empty() { vec![discover_model(&base, spec.api_key.as_deref())?] } else { spec.models.clone() };
    let next = Arc::new(Mutex::new(0usize));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(0usize));
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..spec.concurrency.max(1) {
            s.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                    if *n >= spec.requests {
                        return;
                    }
                    *n += 1;
                    *n - 1
                };
                match one_request(&spec, &models[i % models.len()]) {
                    Ok(sample) => samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(sample),
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        *errors.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    }
                }
            });
        }
    });
    let wall = started.elapsed();
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut ttft: Vec<Duration> = samples.iter().map(|s| s.ttft).collect();
    let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    ttft.sort();
    lat.sort();
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let errors = *errors.lock().unwrap_or_else(|p| p.into_inner());
    Ok(LoadReport {
        requests: samples.len(),
        errors,
        wall,
        tokens,
        tokens_per_second: tokens as f64 / wall.as_secs_f64().max(1e-9),
        ttft_p50: percentile(&ttft, 0.5),
        ttft_p99: percentile(&ttft, 0.99),
        latency_p50: percentile(&lat, 0.5),
        latency_p99: percentile(&lat, 0.99),
    })
}
