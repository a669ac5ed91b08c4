//! The PEFT reader on arbitrary bytes: `adapter_config.json` and
//! `adapter_model.safetensors` (its header included) must be refused with an
//! error, never a panic, an abort or an allocation the size of a lie.
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use lifelora::lora::peft::{parse, LoraLimits};
use lifelora::lora::SiteSpec;

fuzz_target!(|data: &[u8]| {
    // The first two bytes say where the config ends and the weights begin.
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, weights) = data[2..].split_at(split);
    let sites: Vec<SiteSpec> = (0..2)
        .flat_map(|layer| {
            [("q_proj", 64, 64), ("k_proj", 64, 32), ("v_proj", 64, 32), ("o_proj", 64, 64), ("gate_proj", 64, 172), ("up_proj", 64, 172), ("down_proj", 172, 64)]
                .into_iter()
                .map(move |(m, i, o)| SiteSpec { layer, module: m.to_string(), in_features: i, out_features: o })
        })
        .collect();
    let _ = parse(config, weights, &sites, &LoraLimits { max_rank: 64, ..Default::default() }, DType::F32, &Device::Cpu);
});
