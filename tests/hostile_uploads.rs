//! Uploads as a hostile tenant sends them, over HTTP on the built-in
//! model: archive bombs (GNU long names, PAX headers, gzip bombs) and
//! multipart bombs are refused while reading, fast and without the
//! server's memory growing; trickled bodies time out; pattern blow-ups
//! are refused; bad values are refused by name with no backtrace; cold
//! adapter loads never hold the HTTP workers.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{multipart_body, peft_adapter, raw_request, rss_kib, TestServer, BUILTIN_LAYERS, BUILTIN_SITES};
use serde_json::{json, Value};

const B: &str = "hostile-boundary";

fn post_multipart(s: &TestServer, path: &str, parts: &[(&str, Option<&str>, &[u8])]) -> (u16, Value, Duration) {
    let started = Instant::now();
    let r = ureq::post(&format!("{}{path}", s.base))
        .set("content-type", &format!("multipart/form-data; boundary={B}"))
        .timeout(Duration::from_secs(60))
        .send_bytes(&multipart_body(B, parts));
    let (status, v) = common::response_json(r);
    (status, v, started.elapsed())
}

/// A tar header (ustar layout) of `kind` declaring `size` bytes.
fn tar_header(name: &str, size: u64, kind: u8) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// A gzipped tar of entries whose data is `size` zero bytes each, streamed
/// into the compressor (a few hundred MiB of zeros is a few hundred KiB).
fn zero_archive(entries: &[(&str, u64, u8)]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for (name, size, kind) in entries {
        gz.write_all(&tar_header(name, *size, *kind)).unwrap();
        let mut left = size.div_ceil(512) * 512;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            gz.write_all(&zeros[..n]).unwrap();
            left -= n as u64;
        }
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap()
}

fn assert_refused(label: &str, status: u16, v: &Value, took: Duration) {
    assert!(status == 400 || status == 413, "{label}: {status} {v}");
    assert!(v["error"]["message"].is_string(), "{label}: {v}");
    assert!(took < Duration::from_secs(4), "{label}: answered after {took:?}");
}

#[test]
fn archive_bombs_are_refused_while_reading_with_bounded_memory() {
    // The default limits, and limits that let an archive unpack up to
    // lora.max_upload_bytes (256 MiB): the bombs are refused either way.
    for env in [vec![], vec![("LIFELORA_LORA__MAX_RANK", "100000")]] {
        let s = TestServer::start(None, &env);
        let mut bombs: Vec<(&str, Vec<u8>)> = vec![
            ("GNU long name of 300 MiB", zero_archive(&[("././@LongLink", 300 << 20, b'L'), ("x", 0, b'0')])),
            ("GNU long link of 300 MiB", zero_archive(&[("././@LongLink", 300 << 20, b'K'), ("x", 0, b'0')])),
            ("PAX header of 300 MiB", zero_archive(&[("PaxHeaders/x", 300 << 20, b'x'), ("x", 0, b'0')])),
            ("PAX global header of 300 MiB", zero_archive(&[("PaxHeaders/g", 300 << 20, b'g')])),
            ("two 150 MiB files of zeros", zero_archive(&[("a.bin", 150 << 20, b'0'), ("b.bin", 150 << 20, b'0')])),
            ("a 200 MiB weights file of zeros", zero_archive(&[("adapter_config.json", 0, b'0'), ("adapter_model.safetensors", 200 << 20, b'0')])),
        ];
        // An honest adapter with two configs in it.
        let (config, weights) = peft_adapter(BUILTIN_LAYERS, &BUILTIN_SITES[..1], 2, json!({}), &|_, _| {});
        let mut twice = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (path, data) in [("a/adapter_config.json", &config), ("b/adapter_config.json", &config), ("a/adapter_model.safetensors", &weights)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            twice.append_data(&mut h, path, data.as_slice()).unwrap();
        }
        bombs.push(("two adapter_config.json", twice.into_inner().unwrap().finish().unwrap()));
        for (label, archive) in &bombs {
            assert!(archive.len() < 2 << 20, "{label}: {} bytes", archive.len());
            let (_, peak_before) = rss_kib(s.pid());
            let (status, v, took) = post_multipart(&s, "/v1/adapters", &[("name", None, b"bomb"), ("archive", Some("a.tar.gz"), archive)]);
            let (_, peak_after) = rss_kib(s.pid());
            assert_refused(label, status, &v, took);
            let growth_mib = (peak_after.saturating_sub(peak_before)) as f64 / 1024.0;
            eprintln!("{label} ({} KiB gzipped): {status} in {:.0} ms, peak RSS growth {growth_mib:.1} MiB", archive.len() / 1024, took.as_secs_f64() * 1e3);
            assert!(growth_mib <= 64.0, "{label}: the server's peak memory grew {growth_mib:.1} MiB");
        }
        let msg = |i: usize| {
            let (status, v, _) = post_multipart(&s, "/v1/adapters", &[("name", None, b"bomb"), ("archive", Some("a.tar.gz"), &bombs[i].1)]);
            (status, v["error"]["message"].as_str().unwrap_or("").to_string())
        };
        assert!(msg(0).1.contains("GNU long name"), "{:?}", msg(0));
        assert!(msg(2).1.contains("PAX"), "{:?}", msg(2));
        assert!(msg(6).1.contains("more than once"), "{:?}", msg(6));
        // Nothing was stored, and the server is well.
        let (_, list) = s.get("/v1/adapters");
        assert_eq!(serde_json::from_str::<Value>(&list).unwrap()["data"], json!([]));
        assert_eq!(s.get("/health").0, 200);
    }
}

#[test]
fn multipart_bombs_are_refused_by_part_count_and_header_size() {
    let s = TestServer::start(None, &[]);
    for path in ["/v1/files", "/v1/adapters"] {
        // 20 MB of empty parts with 4 KB names: refused at the 17th part.
        let name = "n".repeat(4000);
        let part = format!("--{B}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n\r\n").into_bytes();
        let count = 5000;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={B}\r\nContent-Length: {}\r\n\r\n",
            part.len() * count + B.len() + 6
        );
        let (_, peak_before) = rss_kib(s.pid());
        let started = Instant::now();
        let (status, body) = raw_request(&s.base, &head, move |w| {
            for _ in 0..count {
                if w.write_all(&part).is_err() {
                    return;
                }
            }
            let _ = w.write_all(format!("--{B}--\r\n").as_bytes());
        });
        let took = started.elapsed();
        let (_, peak_after) = rss_kib(s.pid());
        eprintln!("{path}: {count} parts of 4 KB names: {status} in {:.0} ms, peak RSS growth {:.1} MiB", took.as_secs_f64() * 1e3, peak_after.saturating_sub(peak_before) as f64 / 1024.0);
        // Refused at the 17th part, or at once by its declared size where it is over the upload limit.
        assert!(status == 400 || status == 413, "{status}: {body}");
        assert!(body.contains("too_many_parts") || body.contains("request_too_large"), "{body}");
        assert!(took < Duration::from_secs(4), "{took:?}");
        assert!(peak_after.saturating_sub(peak_before) <= 64 * 1024);

        // One part whose file name alone is 8 KB.
        let long = "f".repeat(8000);
        let (status, v, _) = post_multipart(&s, path, &[("purpose", None, b"fine-tune"), ("file", Some(&long), b"{}\n")]);
        common::assert_openai_error(status, &v, 400);
        assert_eq!(v["error"]["code"], "part_header_too_large", "{v}");
        // A part sent twice.
        let (status, v, _) = post_multipart(&s, path, &[("name", None, b"x"), ("name", None, b"y"), ("purpose", None, b"fine-tune"), ("purpose", None, b"fine-tune")]);
        common::assert_openai_error(status, &v, 400);
    }
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn a_trickled_multipart_body_times_out_with_408() {
    let s = TestServer::start(None, &[("LIFELORA_LIMITS__CLIENT_TIMEOUT_SECS", "2")]);
    for path in ["/v1/files", "/v1/adapters"] {
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={B}\r\nContent-Length: 100000\r\n\r\n");
        let started = Instant::now();
        let (status, body) = raw_request(&s.base, &head, |w| {
            let opening = format!("--{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n");
            if w.write_all(opening.as_bytes()).is_err() {
                return;
            }
            for _ in 0..200 {
                std::thread::sleep(Duration::from_millis(300));
                if w.write_all(b"{").is_err() {
                    return;
                }
            }
        });
        let took = started.elapsed();
        eprintln!("{path}: trickled body answered {status} after {:.1} s", took.as_secs_f64());
        assert_eq!(status, 408, "{body}");
        assert!(body.contains("request_timeout"), "{body}");
        assert!(took < Duration::from_secs(8), "{took:?}");
    }
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn pattern_blow_ups_are_refused_and_bad_values_are_refused_by_name_without_backtraces() {
    let s = TestServer::start(None, &[("RUST_BACKTRACE", "1")]);
    let upload = |config: Value, patch: &dyn Fn(&str, &mut [f32])| {
        let (c, w) = peft_adapter(BUILTIN_LAYERS, &BUILTIN_SITES[..2], 4, config, patch);
        post_multipart(&s, "/v1/adapters", &[("name", None, b"bad"), ("config", None, &c), ("weights", None, &w)])
    };
    // 4,000 never-matching patterns (a 74 KiB config) are refused at once.
    let patterns: serde_json::Map<String, Value> = (0..4000).map(|i| (format!("layers\\.{i}\\.nothing_proj"), json!(4))).collect();
    let (status, v, took) = upload(json!({"rank_pattern": patterns}), &|_, _| {});
    common::assert_openai_error(status, &v, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("256"), "{v}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let nan_at = |key: &str, values: &mut [f32]| {
        if key.contains("layers.2.self_attn.k_proj.lora_B") {
            values[17] = f32::NAN;
        }
    };
    for (label, config, patch, word) in [
        ("one NaN in one lora_B", json!({}), &nan_at as &dyn Fn(&str, &mut [f32]), "layers.2.self_attn.k_proj.lora_B"),
        ("alpha 1e300", json!({"lora_alpha": 1e300}), &|_: &str, _: &mut [f32]| {}, "lora_alpha"),
        ("rank 0.5 in rank_pattern", json!({"rank_pattern": {"q_proj": 0.5}}), &|_: &str, _: &mut [f32]| {}, "rank_pattern"),
        ("rank 0 in rank_pattern", json!({"rank_pattern": {"q_proj": 0}}), &|_: &str, _: &mut [f32]| {}, "rank_pattern"),
        ("a regex that does not compile", json!({"alpha_pattern": {"(q_proj": 8}}), &|_: &str, _: &mut [f32]| {}, "alpha_pattern"),
        ("a 600-byte pattern", json!({"alpha_pattern": {"q".repeat(600): 8}}), &|_: &str, _: &mut [f32]| {}, "alpha_pattern"),
        ("a finite weight times the largest scale", json!({"lora_alpha": 65536, "r": 4, "use_rslora": true}), &|k: &str, v: &mut [f32]| if k.contains("lora_B") { v[0] = 1e36 }, "lora_B"),
    ] {
        let (status, v, _) = upload(config, patch);
        common::assert_openai_error(status, &v, 400);
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(word), "{label}: {message}");
        assert!(!message.contains("backtrace") && !message.contains("   0: ") && !message.contains(".rs:"), "{label}: {message}");
    }
    let (_, list) = s.get("/v1/adapters");
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap()["data"], json!([]), "nothing was stored");
}

#[test]
fn quota_comes_before_any_adapter_load() {
    let s = TestServer::start(
        None,
        &[("LIFELORA_LIMITS__TOKENS_PER_MINUTE_PER_TENANT", "4"), ("LIFELORA_LORA__MAX_RESIDENT", "1")],
    );
    for name in ["a", "b"] {
        let (c, w) = peft_adapter(BUILTIN_LAYERS, BUILTIN_SITES, 8, json!({}), &|_, _| {});
        let (status, v, _) = post_multipart(&s, "/v1/adapters", &[("name", None, name.as_bytes()), ("config", None, &c), ("weights", None, &w)]);
        assert_eq!(status, 201, "{v}");
    }
    let (status, v) = s.post("/v1/completions", &json!({"model": "a", "prompt": "hello", "max_tokens": 4}));
    assert_eq!(status, 200, "{v}");
    let loads = s.metric("lifelora_adapter_loads_total");
    // Over quota: a request for the other (cold) adapter is refused without loading it.
    let started = Instant::now();
    let (status, v) = s.post("/v1/completions", &json!({"model": "b", "prompt": "hello", "max_tokens": 4}));
    assert_eq!(status, 429, "{v}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(s.metric("lifelora_adapter_loads_total"), loads, "no load for a refused request");
}

/// `/health` latencies while `requests` run, each in its own thread.
fn health_while(s: &TestServer, requests: Vec<Value>) -> Vec<Duration> {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let workers: Vec<_> = requests
            .into_iter()
            .map(|body| {
                scope.spawn(move || {
                    let (status, v) = s.post("/v1/completions", &body);
                    assert_eq!(status, 200, "{v}");
                })
            })
            .collect();
        let probe = scope.spawn(|| {
            let mut lat = Vec::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                assert_eq!(s.get("/health").0, 200);
                lat.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(5));
            }
            lat
        });
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        probe.join().unwrap()
    })
}

#[test]
fn cold_loads_of_the_largest_adapters_leave_health_answering() {
    // SmolLM2's largest valid adapter: every projection of 30 layers at
    // rank 64 with 256 patterns (78 MB of f32), loaded cold twice at once.
    let gguf = common::smollm2_gguf();
    let s = TestServer::start(Some(&gguf), &[("LIFELORA_LORA__MAX_RESIDENT", "1")]);
    let patterns: serde_json::Map<String, Value> = (0..255).map(|i| (format!("layers\\.{}\\.never_{i}", i % 30), json!(64))).chain([("q_proj".to_string(), json!(64))]).collect();
    for name in ["big-a", "big-b", "big-c"] {
        let (c, w) = peft_adapter(30, common::SMOLLM2_SITES, 64, json!({"rank_pattern": patterns}), &|_, _| {});
        let (status, v, took) = post_multipart(&s, "/v1/adapters", &[("name", None, name.as_bytes()), ("config", None, &c), ("weights", None, &w)]);
        assert_eq!(status, 201, "{v}");
        eprintln!("upload of {name} ({} MB): {:.2} s", w.len() >> 20, took.as_secs_f64());
    }
    let mut all = Vec::new();
    for round in 0..3 {
        let pair = [["big-a", "big-b"], ["big-c", "big-a"], ["big-b", "big-c"]][round];
        let requests = pair.iter().map(|m| json!({"model": m, "prompt": "hi", "max_tokens": 1})).collect();
        all.extend(health_while(&s, requests));
    }
    all.sort();
    let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    eprintln!(
        "/health during 6 cold loads ({} probes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} loads",
        all.len(),
        p(0.5).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        all.last().unwrap().as_secs_f64() * 1e3,
        s.metric("lifelora_adapter_loads_total")
    );
    // Each request's adapter is cold but when the other request of its pair just loaded it.
    assert!(s.metric("lifelora_adapter_loads_total") >= 4.0);
    assert!(p(0.99) < Duration::from_millis(500), "/health p99 {:?}", p(0.99));
}
