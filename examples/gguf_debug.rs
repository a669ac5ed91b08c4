use candle_core::Device;
use lifelora::model::gguf::load_gguf;
use lifelora::model::llama::{LogitsWanted, SequenceInput};
fn main() {
    let m = load_gguf(std::path::Path::new("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), None, &Device::Cpu).unwrap();
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string("../shared/fixtures/smollm2/llamacpp_reference.json").unwrap()).unwrap();
    for case in r["cases"].as_array().unwrap() {
        let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
        let prompt = ids(&case["prompt_token_ids"]);
        let completion = ids(&case["completion_token_ids"]);
        let tokens: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
        let mut cache = m.model.new_cache();
        let rows = m.model.forward(&mut [SequenceInput { tokens: &tokens, cache: &mut cache, logits: LogitsWanted::All }]).unwrap().to_vec2::<f32>().unwrap();
        for p in 0..completion.len() {
            let row = &rows[prompt.len() - 1 + p];
            let top = case["top_logprobs"][p].as_array().unwrap();
            let line: Vec<String> = top.iter().map(|e| {
                let id = e[0].as_u64().unwrap() as u32;
                let ours = lifelora::engine::sampling::logprobs_of(row, id, 0).chosen.logprob;
                format!("{}:{:.3}/{:.3}", id, e[1].as_f64().unwrap(), ours)
            }).collect();
            let ours_top = lifelora::engine::sampling::argmax(row);
            if p < 1 || ours_top != top[0][0].as_u64().unwrap() as u32 { println!("p{p} ours_top={ours_top} {}", line.join(" ")); }
        }
        println!("---");
    }
}
