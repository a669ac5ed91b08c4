//! Our forward pass for the Llama family (llama, mistral, qwen2) over a
//! *packed* batch: every sequence's new tokens are concatenated into one
//! `[T, hidden]` tensor with per-token positions, projections run once over
//! all rows, and attention runs per sequence over its own KV cache.

use candle_core::{DType, Device, Module, Tensor, D};

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::projection::{Projection, Site};
use super::rope::RopeTable;
use super::ModelError;

/// Which rows of logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only after the last new token (decode, end of prefill).
    Last,
    /// After every new token (prompt scoring, echo with logprobs).
    All,
    /// None (a prefill chunk that is not the last one).
    None,
}

/// One sequence's share of a step: its new tokens and its cache.
pub struct SequenceInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: LogitsWanted,
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_norm: Tensor,
    pub post_attention_norm: Tensor,
    pub q: Projection,
    pub k: Projection,
    pub v: Projection,
    pub o: Projection,
    pub gate: Projection,
    pub up: Projection,
    pub down: Projection,
}

impl Block {
    /// The projection at `site`.
    pub fn projection(&self, site: Site) -> &Projection {
        match site {
            Site::Q => &self.q,
            Site::K => &self.k,
            Site::V => &self.v,
            Site::O => &self.o,
            Site::Gate => &self.gate,
            Site::Up => &self.up,
            Site::Down => &self.down,
        }
    }
}

/// A loaded Llama-family model. Immutable once built; shared by reference.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Tensor,
    rope: RopeTable,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Assembles a model from its parts (the loader and the built-in model use this).
    pub fn from_parts(
        config: ModelConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        final_norm: Tensor,
        lm_head: Option<Tensor>,
    ) -> Result<Self, ModelError> {
        let dtype = embed.dtype();
        let device = embed.device().clone();
        let lm_head = match lm_head {
            Some(w) => w,
            None => embed.clone(),
        };
        let rope = RopeTable::new(&config, dtype, &device)?;
        Ok(Llama { config, embed, blocks, final_norm, lm_head, rope, dtype, device })
    }

    /// A fresh, empty cache shaped for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.num_hidden_layers,
            self.config.num_key_value_heads,
            self.config.head_dim,
            self.dtype,
            &self.device,
        )
    }

    /// The weights' dtype (activations run in it too).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The transformer blocks (for LoRA site listing and tests).
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Runs one packed step. Returns f32 logits `[rows, vocab]`, rows in
    /// sequence order as each sequence's [`LogitsWanted`] asks. Each cache
    /// grows by its sequence's token count.
    pub fn forward(&self, batch: &mut [SequenceInput<'_>]) -> Result<Tensor, ModelError> {
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if total == 0 {
            return Ok(Tensor::zeros((0, self.config.vocab_size), DType::F32, &self.device)?);
        }
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut logit_rows = Vec::new();
        for s in batch.iter() {
            let start = s.cache.len();
            if start + s.tokens.len() > self.config.max_position_embeddings {
                return Err(ModelError::InvalidConfig(format!(
                    "sequence of {} tokens exceeds the context length {}",
                    start + s.tokens.len(),
                    self.config.max_position_embeddings
                )));
            }
            let offset = ids.len();
            match s.logits {
                LogitsWanted::Last => logit_rows.push((offset + s.tokens.len() - 1) as u32),
                LogitsWanted::All => logit_rows.extend((0..s.tokens.len()).map(|i| (offset + i) as u32)),
                LogitsWanted::None => {}
            }
            ids.extend_from_slice(s.tokens);
            positions.extend((0..s.tokens.len()).map(|i| (start + i) as u32));
        }
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let positions = Tensor::from_vec(positions, total, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(layer, block, &x, &positions, batch)?;
        }
        for s in batch.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        if logit_rows.is_empty() {
            return Ok(Tensor::zeros((0, self.config.vocab_size), DType::F32, &self.device)?);
        }
        let rows = Tensor::from_vec(logit_rows.clone(), logit_rows.len(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = self.rms_norm(&x, &self.final_norm)?;
        let logits = x.matmul(&self.lm_head.t()?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, weight, self.config.rms_norm_eps as f32)
    }

    /// Where a LoRA delta will be added per row group (next issue): every
    /// projection goes through here.
    fn project(&self, block: &Block, site: Site, x: &Tensor) -> candle_core::Result<Tensor> {
        block.projection(site).forward(x)
    }

    fn block_forward(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        positions: &Tensor,
        batch: &mut [SequenceInput<'_>],
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.config;
        let t = x.dim(0)?;
        let h = self.rms_norm(x, &block.input_norm)?;
        let q = self.project(block, Site::Q, &h)?.reshape((t, cfg.num_attention_heads, cfg.head_dim))?;
        let k = self.project(block, Site::K, &h)?.reshape((t, cfg.num_key_value_heads, cfg.head_dim))?;
        let v = self.project(block, Site::V, &h)?.reshape((t, cfg.num_key_value_heads, cfg.head_dim))?;
        let q = self.rope.apply(&q, positions)?;
        let k = self.rope.apply(&k, positions)?;
        let mut outputs = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for s in batch.iter_mut() {
            let len = s.tokens.len();
            if len == 0 {
                continue;
            }
            let past = s.cache.len();
            let (k_all, v_all) = s.cache.append(layer, &k.narrow(0, offset, len)?, &v.narrow(0, offset, len)?)?;
            outputs.push(self.attention(&q.narrow(0, offset, len)?, &k_all, &v_all, past)?);
            offset += len;
        }
        let attn = if outputs.len() == 1 { outputs.pop().expect("one output") } else { Tensor::cat(&outputs, 0)? };
        let x = (x + self.project(block, Site::O, &attn)?)?;
        let h = self.rms_norm(&x, &block.post_attention_norm)?;
        let gate = candle_nn::ops::silu(&self.project(block, Site::Gate, &h)?)?;
        let up = self.project(block, Site::Up, &h)?;
        let mlp = self.project(block, Site::Down, &(gate * up)?)?;
        Ok((x + mlp)?)
    }

    /// Causal GQA attention of one sequence's `len` new queries over its
    /// `past + len` cached keys. Returns `[len, heads * head_dim]`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, past: usize) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let len = q.dim(0)?;
        let kvh = cfg.num_key_value_heads;
        let rep = cfg.num_attention_heads / kvh;
        let hd = cfg.head_dim;
        let total = past + len;
        // [len, kvh, rep, hd] -> [kvh, rep * len, hd]: query head h reads kv head h / rep.
        let q = q
            .reshape((len, kvh, rep, hd))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((kvh, rep * len, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if len > 1 {
            let mask: Vec<f32> = (0..len)
                .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (len, total), q.device())?.to_dtype(scores.dtype())?;
            scores = scores.reshape((kvh, rep, len, total))?.broadcast_add(&mask)?.reshape((kvh, rep * len, total))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?; // [kvh, rep * len, hd]
        out.reshape((kvh, rep, len, hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((len, kvh * rep * hd))
    }
}

/// Argmax of each row of an f32 `[rows, vocab]` tensor (greedy decoding in tests).
pub fn argmax_rows(logits: &Tensor) -> candle_core::Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1::<u32>()
}
