//! Next-token choice: logit bias, penalties, temperature, top-k, min-p,
//! top-p, seeded RNG; and the log-probabilities reported to clients (of the
//! raw model distribution, as OpenAI reports them).

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
    /// vLLM's: a token whose probability is below `min_p` times the most
    /// likely token's is never drawn. 0 means off.
    pub min_p: f32,
    /// vLLM's (as in the CTRL paper): a token already in the prompt or the
    /// output has its logit divided by this when positive, multiplied when
    /// negative. 1 means off.
    pub repetition_penalty: f32,
    /// OpenAI's `logit_bias`: added to a token's logit before anything else,
    /// greedy choice included (−100 bans a token, +100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
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
            min_p: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
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
    /// Generated tokens and how often each came (presence and frequency penalties).
    counts: std::collections::HashMap<u32, u32>,
    /// Tokens of the prompt and the output (repetition penalty); kept only when it is on.
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    /// A sampler for a sequence starting from `prompt`; without a seed the
    /// RNG is seeded from the OS.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            Default::default()
        };
        Sampler {
            params,
            rng,
            counts: Default::default(),
            seen,
        }
    }

    /// Records a generated token (for the penalties).
    pub fn observe(&mut self, id: u32) {
        *self.counts.entry(id).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(id);
        }
    }

    /// Applies the logit bias and the penalties, in vLLM's order.
    fn adjust(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &id in &self.seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    /// Picks the next token from raw logits (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.adjust(logits);
        let p = &self.params;
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
        if p.min_p > 0.0 {
            // Sorted descending, so the kept tokens are a prefix; the first always stays.
            let floor = p.min_p * probs[0];
            let keep = probs.iter().take_while(|&&pr| pr >= floor).count().max(1);
            probs.truncate(keep);
            cand.truncate(keep);
            let kept: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= kept);
        }
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

    impl Sampler {
        fn new_for_test(params: SamplingParams) -> Self {
            Sampler::new(params, &[])
        }
    }

    #[test]
    fn zero_temperature_is_argmax() {
        let mut s = Sampler::new_for_test(params(0.0, 1));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_draws_and_different_seeds_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new_for_test(params(1.0, seed));
            (0..40)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let mut s = Sampler::new_for_test(SamplingParams {
            top_k: 1,
            ..params(1.0, 3)
        });
        let mut t = Sampler::new_for_test(SamplingParams {
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
        let mut s = Sampler::new_for_test(SamplingParams {
            frequency_penalty: 1.0,
            ..params(0.0, 1)
        });
        s.observe(0);
        assert_eq!(s.sample(&mut [2.0, 1.5]), 1);
    }

    #[test]
    fn a_negative_bias_of_100_bans_the_greedy_token_and_a_positive_one_forces_a_token() {
        let mut s = Sampler::new_for_test(SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..params(0.0, 1)
        });
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9]), 2);
        let mut t = Sampler::new_for_test(SamplingParams {
            logit_bias: vec![(0, 100.0)],
            ..params(1.0, 1)
        });
        for _ in 0..50 {
            assert_eq!(t.sample(&mut [0.1, 3.0, 2.9]), 0);
        }
    }

    #[test]
    fn min_p_never_draws_a_token_below_its_share_of_the_best() {
        // Probabilities ∝ e^0, e^-1, e^-3: the last is 0.05 of the best, under 0.1.
        let mut s = Sampler::new_for_test(SamplingParams {
            min_p: 0.1,
            ..params(1.0, 9)
        });
        let draws: std::collections::HashSet<u32> = (0..400).map(|_| s.sample(&mut [0.0, -1.0, -3.0])).collect();
        assert_eq!(draws, [0, 1].into_iter().collect());
        let mut all = Sampler::new_for_test(params(1.0, 9));
        let draws: std::collections::HashSet<u32> = (0..400).map(|_| all.sample(&mut [0.0, -1.0, -3.0])).collect();
        assert!(draws.contains(&2), "without min_p the unlikely token is drawn sometimes");
    }

    #[test]
    fn repetition_penalty_counts_prompt_tokens_and_divides_positive_logits() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0, 1)
        };
        // Token 0 (logit 3) is in the prompt: 3 / 2 = 1.5 loses to token 1's 2.
        let mut s = Sampler::new(p.clone(), &[0]);
        assert_eq!(s.sample(&mut [3.0, 2.0, -1.0]), 1);
        // A negative logit is multiplied: token 2 goes from -1 to -2.
        let mut logits = [0.0, -1.5, -1.0];
        let mut s = Sampler::new(p, &[0, 2]);
        s.observe(1);
        s.adjust(&mut logits);
        assert_eq!(logits, [0.0, -3.0, -2.0]);
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
