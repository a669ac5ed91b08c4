//! Next-token choice: penalties, temperature, top-k, top-p, seeded RNG;
//! and the log-probabilities reported to clients (of the raw model
//! distribution, as OpenAI reports them).

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Per-request sampling settings, already validated by the API.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means off.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// A token with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// Log-probabilities of one position: the chosen token and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionLogprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// One sequence's sampler; owns its RNG so a seed reproduces the output.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler; without a seed the RNG is seeded from the OS.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Sampler {
            params,
            rng,
            counts: Default::default(),
        }
    }

    /// Records a generated token (for the penalties).
    pub fn observe(&mut self, id: u32) {
        *self.counts.entry(id).or_insert(0) += 1;
    }

    /// Picks the next token from raw logits (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.gen::<f32>() * total;
        for (c, pr) in cand.iter().zip(&probs) {
            if r < *pr {
                return c.0;
            }
            r -= pr;
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest value; the lowest index on ties.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// log-softmax of `logits`, and the chosen token's and the `top` best entries.
pub fn logprobs_of(logits: &[f32], chosen: u32, top: usize) -> PositionLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let lp = |id: u32| TokenLogprob {
        id,
        logprob: logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse),
    };
    let mut top_ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = top.min(top_ids.len());
    if k > 0 {
        top_ids.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        top_ids.truncate(k);
        top_ids.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
    } else {
        top_ids.clear();
    }
    PositionLogprobs {
        chosen: lp(chosen),
        top: top_ids.into_iter().map(lp).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(seed),
            ..Default::default()
        }
    }

    #[test]
    fn zero_temperature_is_argmax() {
        let mut s = Sampler::new(params(0.0, 1));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_draws_and_different_seeds_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, seed));
            (0..40)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(1.0, 3)
        });
        let mut t = Sampler::new(SamplingParams {
            top_p: 0.01,
            ..params(1.0, 3)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [1.0, 2.0, 1.5]), 1);
            assert_eq!(t.sample(&mut [1.0, 2.0, 1.5]), 1);
        }
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 1.0,
            ..params(0.0, 1)
        });
        s.observe(0);
        assert_eq!(s.sample(&mut [2.0, 1.5]), 1);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let lp = logprobs_of(&[0.0, 1.0, 2.0], 0, 2);
        let total: f32 = [0.0f32, 1.0, 2.0].iter().map(|l| (l - 2.0f32).exp()).sum();
        assert!((lp.top[0].logprob - (-total.ln())).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![2, 1]);
        assert!(lp.chosen.logprob < lp.top[1].logprob);
    }
}
