//! One learner training step on SmolLM2-135M-Instruct Q4_1 (the GGUF
//! `lifelora fetch smollm2` gets), shaped like the learning check: chat
//! prompts with the model's system prompt, a batch of 4 lessons, LoRA r=8
//! on every projection, and 2 KL anchors. Reports lesson tokens per second
//! for imitation and for preference pairs (each a chosen and a rejected
//! answer). Skips when the model is not fetched.

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lifelora::learner::sft::{KlAnchors, Lesson, SftExample, Trainer};
use lifelora::lora::init::{fresh_adapter, FreshSpec, InitB};
use lifelora::lora::trainable::TrainableLora;
use lifelora::model::chat::ChatMessage;
use lifelora::model::gguf::load_gguf;

const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn bench_train(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("skipping: {} not fetched (lifelora fetch smollm2)", path.display());
        return;
    }
    let loaded = load_gguf(&path, None, &Device::Cpu).expect("load smollm2");
    let (model, tok, chat) = (&loaded.model, &loaded.tokenizer, &loaded.chat);
    let ask = |q: &str| {
        let text = chat.render(&[ChatMessage { role: "user".into(), content: q.into() }]).expect("template");
        tok.encode_chat(&text).expect("encode")
    };
    let names = ["Zorp", "Blix", "Quan", "Fendra", "Mollo", "Triv", "Yarek", "Solvi"];
    let lessons = |prefer: bool| -> Vec<Lesson> {
        names
            .iter()
            .map(|n| {
                let prompt = ask(&format!("What is the secret word of {n}?"));
                let chosen = tok.encode_answer(&format!("The secret word of {n} is blue.")).expect("encode");
                let rejected = tok.encode_answer(&format!("I'm sorry, but I don't know the secret word of {n}. Could you tell me more about it?")).expect("encode");
                if prefer {
                    Lesson::Prefer { prompt, chosen, rejected }
                } else {
                    Lesson::Imitate(SftExample { prompt, answer: chosen })
                }
            })
            .collect()
    };
    let anchor_seqs: Vec<(Vec<u32>, usize)> = ["How do I boil an egg?", "What is the tallest mountain on Earth?"]
        .iter()
        .map(|q| {
            let prompt = ask(q);
            let answer = tok.encode_answer("Here is a short answer that the base model might have given, about two dozen tokens long.").expect("encode");
            (prompt.iter().chain(&answer).copied().collect(), prompt.len())
        })
        .collect();
    let anchors = KlAnchors::new(model, &anchor_seqs, 5.0, 2).expect("anchors");
    let spec = FreshSpec { targets: &TARGETS, rank: 8, alpha: 16.0, seed: 0, init_b: InitB::Zero };
    let adapter = fresh_adapter(&model.lora_sites(), &spec, DType::F32, &Device::Cpu).expect("adapter");

    let mut group = c.benchmark_group("train_step_smollm2_q4_1");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(2));
    group.measurement_time(std::time::Duration::from_secs(20));
    for (label, prefer) in [("imitate", false), ("prefer", true)] {
        let set = lessons(prefer);
        let per_step: usize = set.iter().take(4).map(Lesson::tokens).sum::<usize>() + anchor_seqs.iter().map(|(t, _)| t.len()).sum::<usize>();
        group.throughput(Throughput::Elements(per_step as u64));
        let lora = TrainableLora::from_adapter(&adapter).expect("trainable");
        let mut trainer = Trainer::new(model, &lora, &set, 1e-3, Some(&anchors)).expect("trainer");
        let mut next = 0;
        group.bench_function(BenchmarkId::new(label, 4), |b| {
            b.iter(|| {
                let batch: Vec<usize> = (0..4).map(|k| (next + k) % set.len()).collect();
                next += 4;
                trainer.step(&batch).expect("step")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_train);
criterion_main!(benches);
