#!/usr/bin/env bash
# Builds llama.cpp from the llama-cpp-python sdist on PyPI (the registry is
# the only network this project uses) and reruns llama.cpp on the six
# reference prompts: greedy completions and top-5 log-probabilities per
# position (compare with tests/fixtures/smollm2/llamacpp_reference.json),
# optionally dumping every intermediate tensor of one prompt's pass, which
# is how `src/model/ggml_numerics.rs` was checked op by op.
#
# Usage: scripts/llamacpp/reproduce_reference.sh [FLASH_ATTN (1|0)] [DUMP_CASE]
# Needs gcc/g++ and pip (cmake and ninja come from PyPI). ~10 min on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="${LLAMACPP_WORK:-$root/target/llamacpp}"
version=0.3.36
fa="${1:-1}"
mkdir -p "$work" && cd "$work"
if [ ! -d "llama_cpp_python-$version" ]; then
  # The sdist from PyPI's JSON API (pip download would try to build it).
  python3 - "$version" <<'PY'
import json, sys, urllib.request
meta = json.load(urllib.request.urlopen("https://pypi.org/pypi/llama-cpp-python/json", timeout=60))
files = meta.get("releases", {}).get(sys.argv[1]) or meta["urls"]
url = next(f["url"] for f in files if f["filename"] == f"llama_cpp_python-{sys.argv[1]}.tar.gz")
# Some mirrors answer with paths relative to the JSON API.
if url.startswith("../../packages/"):
    url = "https://files.pythonhosted.org/" + url[len("../../packages/"):]
urllib.request.urlretrieve(url, f"llama_cpp_python-{sys.argv[1]}.tar.gz")
PY
  tar xzf "llama_cpp_python-$version.tar.gz"
fi
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
command -v cmake >/dev/null || pip install -q cmake ninja
if [ ! -f "$src/build/src/libllama.a" ]; then
  cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
  cmake --build "$src/build" --target llama
fi
g++ -O2 -std=c++17 "$root/scripts/llamacpp/reference_tool.cpp" -I"$src/include" -I"$src/ggml/include" -o reference_tool \
  "$src/build/src/libllama.a" "$src/build/ggml/src/libggml.a" "$src/build/ggml/src/libggml-cpu.a" "$src/build/ggml/src/libggml-base.a" \
  -lpthread -lgomp -ldl -lm
python3 - "$root/tests/fixtures/smollm2/llamacpp_reference.json" > cases.txt <<'PY'
import json, sys
for c in json.load(open(sys.argv[1]))["cases"]:
    print(" ".join(map(str, c["prompt_token_ids"])), "|", " ".join(map(str, c["completion_token_ids"])))
PY
if [ -n "${2:-}" ]; then export DUMP_DIR="$work/dump$2" DUMP_CASE="$2"; mkdir -p "$DUMP_DIR"; fi
./reference_tool "$root/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" cases.txt "$fa" 2>/dev/null > run.txt
# Against the reference: greedy tokens in agreement, and the largest
# top-5 log-probability difference over that prefix.
python3 - "$root/tests/fixtures/smollm2/llamacpp_reference.json" run.txt <<'PY'
import json, re, sys
ref = json.load(open(sys.argv[1]))["cases"]
tops, greedy, case = {}, {}, -1
for line in open(sys.argv[2]):
    if line.startswith("case"):
        case = int(line.split()[1]); tops[case] = []
    elif line.startswith("greedy:"):
        greedy[case] = list(map(int, line.split()[1:]))
    elif re.match(r"^\d+:", line):
        v = line.split(":")[1].split()
        tops[case].append([(int(v[i]), float(v[i + 1])) for i in range(0, 10, 2)])
for c, r in enumerate(ref):
    same = next((i for i, (a, b) in enumerate(zip(greedy[c], r["completion_token_ids"])) if a != b), len(greedy[c]))
    d = [abs(a[1] - b[1]) for p in range(same) for a, b in zip(tops[c][p], r["top_logprobs"][p])]
    print(f"prompt {c}: greedy agrees for {same} of {len(greedy[c])} tokens; max |d logprob| {max(d) if d else 0:.2e}")
PY
