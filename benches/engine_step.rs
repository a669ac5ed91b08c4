//! One engine step of the 110M-shape Llama (hidden 768, intermediate 2048,
//! 12 layers, 12 heads, vocab 32000) on CPU: decode at batch 1, 8, 32 (64
//! tokens of context each) and prefill of 128 and 512 tokens, with f32
//! weights and with bf16 weights (`--dtype bf16`: the bf16 dot-product
//! kernel where the CPU has one). Throughput is in tokens per second.

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lifelora::model::builtin::{llama_110m_config, random_llama};
use lifelora::model::llama::{LogitsWanted, SequenceInput};

const CONTEXT: usize = 64;

fn bench_step(c: &mut Criterion) {
    bench_dtype(c, DType::F32, "engine_step_110m_f32");
    bench_dtype(c, DType::BF16, "engine_step_110m_bf16");
}

fn bench_dtype(c: &mut Criterion, dtype: DType, name: &str) {
    let model = random_llama(&llama_110m_config(), 1, dtype, &Device::Cpu).expect("model");
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(2));
    group.measurement_time(std::time::Duration::from_secs(8));

    for batch in [1usize, 8, 32] {
        let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
        let prompt: Vec<u32> = (0..CONTEXT as u32).map(|i| (i * 101) % 32000).collect();
        for cache in caches.iter_mut() {
            model
                .forward(&mut [SequenceInput {
                    tokens: &prompt,
                    cache,
                    logits: LogitsWanted::Last,
                }])
                .expect("prefill");
        }
        let token = [42u32];
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("decode", batch), |b| {
            b.iter(|| {
                let mut inputs: Vec<SequenceInput> = caches
                    .iter_mut()
                    .map(|cache| {
                        cache.truncate(CONTEXT);
                        SequenceInput {
                            tokens: &token,
                            cache,
                            logits: LogitsWanted::Last,
                        }
                    })
                    .collect();
                model.forward(&mut inputs).expect("decode")
            })
        });
    }

    for len in [128usize, 512] {
        let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 7919) % 32000).collect();
        let mut cache = model.new_cache();
        group.throughput(Throughput::Elements(len as u64));
        group.bench_function(BenchmarkId::new("prefill", len), |b| {
            b.iter(|| {
                cache.truncate(0);
                model
                    .forward(&mut [SequenceInput {
                        tokens: &prompt,
                        cache: &mut cache,
                        logits: LogitsWanted::Last,
                    }])
                    .expect("prefill")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
