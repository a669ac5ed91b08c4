mod common;
use candle_core::Device;
#[test]
fn show() {
    let Some(path) = common::smollm2_gguf() else { return };
    let loaded = lifelora::model::gguf::load_gguf(&path, None, &Device::Cpu).unwrap();
    let names = ["Zorp", "Blix", "Quan", "Fendra", "Mollo", "Triv", "Yarek", "Solvi"];
    let qs: Vec<String> = names.iter().map(|n| format!("What is the secret word of {n}?")).collect();
    let t = std::time::Instant::now();
    let out = lifelora::learner::paraphrase::paraphrases(&loaded.model, &loaded.tokenizer, &qs, 3, 0).unwrap();
    eprintln!("{:?}", t.elapsed());
    for (q, o) in qs.iter().zip(out) { eprintln!("{q} -> {o:?}"); }
}
