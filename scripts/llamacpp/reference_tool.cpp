// llama.cpp on the reference prompts (built by reproduce_reference.sh): greedy completions,
// top-5 log-probabilities, and optionally every intermediate tensor of one prompt.
// Reproduce the reference: prompt in one batch, then greedy one token at a time.
// Optionally dump named tensors of the prompt pass (case DUMP_CASE) to DUMP_DIR.
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <string>
#include <vector>
#include <sstream>
#include <fstream>
#include <algorithm>

static const char * dump_dir = nullptr;
static bool dumping = false;
static bool cb(struct ggml_tensor * t, bool ask, void *) {
    if (!dumping || !dump_dir) return false;
    if (ask) return true;
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) return true;
    std::string name = std::string(dump_dir) + "/" + t->name + ".bin";
    for (auto & c : name) if (c == ' ') c = '_';
    std::vector<float> buf(ggml_nelements(t));
    ggml_backend_tensor_get(t, buf.data(), 0, ggml_nbytes(t));
    FILE * f = fopen(name.c_str(), "wb");
    int64_t ne[4] = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]};
    fwrite(ne, sizeof(ne), 1, f);
    fwrite(buf.data(), 4, buf.size(), f);
    fclose(f);
    return true;
}

int main(int argc, char ** argv) {
    const char * model_path = argv[1];
    const char * cases_path = argv[2];
    int fa = argc > 3 ? atoi(argv[3]) : -1;
    dump_dir = getenv("DUMP_DIR");
    int dump_case = getenv("DUMP_CASE") ? atoi(getenv("DUMP_CASE")) : -1;
    llama_backend_init();
    auto mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(model_path, mp);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    int nv = llama_vocab_n_tokens(vocab);
    std::ifstream in(cases_path);
    std::string line;
    int ci = 0;
    while (std::getline(in, line)) {
        auto cp = llama_context_default_params();
        cp.n_ctx = 512; cp.n_batch = 512; cp.n_ubatch = 512;
        cp.n_threads = 2; cp.n_threads_batch = 2;
        if (fa >= 0) cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cp.cb_eval = cb; cp.cb_eval_user_data = nullptr;
        llama_context * ctx = llama_init_from_model(model, cp);
        auto bar = line.find('|');
        std::vector<llama_token> prompt, ref;
        { std::istringstream s(line.substr(0, bar)); int x; while (s >> x) prompt.push_back(x); }
        { std::istringstream s(line.substr(bar + 1)); int x; while (s >> x) ref.push_back(x); }
        dumping = (ci == dump_case);
        llama_batch b = llama_batch_get_one(prompt.data(), prompt.size());
        if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
        dumping = false;
        printf("case %d\n", ci);
        std::vector<llama_token> out;
        for (int step = 0; step < (int)ref.size(); step++) {
            float * lg = llama_get_logits_ith(ctx, -1);
            double mx = -1e30; for (int i = 0; i < nv; i++) mx = std::max(mx, (double)lg[i]);
            double sum = 0; for (int i = 0; i < nv; i++) sum += exp(lg[i] - mx);
            std::vector<int> idx(nv); for (int i = 0; i < nv; i++) idx[i] = i;
            std::partial_sort(idx.begin(), idx.begin() + 5, idx.end(), [&](int a, int c) { return lg[a] > lg[c]; });
            printf("%d:", step);
            for (int k = 0; k < 5; k++) printf(" %d %.6f", idx[k], lg[idx[k]] - mx - log(sum));
            printf("\n");
            llama_token next = idx[0];
            out.push_back(next);
            llama_batch nb = llama_batch_get_one(&next, 1);
            if (llama_decode(ctx, nb)) { fprintf(stderr, "decode failed\n"); return 1; }
        }
        printf("greedy:"); for (auto t : out) printf(" %d", t); printf("\n");
        llama_free(ctx);
        ci++;
    }
    llama_model_free(model);
    return 0;
}
