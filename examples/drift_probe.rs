//! How far stored adapters drift from a GGUF base, as the learner's gate
//! measures it: on all its general prompts (with standard errors) and on
//! the quick screen its checkpoints read.
//!
//! `cargo run --release --example drift_probe -- MODEL.gguf ADAPTER_DIR...`
use candle_core::{DType, Device};
use lifelora::learner::eval;
use lifelora::lora::peft::{load_dir, LoraLimits};
use lifelora::lora::trainable::TrainableLora;
use lifelora::model::gguf::load_gguf;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(model) = args.next() else {
        eprintln!("usage: drift_probe MODEL.gguf ADAPTER_DIR...");
        std::process::exit(2);
    };
    let m = load_gguf(std::path::Path::new(&model), None, &Device::Cpu).expect("a GGUF model");
    let all = eval::build_anchors(&m.model, &m.tokenizer, &m.chat, 24).expect("anchors");
    let screen = all.first(eval::SCREEN_PROMPTS);
    for dir in args {
        let a = load_dir(std::path::Path::new(&dir), &m.model.lora_sites(), &LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, &Device::Cpu)
            .expect("a PEFT adapter directory");
        let l = TrainableLora::from_adapter(&a).expect("a trainable copy");
        let (d, q) = (eval::drift(&m.model, &l, &all).expect("drift"), eval::drift(&m.model, &l, &screen).expect("drift"));
        println!(
            "{dir}: {} prompts KL {:.4} ±{:.4} top1 {:.3} ±{:.3} | screen of {} KL {:.4} top1 {:.3}",
            d.prompts, d.kl, d.kl_se, d.agreement, d.agreement_se, q.prompts, q.kl, q.agreement
        );
    }
}
