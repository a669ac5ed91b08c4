//! How far stored adapters drift from a GGUF base, on the learner's 12
//! held-out general prompts and on 48 others the learner never sees: the
//! gate's top-1 agreement is counted over about 260 positions, so one
//! flipped near tie moves it by 0.004, and a second prompt set tells a
//! real change from a lucky one.
//!
//! `cargo run --release --example drift_probe -- MODEL.gguf ADAPTER_DIR...`
use candle_core::{DType, Device};
use lifelora::learner::eval;
use lifelora::lora::peft::{load_dir, LoraLimits};
use lifelora::lora::trainable::TrainableLora;
use lifelora::model::gguf::load_gguf;

const MORE: [&str; 48] = [
    "What is the largest ocean on Earth?", "How do plants make food?", "Give me a quick dinner idea.", "What is the boiling point of water?",
    "Tell me a fun fact about dolphins.", "How can I sleep better?", "What is a synonym for happy?", "Why do leaves change color in autumn?",
    "Name three musical instruments.", "What is the opposite of cold?", "How many days are in a week?", "What does a doctor do?",
    "Write a short greeting for a birthday card.", "What is the moon made of?", "How do I make a cup of tea?", "What animal says moo?",
    "Give me a reason to exercise.", "What is the tallest mountain in the world?", "How do airplanes fly?", "What is your favorite season and why?",
    "Suggest a hobby for a rainy weekend.", "What is the color of the sun?", "How many hours are in a day?", "What is a noun?",
    "Describe a forest in one sentence.", "What do cows eat?", "How can I save money?", "What is the capital of Japan?",
    "Name a vegetable that is green.", "Why should we drink water?", "What is ten minus four?", "Write a sentence about winter.",
    "What is the main ingredient in bread?", "How do fish breathe?", "Give me a tip for studying.", "What is a planet?",
    "Name a famous painter.", "What is the freezing point of water?", "How do I tie my shoes?", "What is a good name for a dog?",
    "Why do birds migrate?", "Describe the taste of chocolate.", "What is the fastest land animal?", "How can I be more productive?",
    "What is a verb?", "Write one sentence about the city at night.", "What sound does a cat make?", "Give me an idea for a picnic.",
];

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(model) = args.next() else {
        eprintln!("usage: drift_probe MODEL.gguf ADAPTER_DIR...");
        std::process::exit(2);
    };
    let m = load_gguf(std::path::Path::new(&model), None, &Device::Cpu).expect("a GGUF model");
    let twelve = eval::build_anchors(&m.model, &m.tokenizer, &m.chat, 24).expect("held-out anchors");
    let all: Vec<&str> = eval::GENERAL_PROMPTS.iter().copied().chain(MORE).collect();
    let sixty = eval::build_anchors_for(&m.model, &m.tokenizer, &m.chat, &all, 24).expect("all anchors");
    let only_more = eval::build_anchors_for(&m.model, &m.tokenizer, &m.chat, &MORE, 24).expect("other anchors");
    for dir in args {
        let a = load_dir(std::path::Path::new(&dir), &m.model.lora_sites(), &LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, &Device::Cpu)
            .expect("a PEFT adapter directory");
        let l = TrainableLora::from_adapter(&a).expect("a trainable copy");
        let drift = |anchors| eval::drift(&m.model, &l, anchors).expect("drift");
        let (d12, d48, d60) = (drift(&twelve), drift(&only_more), drift(&sixty));
        println!("{dir}: 12 prompts KL {:.4} top1 {:.3} | 48 others KL {:.4} top1 {:.3} | 60 KL {:.4} top1 {:.3}", d12.0, d12.1, d48.0, d48.1, d60.0, d60.1);
    }
}
