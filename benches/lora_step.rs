//! Decode at batch 32 on the 110M-shape Llama (CPU, 64 tokens of context
//! per row; f32 weights and bf16 weights) with: no adapter; one adapter
//! shared by every row; 32 distinct adapters, one per row (r=16 on q, k,
//! v, o). The target is 32 distinct adapters within 20% of the no-adapter
//! throughput.

use std::sync::Arc;

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lifelora::lora::init::{fresh_adapter, FreshSpec, InitB};
use lifelora::lora::{batched, AdapterSegment, LoraAdapter};
use lifelora::model::builtin::{llama_110m_config, random_llama};
use lifelora::model::llama::{LogitsWanted, SequenceInput};
use lifelora::model::parallel::Pool;

const CONTEXT: usize = 64;
const BATCH: usize = 32;

fn bench_lora(c: &mut Criterion) {
    bench_dtype(c, DType::F32, "lora_decode_110m_f32_b32", true);
    bench_dtype(c, DType::BF16, "lora_decode_110m_bf16_b32", true);
}

fn bench_dtype(c: &mut Criterion, dtype: DType, name: &str, with_delta_alone: bool) {
    let model = random_llama(&llama_110m_config(), 1, dtype, &Device::Cpu).expect("model");
    let sites = model.lora_sites();
    let adapter = |seed| {
        let spec = FreshSpec {
            targets: &["q_proj", "k_proj", "v_proj", "o_proj"],
            rank: 16,
            alpha: 32.0,
            seed,
            init_b: InitB::Random,
        };
        Arc::new(fresh_adapter(&sites, &spec, model.adapter_dtype(), &Device::Cpu).expect("adapter"))
    };
    let shared = adapter(0);
    let distinct: Vec<Arc<LoraAdapter>> = (0..BATCH as u64).map(|i| adapter(100 + i)).collect();
    let cases: [(&str, Vec<Option<Arc<LoraAdapter>>>); 3] = [
        ("none", vec![None; BATCH]),
        ("shared", vec![Some(shared); BATCH]),
        ("distinct32", distinct.into_iter().map(Some).collect()),
    ];

    // The delta alone, for the fused q/k/v projection of one layer.
    if with_delta_alone {
        let mut delta_group = c.benchmark_group(format!("lora_delta_qkv_b32_{dtype:?}"));
        delta_group.sample_size(20);
        let x = candle_core::Tensor::randn(0f32, 1.0, (BATCH, 768), &Device::Cpu).expect("x");
        let parts = [("q_proj", 768), ("k_proj", 768), ("v_proj", 768)];
        for (name, adapters) in &cases[1..] {
            let segments: Vec<AdapterSegment> = adapters
                .iter()
                .enumerate()
                .map(|(i, a)| AdapterSegment {
                    start: i,
                    len: 1,
                    adapter: a.clone(),
                })
                .collect();
            delta_group.bench_function(BenchmarkId::new("grouped", name), |b| {
                b.iter(|| batched::delta(&x, 3, &parts, &segments, Pool::Rayon).expect("delta"))
            });
            delta_group.bench_function(BenchmarkId::new("per_segment", name), |b| {
                b.iter(|| batched::per_segment_delta(&x, 3, &parts, &segments).expect("delta"))
            });
        }
        delta_group.finish();
    }

    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(2));
    group.measurement_time(std::time::Duration::from_secs(8));
    group.throughput(Throughput::Elements(BATCH as u64));
    let prompt: Vec<u32> = (0..CONTEXT as u32).map(|i| (i * 101) % 32000).collect();
    let token = [42u32];
    for (name, adapters) in cases {
        let mut caches: Vec<_> = (0..BATCH).map(|_| model.new_cache()).collect();
        for (cache, a) in caches.iter_mut().zip(&adapters) {
            let mut input = [SequenceInput {
                tokens: &prompt,
                cache,
                logits: LogitsWanted::Last,
            }];
            model
                .forward_with_adapters(&mut input, std::slice::from_ref(a))
                .expect("prefill");
        }
        group.bench_function(BenchmarkId::new("decode", name), |b| {
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
                model
                    .forward_with_adapters(&mut inputs, &adapters)
                    .expect("decode")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_lora);
criterion_main!(benches);
