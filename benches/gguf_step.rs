//! One engine step of SmolLM2-135M-Instruct Q4_1 (the GGUF `lifelora fetch
//! smollm2` gets): decode at batch 1 and 32 (64 tokens of context each) and
//! prefill of 512 tokens, in tokens per second. Skips when not fetched.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lifelora::model::gguf::load_gguf;
use lifelora::model::llama::{LogitsWanted, SequenceInput};

const CONTEXT: usize = 64;

fn bench_gguf(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("skipping: {} not fetched (lifelora fetch smollm2)", path.display());
        return;
    }
    let loaded = load_gguf(&path, None, &Device::Cpu).expect("load smollm2");
    let model = &loaded.model;
    let mut group = c.benchmark_group("gguf_step_smollm2_q4_1");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(2));
    group.measurement_time(std::time::Duration::from_secs(6));
    for batch in [1usize, 32] {
        let prompt: Vec<u32> = (0..CONTEXT as u32).map(|i| (i * 101) % 49152).collect();
        let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
        for cache in caches.iter_mut() {
            model.forward(&mut [SequenceInput { tokens: &prompt, cache, logits: LogitsWanted::Last }]).expect("prefill");
        }
        let token = [42u32];
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("decode", batch), |b| {
            b.iter(|| {
                let mut inputs: Vec<SequenceInput> = caches
                    .iter_mut()
                    .map(|cache| {
                        cache.truncate(CONTEXT);
                        SequenceInput { tokens: &token, cache, logits: LogitsWanted::Last }
                    })
                    .collect();
                model.forward(&mut inputs).expect("decode")
            })
        });
    }
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919) % 49152).collect();
    let mut cache = model.new_cache();
    group.throughput(Throughput::Elements(512));
    group.bench_function(BenchmarkId::new("prefill", 512), |b| {
        b.iter(|| {
            cache.truncate(0);
            model.forward(&mut [SequenceInput { tokens: &prompt, cache: &mut cache, logits: LogitsWanted::Last }]).expect("prefill")
        })
    });
    group.finish();
}

criterion_group!(benches, bench_gguf);
criterion_main!(benches);
