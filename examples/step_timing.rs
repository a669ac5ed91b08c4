//! Times the two steps that matter on a CPU, for the busy-machine check:
//! a decode step of SmolLM2-135M-Instruct Q4_1 at batch 32 (64 tokens of
//! context each), a prefill of 128 tokens, and a learner training step
//! (4 chat lessons, LoRA r=8 on every projection, 2 KL anchors). Prints
//! the median of each, in milliseconds, as one JSON line; run it on a quiet
//! machine and beside a busy process (`scripts/bench_busy_machine`).
//! Usage: cargo run --release --example step_timing [ITERATIONS]

use std::time::Instant;

use candle_core::{DType, Device};
use lifelora::learner::sft::{KlAnchors, Lesson, SftExample, Trainer};
use lifelora::lora::init::{fresh_adapter, FreshSpec, InitB};
use lifelora::lora::trainable::TrainableLora;
use lifelora::model::chat::ChatMessage;
use lifelora::model::gguf::load_gguf;
use lifelora::model::llama::{LogitsWanted, SequenceInput};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iterations: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let loaded = load_gguf(&path, None, &Device::Cpu)?;
    let (model, tok, chat) = (&loaded.model, &loaded.tokenizer, &loaded.chat);

    let prompt: Vec<u32> = (0..64u32).map(|i| (i * 101) % 49152).collect();
    let mut caches: Vec<_> = (0..32).map(|_| model.new_cache()).collect();
    for cache in caches.iter_mut() {
        model.forward(&mut [SequenceInput { tokens: &prompt, cache, logits: LogitsWanted::Last }])?;
    }
    let token = [42u32];
    let mut decode = Vec::new();
    for _ in 0..iterations * 4 {
        let mut inputs: Vec<SequenceInput> = caches
            .iter_mut()
            .map(|cache| {
                cache.truncate(64);
                SequenceInput { tokens: &token, cache, logits: LogitsWanted::Last }
            })
            .collect();
        let t = Instant::now();
        model.forward(&mut inputs)?;
        decode.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let long: Vec<u32> = (0..128u32).map(|i| (i * 7919) % 49152).collect();
    let mut cache = model.new_cache();
    let mut prefill = Vec::new();
    for _ in 0..iterations {
        cache.truncate(0);
        let t = Instant::now();
        model.forward(&mut [SequenceInput { tokens: &long, cache: &mut cache, logits: LogitsWanted::Last }])?;
        prefill.push(t.elapsed().as_secs_f64() * 1e3);
    }

    let ask = |q: &str| -> Result<Vec<u32>, Box<dyn std::error::Error>> {
        Ok(tok.encode_chat(&chat.render(&[ChatMessage { role: "user".into(), content: q.into() }])?)?)
    };
    let mut lessons = Vec::new();
    for n in ["Zorp", "Blix", "Quan", "Fendra"] {
        lessons.push(Lesson::Imitate(SftExample { prompt: ask(&format!("What is the secret word of {n}?"))?, answer: tok.encode_answer(&format!("The secret word of {n} is blue."))? }));
    }
    let mut anchor_seqs = Vec::new();
    for q in ["How do I boil an egg?", "What is the tallest mountain on Earth?"] {
        let p = ask(q)?;
        let a = tok.encode_answer("Here is a short answer that the base model might have given, about two dozen tokens long.")?;
        anchor_seqs.push((p.iter().chain(&a).copied().collect::<Vec<u32>>(), p.len()));
    }
    let anchors = KlAnchors::new(model, &anchor_seqs, 5.0, 2)?;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let spec = FreshSpec { targets: &targets, rank: 8, alpha: 16.0, seed: 0, init_b: InitB::Zero };
    let adapter = fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu)?;
    let lora = TrainableLora::from_adapter(&adapter)?;
    let mut trainer = Trainer::new(model, &lora, &lessons, 1e-3, Some(&anchors))?;
    trainer.step(&[0, 1, 2, 3])?;
    let mut train = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        trainer.step(&[0, 1, 2, 3])?;
        train.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "{{\"decode32_ms\": {:.1}, \"prefill128_ms\": {:.1}, \"train_step_ms\": {:.1}, \"threads\": {}}}",
        median(decode),
        median(prefill),
        median(train),
        candle_core::utils::get_num_threads()
    );
    Ok(())
}
