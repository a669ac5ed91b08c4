#!/usr/bin/env python3
"""The learning benchmark: lessons from feedback on generated fact sets, black-box over HTTP.

Generates fact sets from a seed (made-up names and values in several shapes:
a person's code word, a product's price, an office's city, a colleague's
role, a project's deadline; each shape with its own question templates,
correction wording and rewordings). For each set, on a fresh tenant of one
server: asks 20 questions, posts a correction for each answer, waits for the
learner's run, then teaches 20 new facts of the same shape (the first ones
replayed) and measures:

  outcome            the job's status (promoted or rejected, with its error)
  recall             answers that state the fact, asked as taught (of 20)
  reworded           answers that state the fact, asked in other words
  kept               the first lesson's recall after the second lesson
  kl, top1           drift from the base as the learner measured it
  http_kl, http_top1 an independent teacher-forced measure over HTTP: the
                     base's greedy answers to general prompts of this script,
                     scored by the adapter (echo log-probabilities, top 20)
  secs               seconds from the last correction to the promoted version
  base_same          the base model's answers byte-identical before and after

and the minimum and median over sets. Usage:
  scripts/bench_learning.py [--sets 8] [--facts 20] [--seed 1] [--model smollm2] [--json OUT] [--env KEY=VALUE ...]
Needs a release build (cargo build --release) and `lifelora fetch smollm2`.
"""
import argparse, json, math, os, random, statistics, subprocess, sys, tempfile, time, urllib.error, urllib.request

ADMIN = "bench-learning-admin-key-0123456789abcdef"

SYLLABLES = ["ka", "lo", "mi", "ran", "tu", "vel", "zor", "bri", "den", "fa", "gor", "hul", "is", "jen", "kor", "lum",
             "mar", "nek", "ol", "pra", "quin", "ros", "sil", "tam", "ur", "vin", "wex", "yor", "zen", "bal", "cor", "dru"]


def made_up(rng, syllables=2):
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


# Each shape: what a fact is about, the values, how it is asked (as taught, and reworded), and the correction.
SHAPES = {
    "code_word": {
        "subject": lambda rng: made_up(rng),
        "values": ["amber", "basil", "cobalt", "dahlia", "ember", "fjord", "glacier", "hazel", "indigo", "juniper", "kestrel",
                   "lotus", "mosaic", "nectar", "onyx", "pebble", "quartz", "raven", "saffron", "tundra", "umber", "velvet",
                   "willow", "yarrow", "zephyr", "acorn", "bramble", "cinder", "drift", "echo", "fable", "garnet", "harvest",
                   "ivory", "jasper", "kelp", "lichen", "marigold", "nimbus", "orchid"],
        "ask": ["What is the code word of {s}?", "What code word does {s} use?"],
        "reworded": ["Tell me {s}'s code word.", "Which code word belongs to {s}?"],
        "correct": ["The code word of {s} is {v}.", "{s}'s code word is {v}."],
    },
    "price": {
        "subject": lambda rng: made_up(rng) + " " + rng.choice(["lamp", "kettle", "backpack", "chair", "clock", "blender", "scarf", "drone"]),
        "values": [f"{d} dollars" for d in [12, 17, 23, 29, 34, 38, 41, 46, 52, 57, 63, 68, 71, 76, 84, 89, 93, 97, 104, 118, 125, 133,
                                            142, 156, 163, 177, 181, 194, 205, 219, 228, 236, 247, 253, 264, 279, 285, 299, 312, 327]],
        "ask": ["How much does the {s} cost?", "What is the price of the {s}?"],
        "reworded": ["What does the {s} sell for?", "Tell me the price of the {s}."],
        "correct": ["The {s} costs {v}.", "The price of the {s} is {v}."],
    },
    "office_city": {
        "subject": lambda rng: made_up(rng) + " " + rng.choice(["Labs", "Systems", "Foods", "Logistics", "Studios", "Motors"]),
        "values": ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Tbilisi", "Perth", "Bergen", "Porto", "Accra",
                   "Krakow", "Cusco", "Valletta", "Tallinn", "Riga", "Seville", "Bruges", "Geneva", "Hobart", "Kyoto", "Lyon",
                   "Malaga", "Naples", "Odessa", "Padua", "Quebec", "Salzburg", "Tampere", "Utrecht", "Verona", "Zagreb",
                   "Aarhus", "Bilbao", "Cork", "Dresden", "Exeter", "Florence", "Graz"],
        "ask": ["In which city is the office of {s}?", "Where is {s}'s office?"],
        "reworded": ["Which city hosts the office of {s}?", "Name the city where {s} has its office."],
        "correct": ["The office of {s} is in {v}.", "{s} has its office in {v}."],
    },
    "role": {
        "subject": lambda rng: made_up(rng) + " " + made_up(rng, 1),
        "values": ["chief archivist", "night editor", "lead welder", "head baker", "tax auditor", "route planner", "data steward",
                   "stage manager", "quality inspector", "field geologist", "sound engineer", "fleet manager", "grant writer",
                   "lab technician", "tour guide", "menu designer", "bridge inspector", "payroll clerk", "signal operator",
                   "seed curator", "map maker", "glass blower", "court reporter", "dock master", "bee keeper", "wine taster",
                   "clock repairer", "ice sculptor", "kite designer", "rope maker", "salt miner", "tea blender", "toy tester",
                   "bell ringer", "cheese grader", "dye mixer", "fire warden", "gate keeper", "hat maker", "ink chemist"],
        "ask": ["What is {s}'s role at work?", "What job does {s} do?"],
        "reworded": ["Tell me what {s} does for a living.", "Which role does {s} have?"],
        "correct": ["{s} works as a {v}.", "{s}'s role is {v}."],
    },
    "deadline": {
        "subject": lambda rng: "project " + made_up(rng),
        "values": [f"{m} {d}" for m, d in zip(["March", "July", "October", "January", "May", "August", "December", "April"] * 5,
                                              [3, 9, 14, 21, 27, 5, 11, 18, 24, 30, 2, 8, 13, 19, 26, 4, 10, 16, 22, 28,
                                               6, 12, 17, 23, 29, 1, 7, 15, 20, 25, 3, 9, 14, 21, 27, 5, 11, 18, 24, 31])],
        "ask": ["When is the deadline of {s}?", "What is the due date of {s}?"],
        "reworded": ["By which date must {s} be finished?", "Tell me when {s} is due."],
        "correct": ["The deadline of {s} is {v}.", "{s} is due on {v}."],
    },
}

# General prompts of this script's own (none of them the learner's): the base's greedy answers to these are scored.
GENERAL = [
    "What is the capital of Italy?", "Give me a short tip for staying focused.", "How does rain form?",
    "Write one sentence about the mountains.", "What is 9 times 6?", "Name two animals that live in the ocean.",
    "Why is reading good for you?", "Describe a dog in one sentence.", "What does a compass show?",
    "How many months have 31 days?", "Suggest a name for a pet rabbit.", "What is the opposite of fast?",
    "Explain what an adjective is.", "What do spiders make?", "Give an example of a red fruit.",
    "At what temperature does ice melt in Fahrenheit?", "Write a polite way to ask for help.", "Why do we dream?",
    "What causes thunder?", "Name a famous composer.", "How do you make toast?", "What is the smallest planet?",
    "What language is spoken in Mexico?", "Tell me a fun fact about owls.",
]


def rss_mib(pid):
    """The server's resident memory now and at its peak, in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def call(base, method, path, body=None, key=None, timeout=900):
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:300]!r}") from None


def ask(base, key, model, question, max_tokens=32):
    r = call(base, "POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": question}],
                                                     "max_tokens": max_tokens, "temperature": 0}, key)
    return r["id"], r["choices"][0]["message"]["content"]


def states(answer, value):
    return value.lower() in answer.lower()


def make_set(seed, shape_name, facts):
    rng = random.Random(seed)
    shape = SHAPES[shape_name]
    subjects, seen = [], set()
    while len(subjects) < 2 * facts:
        s = shape["subject"](rng)
        if s not in seen:
            seen.add(s)
            subjects.append(s)
    values = rng.sample(shape["values"], 2 * facts) if len(shape["values"]) >= 2 * facts else [rng.choice(shape["values"]) for _ in range(2 * facts)]
    lessons = []
    for half in (0, 1):
        lesson = []
        for s, v in zip(subjects[half * facts:(half + 1) * facts], values[half * facts:(half + 1) * facts]):
            lesson.append({
                "subject": s, "value": v,
                "ask": rng.choice(shape["ask"]).format(s=s),
                "reworded": rng.choice(shape["reworded"]).format(s=s),
                "correct": rng.choice(shape["correct"]).format(s=s, v=v),
            })
        lessons.append(lesson)
    return lessons


def general_reference(base, key, model):
    """The base's greedy answers to GENERAL: (prompt ids as the chat template renders them, answer ids)."""
    refs = []
    for q in GENERAL:
        r = call(base, "POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": q}],
                                                         "max_tokens": 24, "temperature": 0, "return_token_ids": True}, key)
        refs.append((r["prompt_token_ids"], r["choices"][0]["token_ids"]))
    return refs


def teacher_forced_drift(base, key, base_model, adapter, refs):
    """Mean KL(base || adapter) over the base's own answer tokens (each side's top 20 plus a rest bucket) and
    top-1 agreement (the adapter's most likely token is the base's greedy one), scored with echo over HTTP:
    a measure independent of the learner's."""
    kls, agree, n = [], 0, 0
    for prompt_ids, answer_ids in refs:
        ids = prompt_ids + answer_ids
        scored = {}
        for model in (base_model, adapter):
            r = call(base, "POST", "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 20}, key)
            scored[model] = r["choices"][0]["logprobs"]["top_logprobs"][len(prompt_ids):]
        for pb, pa in zip(scored[base_model], scored[adapter]):
            if not pb or not pa:
                continue
            n += 1
            agree += max(pb, key=pb.get) == max(pa, key=pa.get)
            rest_a = max(1e-12, 1.0 - sum(math.exp(v) for v in pa.values()))
            floor_a = math.log(rest_a / 1000.0)
            kl = sum(math.exp(lb) * (lb - pa.get(t, floor_a)) for t, lb in pb.items())
            rest_b = 1.0 - sum(math.exp(v) for v in pb.values())
            if rest_b > 1e-9:
                kl += rest_b * (math.log(rest_b) - math.log(rest_a))
            kls.append(max(0.0, kl))
    return (sum(kls) / max(1, len(kls)), agree / max(1, n))


def wait_job(base, key, model_name, timeout=1800):
    started = time.time()
    while True:
        jobs = call(base, "GET", f"/v1/fine_tuning/jobs?adapter={model_name}&limit=1", key=key)["data"]
        if jobs and jobs[0]["status"] in ("succeeded", "failed", "cancelled"):
            return jobs[0]
        if time.time() - started > timeout:
            raise RuntimeError("the job did not finish")
        time.sleep(0.5)


def run_set(base, model, index, shape, lessons, refs, args, pid):
    tenant = f"bench{index}"
    key = call(base, "POST", "/v1/tenants", {"name": tenant}, ADMIN)["api_key"]
    out = {"set": index, "shape": shape, "lessons": []}
    base_answers_before = [ask(base, key, model, f["ask"])[1] for f in lessons[0][:5]]
    asked_model = model
    for n, lesson in enumerate(lessons):
        for f in lesson:
            cid, _ = ask(base, key, asked_model, f["ask"])
            call(base, "POST", "/v1/feedback", {"completion_id": cid, "rating": -1, "correction": f["correct"]}, key)
        rss_before, _ = rss_mib(pid)
        t_last = time.time()
        call(base, "POST", "/v1/adapters/main/train", {}, key)
        job = wait_job(base, key, "main")
        secs = time.time() - t_last
        rss_after, peak = rss_mib(pid)
        promoted = job["status"] == "succeeded"
        asked_model = "main" if promoted or n == 1 else asked_model
        target = "main" if promoted else model
        m = job.get("metrics") or {}
        row = {
            "lesson": n + 1, "outcome": "promoted" if promoted else job["status"], "error": (job.get("error") or {}).get("message"),
            "recall": sum(states(ask(base, key, target, f["ask"])[1], f["value"]) for f in lesson),
            "reworded": sum(states(ask(base, key, target, f["reworded"])[1], f["value"]) for f in lesson),
            "kl": m.get("base_kl"), "top1": m.get("base_top1_agreement"),
            "kl_se": m.get("base_kl_se"), "top1_se": m.get("base_top1_agreement_se"),
            "secs": round(secs, 1), "steps": m.get("steps"), "final_steps": m.get("final_steps_on_all_examples"),
            "settle_steps": m.get("settle_steps"), "kl_weight_final": m.get("kl_weight_final"),
            "rss_before_mib": round(rss_before), "rss_after_mib": round(rss_after), "rss_peak_mib": round(peak),
        }
        if promoted:
            row["http_kl"], row["http_top1"] = teacher_forced_drift(base, key, model, "main", refs)
        if n == 1:
            row["kept"] = sum(states(ask(base, key, target, f["ask"])[1], f["value"]) for f in lessons[0])
        out["lessons"].append(row)
        print(json.dumps({"set": index, "shape": shape, **row}), flush=True)
    out["base_same"] = [ask(base, key, model, f["ask"])[1] for f in lessons[0][:5]] == base_answers_before
    return out


def summary(results):
    lines = ["| set | shape | lesson | outcome | recall | reworded | kept | KL (±se) | top-1 (±se) | HTTP KL | HTTP top-1 | s |", "|" + " --- |" * 12]
    for r in results:
        for l in r["lessons"]:
            se = lambda v, e: "-" if v is None else (f"{v:.3f}" + (f" ±{e:.3f}" if e is not None else ""))
            lines.append(f"| {r['set']} | {r['shape']} | {l['lesson']} | {l['outcome']} | {l['recall']}/20 | {l['reworded']}/20 | "
                         f"{l.get('kept', '-') if 'kept' in l else '-'} | {se(l['kl'], l.get('kl_se'))} | {se(l['top1'], l.get('top1_se'))} | "
                         f"{se(l.get('http_kl'), None)} | {se(l.get('http_top1'), None)} | {l['secs']} |")
    for lesson in (1, 2):
        rows = [l for r in results for l in r["lessons"] if l["lesson"] == lesson]
        for key in ("recall", "reworded", "kept", "kl", "top1", "http_kl", "http_top1", "secs", "rss_after_mib", "rss_peak_mib"):
            vals = [l[key] for l in rows if l.get(key) is not None]
            if vals:
                lines.append(f"lesson {lesson} {key}: min {min(vals):.3f}, median {statistics.median(vals):.3f}, max {max(vals):.3f}")
        lines.append(f"lesson {lesson} promoted: {sum(l['outcome'] == 'promoted' for l in rows)}/{len(rows)}")
    lines.append(f"base answers byte-identical on every set: {all(r['base_same'] for r in results)}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (e.g. LIFELORA_LEARNING__KL_WEIGHT=8)")
    ap.add_argument("--only", type=int, action="append", help="run only these set indices")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp()
    env = dict(os.environ, LIFELORA_STORAGE__ADAPTERS_DIR=f"{work}/adapters", LIFELORA_STORAGE__TENANTS_FILE=f"{work}/t.json",
               LIFELORA_STORAGE__DATABASE=f"{work}/db.sqlite", LIFELORA_LEARNING__MIN_NEW_FEEDBACK="0",
               LIFELORA_AUTH__ADMIN_KEY=ADMIN, LIFELORA_LOG__LEVEL="warn")
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    server = subprocess.Popen([f"{root}/target/release/lifelora", "serve", "--model", args.model, "--port", "0"], cwd=root,
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        base = None
        for line in server.stdout:
            if line.startswith("lifelora listening on "):
                base = line.split()[-1]
                break
        if base is None:
            sys.exit("the server did not start")
        while call(base, "GET", "/health").get("learner") != "ready":
            time.sleep(1)
        model = call(base, "GET", "/health")["model"]
        ref_key = call(base, "POST", "/v1/tenants", {"name": "reference"}, ADMIN)["api_key"]
        refs = general_reference(base, ref_key, model)
        shapes = list(SHAPES)
        results = []
        for i in range(args.sets):
            if args.only and i not in args.only:
                continue
            shape = shapes[i % len(shapes)]
            lessons = make_set(args.seed * 1000 + i, shape, args.facts)
            results.append(run_set(base, model, i, shape, lessons, refs, args, server.pid))
            if args.json:  # each finished set is kept, so a long run interrupted keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"results": results, "env": args.env}, f, indent=1)
        text = summary(results)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"results": results, "summary": text, "env": args.env}, f, indent=1)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
