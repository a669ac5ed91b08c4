//! Fresh adapters made in code: the learner's starting point (PEFT's
//! default init, `A` Kaiming-uniform and `B` zero, so a new adapter starts
//! as the base model) and random ones for benches and tests.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::adapter::{LoraAdapter, LoraModule, SiteSpec};

/// How `B` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitB {
    /// Zero, as PEFT does: the adapter changes nothing until trained.
    Zero,
    /// Uniform in `±1/sqrt(r)`: a random but non-trivial adapter.
    Random,
}

/// What a fresh adapter looks like.
#[derive(Debug, Clone)]
pub struct FreshSpec<'a> {
    /// PEFT module names to adapt at every layer.
    pub targets: &'a [&'a str],
    pub rank: usize,
    /// Scale is `alpha / rank`.
    pub alpha: f64,
    /// Seeds the generator, so the same spec gives the same adapter.
    pub seed: u64,
    pub init_b: InitB,
}

/// An adapter over every site whose module is in `spec.targets`.
pub fn fresh_adapter(sites: &[SiteSpec], spec: &FreshSpec, dtype: DType, device: &Device) -> candle_core::Result<LoraAdapter> {
    let FreshSpec { targets, rank, alpha, seed, init_b } = *spec;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let scale = alpha / rank as f64;
    let mut modules = HashMap::new();
    for site in sites.iter().filter(|s| targets.contains(&s.module.as_str())) {
        let bound_a = 1.0 / (site.in_features as f32).sqrt();
        let a: Vec<f32> = (0..rank * site.in_features).map(|_| rng.gen_range(-bound_a..bound_a)).collect();
        let b_t: Vec<f32> = match init_b {
            InitB::Zero => vec![0.0; rank * site.out_features],
            InitB::Random => {
                let bound_b = 1.0 / (rank as f32).sqrt();
                (0..rank * site.out_features).map(|_| rng.gen_range(-bound_b..bound_b) * scale as f32).collect()
            }
        };
        let a_t = Tensor::from_vec(a, (site.in_features, rank), device)?.to_dtype(dtype)?;
        let b_t_scaled = Tensor::from_vec(b_t, (rank, site.out_features), device)?.to_dtype(dtype)?;
        modules.insert((site.layer, site.module.clone()), LoraModule { a_t, b_t_scaled, rank, scale });
    }
    Ok(LoraAdapter::new(modules))
}
