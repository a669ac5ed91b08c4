#!/usr/bin/env python3
"""Long-load soak: steady concurrency over 50 tenants' adapters, with feedback and training going on.

Starts `target/release/lifelora serve` on stories260K (tests/fixtures) with an admin key and a per-tenant
concurrency quota, creates 50 tenants each with an uploaded PEFT adapter (the q_v_r8 fixture), then
for --minutes keeps --concurrency clients busy: completions (plain and streamed) on a random tenant's
adapter or the base model, feedback on a third of them (ratings and corrections, which start training
runs by themselves every 20 items), and now and then a burst on one tenant to draw deliberate 429s.
Every minute it prints requests, errors by status, p50/p99 latency and the server's RSS; at the end a
summary: errors other than 429 (must be 0), RSS after warm-up (first vs last minute) and p99 drift.

Usage: scripts/soak.py [--minutes 20] [--concurrency 16] [--tenants 50]
"""
import argparse, json, os, random, statistics, subprocess, sys, tempfile, threading, time, urllib.error, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
ADMIN = "soak-admin-key-0123456789abcdef0123456789"


def request(base, method, path, key, body=None, raw=None, ctype="application/json", timeout=120):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, method=method, data=data, headers={"content-type": ctype, "authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def multipart(fields):
    b = b"soakboundary"
    out = b""
    for name, data in fields:
        out += b"--" + b + f'\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n\r\n'.encode() + data + b"\r\n"
    return out + b"--" + b + b"--\r\n", "multipart/form-data; boundary=soakboundary"


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tenants", type=int, default=50)
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    env = dict(os.environ, LIFELORA_AUTH__ADMIN_KEY=ADMIN, LIFELORA_STORAGE__ADAPTERS_DIR=f"{work}/adapters",
               LIFELORA_STORAGE__TENANTS_FILE=f"{work}/t.json", LIFELORA_STORAGE__DATABASE=f"{work}/db.sqlite",
               LIFELORA_LIMITS__MAX_CONCURRENT_PER_TENANT="4", LIFELORA_LEARNING__MIN_NEW_FEEDBACK="20",
               LIFELORA_LEARNING__STEPS="20", LIFELORA_LEARNING__MAX_BASE_DRIFT="100", LIFELORA_LEARNING__MIN_BASE_AGREEMENT="0",
               LIFELORA_LEARNING__MAX_REGRESSION="100", LIFELORA_LEARNING__WATCH_WINDOW="0", LIFELORA_LOG__LEVEL="warn")
    server = subprocess.Popen([f"{ROOT}/target/release/lifelora", "serve", "--model", f"{FIXTURES}/stories260K", "--port", "0"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    base = None
    for line in server.stdout:
        if line.startswith("lifelora listening on "):
            base = line.split()[-1]
            break
    threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
    try:
        fixture = f"{FIXTURES}/adapters/q_v_r8"
        config, weights = open(f"{fixture}/adapter_config.json", "rb").read(), open(f"{fixture}/adapter_model.safetensors", "rb").read()
        keys = {}
        for i in range(args.tenants):
            name = f"t{i:02d}"
            st, body = request(base, "POST", "/v1/tenants", ADMIN, {"name": name})
            assert st == 201, body
            keys[name] = json.loads(body)["api_key"]
            raw, ctype = multipart([("name", b"bot"), ("config", config), ("weights", weights)])
            st, body = request(base, "POST", "/v1/adapters", keys[name], raw=raw, ctype=ctype)
            assert st == 201, body
        model = json.loads(request(base, "GET", "/v1/models", keys["t00"])[1])["data"][0]["id"]
        stop_at = time.time() + args.minutes * 60
        lock = threading.Lock()
        minute = {"lat": [], "status": {}}
        totals = {"status": {}, "requests": 0}

        def record(status, secs):
            with lock:
                minute["lat"].append(secs)
                minute["status"][status] = minute["status"].get(status, 0) + 1
                totals["status"][status] = totals["status"].get(status, 0) + 1
                totals["requests"] += 1

        def client(seed):
            rng = random.Random(seed)
            while time.time() < stop_at:
                tenant = rng.choice(list(keys))
                key = keys[tenant]
                burst = rng.random() < 0.02
                target = model if rng.random() < 0.3 else "bot"
                body = {"model": target, "prompt": [1] + [rng.randrange(3, 500) for _ in range(rng.randrange(4, 40))],
                        "max_tokens": rng.randrange(8, 48), "temperature": rng.choice([0, 0.8]), "stream": rng.random() < 0.3}
                if burst:
                    # Deliberate: more requests at once than the tenant's quota of 4.
                    ts = [threading.Thread(target=lambda: record(request(base, "POST", "/v1/completions", key, dict(body, stream=False))[0], 0)) for _ in range(8)]
                    [t.start() for t in ts]
                    [t.join() for t in ts]
                    continue
                t0 = time.time()
                st, resp = request(base, "POST", "/v1/completions", key, body)
                record(st, time.time() - t0)
                if st == 200 and not body["stream"] and rng.random() < 0.33:
                    cid = json.loads(resp)["id"]
                    fb = {"completion_id": cid, "rating": rng.choice([1, -1])}
                    if rng.random() < 0.3:
                        fb["correction"] = "once upon a time"
                    t0 = time.time()
                    st, _ = request(base, "POST", "/v1/feedback", key, fb)
                    record(st, time.time() - t0)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
        [t.start() for t in threads]
        rows = []
        started = time.time()
        while time.time() < stop_at:
            time.sleep(max(0, min(60, stop_at - time.time())))
            with lock:
                lat, status = sorted(minute["lat"]) or [0], dict(minute["status"])
                minute["lat"], minute["status"] = [], {}
            q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
            row = {"minute": round((time.time() - started) / 60, 1), "requests": sum(status.values()), "status": status,
                   "p50_ms": round(q(0.5) * 1000), "p99_ms": round(q(0.99) * 1000), "rss_mb": round(rss_kb(server.pid) / 1024, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        [t.join() for t in threads]
        jobs = json.loads(request(base, "GET", "/v1/fine_tuning/jobs?limit=100", keys["t00"])[1])
        bad = {s: n for s, n in totals["status"].items() if s not in (200, 202, 429)}
        warm = rows[min(2, len(rows) - 1)]
        summary = {"minutes": args.minutes, "requests": totals["requests"], "status": totals["status"], "errors_besides_429": bad,
                   "rss_mb_after_warmup": warm["rss_mb"], "rss_mb_last": rows[-1]["rss_mb"],
                   "p99_ms_after_warmup": warm["p99_ms"], "p99_ms_last": rows[-1]["p99_ms"],
                   "p99_ms_median": statistics.median(r["p99_ms"] for r in rows[2:] or rows),
                   "jobs_of_t00": [j["status"] for j in jobs["data"]]}
        print("summary:", json.dumps(summary), flush=True)
        return 0 if not bad else 1
    finally:
        server.kill()


if __name__ == "__main__":
    sys.exit(main())
