//! The GGUF path against llama.cpp on SmolLM2-135M-Instruct (Q4_1): same
//! prompt ids, same top-1 under teacher forcing at ≥ 98% of positions,
//! reference-token log-probabilities within 0.05 on average, and the same
//! greedy completion for at least 4 of 6 prompts.

mod common;

use candle_core::Device;
use lifelora::model::gguf::load_gguf;
use lifelora::model::LoadedModel;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn setup() -> Option<(LoadedModel, Vec<Value>)> {
    let path = common::smollm2_gguf()?;
    let reference = common::smollm2_reference()?;
    let model = load_gguf(&path, None, &Device::Cpu).unwrap();
    Some((model, reference["cases"].as_array().unwrap().clone()))
}

#[test]
fn prompts_tokenize_to_llama_cpp_ids() {
    let Some((m, cases)) = setup() else { return };
    for case in &cases {
        let text = case["prompt_text"].as_str().unwrap();
        let ours = match case["kind"].as_str().unwrap() {
            "chat" => {
                let messages: Vec<lifelora::model::chat::ChatMessage> = case["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| lifelora::model::chat::ChatMessage {
                        role: m["role"].as_str().unwrap().into(),
                        content: m["content"].as_str().unwrap().into(),
                    })
                    .collect();
                let rendered = m.chat.render(&messages).unwrap();
                assert_eq!(rendered, text, "chat template renders llama.cpp's prompt");
                m.tokenizer.encode_chat(&rendered).unwrap()
            }
            _ => m.tokenizer.encode_prompt(text).unwrap(),
        };
        assert_eq!(ours, ids(&case["prompt_token_ids"]), "prompt {text:?}");
    }
}

