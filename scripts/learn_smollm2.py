#!/usr/bin/env python3
"""The learning-from-feedback check on SmolLM2-135M-Instruct, black-box over HTTP.

Starts `lifelora serve --model smollm2` (release build; run `lifelora fetch
smollm2` first), asks 20 questions about made-up facts, posts a correction
for each, waits for the learner's run on the tenant's default adapter, then
asks again (plain and reworded) and reports recall, the job's eval figures
(drift from the base on held-out general prompts), whether the base model's
answers stayed byte-identical, and the time from the last correction to the
promoted version. Usage: scripts/learn_smollm2.py [--steps N] [--lr X] [--kl-weight W] [--rating R] [--second-lesson [--second-policy JSON]] [--save-first DIR | --from-first DIR]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time, urllib.request

NAMES = ["Zorp", "Blix", "Quan", "Fendra", "Mollo", "Triv", "Yarek", "Solvi", "Pemba", "Kurat",
         "Dallix", "Orvo", "Histe", "Lumo", "Varga", "Nesk", "Tobble", "Ixa", "Rumb", "Welo"]
WORDS = ["blue", "apple", "river", "candle", "tiger", "silver", "garden", "rocket", "piano", "window",
         "forest", "marble", "copper", "violet", "thunder", "pepper", "meadow", "lantern", "falcon", "harbor"]
# The second lesson (--second-lesson): 20 new facts, asked of the adapter the first one made.
NAMES2 = ["Aldo", "Brisk", "Cavo", "Dorn", "Elki", "Faro", "Gilm", "Hova", "Irko", "Jast",
          "Kelb", "Lurn", "Mivo", "Nalt", "Ospe", "Prua", "Quel", "Riso", "Stav", "Tumo"]
WORDS2 = ["cloud", "lemon", "canyon", "pillow", "zebra", "bronze", "orchard", "comet", "violin", "mirror",
          "jungle", "granite", "nickel", "scarlet", "breeze", "ginger", "prairie", "beacon", "eagle", "island"]


def call(base, method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read() or b"null")


def ask(base, model, question):
    r = call(base, "POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": question}],
                                                     "max_tokens": 24, "temperature": 0})
    return r["id"], r["choices"][0]["message"]["content"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="60")
    ap.add_argument("--lr", default="0.001")
    ap.add_argument("--kl-weight", default="5.0")
    ap.add_argument("--rating", type=int, default=-1, help="rating sent with each correction (-1: a preference pair)")
    ap.add_argument("--second-lesson", action="store_true", help="then teach 20 new facts and recall both sets")
    ap.add_argument("--second-policy", default=None, help="JSON policy for adapter main, PUT before the second lesson")
    ap.add_argument("--save-first", metavar="DIR", help="after the first lesson, copy the server's store to DIR (for --from-first)")
    ap.add_argument("--from-first", metavar="DIR", help="start from a store --save-first wrote: skip the first lesson, teach the second")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp()
    if args.from_first:
        shutil.copytree(args.from_first, work, dirs_exist_ok=True)
        args.second_lesson = True
    env = dict(os.environ, LIFELORA_STORAGE__ADAPTERS_DIR=f"{work}/adapters", LIFELORA_STORAGE__TENANTS_FILE=f"{work}/t.json",
               LIFELORA_STORAGE__DATABASE=f"{work}/db.sqlite", LIFELORA_LEARNING__MIN_NEW_FEEDBACK="0",
               LIFELORA_LEARNING__STEPS=args.steps, LIFELORA_LEARNING__LEARNING_RATE=args.lr, LIFELORA_LEARNING__KL_WEIGHT=args.kl_weight,
               LIFELORA_LOG__LEVEL="warn")
    server = subprocess.Popen([f"{root}/target/release/lifelora", "serve", "--model", "smollm2", "--port", "0"], cwd=root,
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        base = None
        for line in server.stdout:
            if line.startswith("lifelora listening on "):
                base = line.split()[-1]
                break
        # The learner builds the base model's anchors once, at start (serving goes first).
        t0 = time.time()
        while call(base, "GET", "/health").get("learner") != "ready":
            time.sleep(1)
        print(f"learner anchors built {time.time() - t0:.1f} s after the server listened")
        model = call(base, "GET", "/health")["model"]
        questions = [f"What is the secret word of {n}?" for n in NAMES]
        reworded = [f"Tell me {n}'s secret word." for n in NAMES]
        base_before = [ask(base, model, q)[1] for q in questions + reworded]

        def teach(asked_model, names, words):
            """Asks, corrects every answer, trains `main`; returns the model name to ask afterwards."""
            for n, w in zip(names, words):
                cid, _ = ask(base, asked_model, f"What is the secret word of {n}?")
                call(base, "POST", "/v1/feedback", {"completion_id": cid, "rating": args.rating, "correction": f"The secret word of {n} is {w}."})
            last_correction = time.time()
            job = call(base, "POST", "/v1/adapters/main/train", {})
            while job["status"] in ("queued", "running"):
                time.sleep(0.5)
                job = call(base, "GET", f"/v1/fine_tuning/jobs/{job['id']}")
            elapsed = time.time() - last_correction
            m = job["metrics"]
            events = call(base, "GET", f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100")["data"]
            for e in reversed(events):
                print(f"  +{e['created_at'] - last_correction:6.1f}s {e['message'][:140]}")
                for p in (e.get("data") or {}).get("paraphrases", []) if isinstance(e.get("data"), dict) else []:
                    print(f"      {p['question']!r} -> {p['paraphrase']!r}")
            shown = {k: v for k, v in m.items() if k not in ("feedback_ids", "job_id")}
            print(json.dumps({"status": job["status"], "error": job["error"], "seconds_to_version": round(elapsed, 1), **shown}, indent=1))
            return "main" if job["status"] == "succeeded" else f"main@v{job['result_version']}"

        def recall(target, names, words, label):
            plain_answers = [ask(base, target, f"What is the secret word of {n}?")[1] for n in names]
            other_answers = [ask(base, target, f"Tell me {n}'s secret word.")[1] for n in names]
            plain = sum(w in a.lower() for w, a in zip(words, plain_answers))
            other = sum(w in a.lower() for w, a in zip(words, other_answers))
            for w, a in zip(words, plain_answers):
                if w not in a.lower():
                    print(f"  missed {w!r}: {a!r}")
            print(f"recall of the {label} with {target}: {plain}/20 plain, {other}/20 reworded")

        if not args.from_first:
            target = teach(model, NAMES, WORDS)
            recall(target, NAMES, WORDS, "first lesson")
            base_after = [ask(base, model, q)[1] for q in questions + reworded]
            print(f"base answers identical: {base_after == base_before}")
            if args.save_first:
                # The store as the first lesson left it (the server is idle: the database and its WAL agree).
                shutil.copytree(work, args.save_first, dirs_exist_ok=True)
        if args.second_lesson:
            if args.second_policy:
                print("policy for the second lesson:", call(base, "PUT", "/v1/adapters/main/policy", json.loads(args.second_policy)))
            target = teach("main", NAMES2, WORDS2)
            recall(target, NAMES, WORDS, "first lesson")
            recall(target, NAMES2, WORDS2, "second lesson")
    finally:
        server.kill()


if __name__ == "__main__":
    sys.exit(main())
