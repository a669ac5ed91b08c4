//! Our forward pass for the Llama family (llama, mistral, qwen2) over a
//! *packed* batch: every sequence's new tokens are concatenated into one
//! `[T, hidden]` tensor with per-token positions, projections run once over
//! all rows, and attention runs per sequence over its own KV cache.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Module, Tensor, D};

use super::attention::{self, AttentionShape};
use super::parallel::Pool;
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::projection::{Projection, Site};
use super::quant_kernels::QuantMatrix;
use crate::lora::batched::{self, AdapterSegment};
use crate::lora::{LoraAdapter, SiteSpec};
use super::ggml_numerics::{self, Numerics};
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

/// Query rows from which llama.cpp's CPU flash attention switches to its
/// tiled path (`GGML_FA_TILE_Q`).
const FLASH_TILE_ROWS: usize = 64;

/// One sequence's share of a step: its new tokens and its cache.
pub struct SequenceInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: LogitsWanted,
}

/// One transformer block's weights. q/k/v and gate/up are fused into one
/// matmul each (fewer, larger ops); LoRA sites address slices of them.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_norm: Tensor,
    pub post_attention_norm: Tensor,
    qkv: Projection,
    o: Projection,
    gate_up: Projection,
    down: Projection,
    q_dim: usize,
    kv_dim: usize,
    intermediate: usize,
}

impl Block {
    /// Fuses the seven projections of a block.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        input_norm: Tensor,
        post_attention_norm: Tensor,
        q: Projection,
        k: Projection,
        v: Projection,
        o: Projection,
        gate: Projection,
        up: Projection,
        down: Projection,
    ) -> candle_core::Result<Self> {
        let (q_dim, kv_dim, intermediate) =
            (q.out_features(), k.out_features(), gate.out_features());
        let qkv = Projection::concat(&[&q, &k, &v])?.packed_for_cpu()?;
        // Packed kernels take f32 activations, so the norms feeding them run in f32.
        let (input_norm, post_attention_norm) = if qkv.is_packed() {
            (input_norm.to_dtype(DType::F32)?, post_attention_norm.to_dtype(DType::F32)?)
        } else {
            (input_norm, post_attention_norm)
        };
        Ok(Block {
            input_norm,
            post_attention_norm,
            qkv,
            o: o.packed_for_cpu()?,
            gate_up: Projection::concat(&[&gate, &up])?.packed_for_cpu()?,
            down: down.packed_for_cpu()?,
            q_dim,
            kv_dim,
            intermediate,
        })
    }

    /// Bytes held by this block's projection weights.
    pub fn weight_bytes(&self) -> usize {
        [&self.qkv, &self.o, &self.gate_up, &self.down]
            .iter()
            .map(|p| p.weight_bytes())
            .sum()
    }

    /// `(in, out)` features of the projection at `site`.
    pub fn site_shape(&self, site: Site) -> (usize, usize) {
        let hidden = self.qkv.in_features();
        match site {
            Site::Q => (hidden, self.q_dim),
            Site::K | Site::V => (hidden, self.kv_dim),
            Site::O => (self.q_dim, hidden),
            Site::Gate | Site::Up => (hidden, self.intermediate),
            Site::Down => (self.intermediate, hidden),
        }
    }

    /// The dense weight `[out, in]` of `site` (tests, merges).
    pub fn site_weight(&self, site: Site) -> candle_core::Result<Tensor> {
        let (q, kv, i) = (self.q_dim, self.kv_dim, self.intermediate);
        match site {
            Site::Q => self.qkv.dense_weight()?.narrow(0, 0, q),
            Site::K => self.qkv.dense_weight()?.narrow(0, q, kv),
            Site::V => self.qkv.dense_weight()?.narrow(0, q + kv, kv),
            Site::O => self.o.dense_weight(),
            Site::Gate => self.gate_up.dense_weight()?.narrow(0, 0, i),
            Site::Up => self.gate_up.dense_weight()?.narrow(0, i, i),
            Site::Down => self.down.dense_weight(),
        }
    }
}

mod train;
mod train_ggml;
pub mod prefix_tree;
pub use train::PackedSeq;

/// The token embedding table, dense or quantized (GGUF keeps it quantized
/// and dequantizes only the looked-up rows).
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    /// Shared with a tied output head that uses our quantized kernels.
    Native(Arc<QuantMatrix>),
    /// Shared with a tied output head packed for our CPU kernels.
    Packed(Projection),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(t) => t.index_select(ids, 0),
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::Native(q) => {
                let ids_v = ids.to_vec1::<u32>()?;
                let rows = q.dequantize_rows(&ids_v).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "token id out of range (vocabulary {})",
                        q.rows()
                    ))
                })?;
                Tensor::from_vec(rows, (ids_v.len(), q.cols()), ids.device())
            }
            Embedding::Packed(p) => {
                let ids_v = ids.to_vec1::<u32>()?;
                let rows = p.packed_rows(&ids_v).ok_or_else(|| {
                    candle_core::Error::Msg(format!("token id out of range (vocabulary {})", p.out_features()))
                })?;
                Tensor::from_vec(rows, (ids_v.len(), p.in_features()), ids.device())
            }
        }
    }

    /// The whole table as a dense f32 tensor (merges and references).
    fn dense(&self) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.clone()),
            Embedding::Quantized(q) => q.dequantize(&q.device()),
            Embedding::Native(q) => Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu),
            Embedding::Packed(p) => p.dense_weight(),
        }
    }

    /// The same table as an output head (tied embeddings).
    fn as_projection(&self) -> candle_core::Result<Projection> {
        match self {
            Embedding::Dense(t) => Ok(Projection::new(t.clone(), None)),
            Embedding::Quantized(q) => Projection::quantized(q.clone(), None),
            Embedding::Native(q) => Ok(Projection::native(q.clone(), None)),
            Embedding::Packed(p) => Ok(p.clone()),
        }
    }
}

/// A loaded Llama-family model. Immutable once built; shared by reference.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Projection,
    rope: RopeTable,
    /// The activations' dtype.
    dtype: DType,
    /// The checkpoint's dtype, as the weights are held.
    weight_dtype: DType,
    device: Device,
    /// Where our kernels between matmuls run: with the quantized matmuls on
    /// the barrier pool, or with dense gemm on rayon's.
    pool: Pool,
    /// f32 kernels, or llama.cpp's arithmetic for GGUF files.
    numerics: Numerics,
}

impl Llama {
    /// Assembles a model from its parts (the loader and the built-in model use this).
    pub fn from_parts(
        config: ModelConfig,
        mut embed: Embedding,
        blocks: Vec<Block>,
        final_norm: Tensor,
        lm_head: Option<Projection>,
    ) -> Result<Self, ModelError> {
        // Activations run in the norms' dtype (f32 for GGUF, whose quantized
        // matmuls take f32 input, and for weights packed for our CPU kernels).
        let weight_dtype = final_norm.dtype();
        let packed = blocks.first().is_some_and(|b| b.qkv.is_packed());
        let final_norm = if packed { final_norm.to_dtype(DType::F32)? } else { final_norm };
        let dtype = final_norm.dtype();
        let device = final_norm.device().clone();
        let lm_head = match lm_head {
            Some(p) => p.packed_for_cpu()?,
            None => {
                let head = embed.as_projection()?.packed_for_cpu()?;
                // A tied table is held once: the lookup reads the packed head.
                if head.is_packed() {
                    embed = Embedding::Packed(head.clone());
                }
                head
            }
        };
        let rope = RopeTable::new(&config, dtype, &device)?;
        let own_kernels = blocks.iter().any(|b| b.qkv.uses_own_kernels() || b.gate_up.uses_own_kernels());
        let pool = if own_kernels { Pool::Barrier } else { Pool::Rayon };
        Ok(Llama {
            config,
            embed,
            blocks,
            final_norm,
            lm_head,
            rope,
            dtype,
            weight_dtype,
            device,
            pool,
            numerics: Numerics::Reference,
        })
    }

    /// Switches the forward pass to llama.cpp's CPU arithmetic (RMSNorm,
    /// RoPE, SwiGLU, an f16 KV cache and its flash attention), so a GGUF
    /// file gives the answers llama.cpp gives. See [`super::ggml_numerics`].
    pub fn with_ggml_numerics(mut self) -> Result<Self, ModelError> {
        self.rope = RopeTable::ggml(&self.config, &self.device)?;
        self.numerics = Numerics::Ggml;
        Ok(self)
    }

    /// True when llama.cpp's arithmetic applies to these activations.
    fn ggml(&self, x: &Tensor) -> bool {
        self.numerics == Numerics::Ggml && ggml_numerics::applies(x)
    }

    /// A fresh, empty cache shaped for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.num_hidden_layers,
            self.config.num_key_value_heads,
            self.config.head_dim,
            self.kv_dtype(),
            &self.device,
        )
    }

    /// What the KV cache stores: f16 under llama.cpp's arithmetic (its
    /// default cache type, half the memory), else the activations' dtype.
    pub fn kv_dtype(&self) -> DType {
        if self.numerics == Numerics::Ggml && self.device.is_cpu() && self.dtype == DType::F32 {
            DType::F16
        } else {
            self.dtype
        }
    }

    /// The activations' dtype: the weights' dtype, except on the CPU,
    /// where f32 and bf16 weights are packed for kernels that take f32.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the weights were loaded in (bf16 weights stay bf16 on a
    /// CPU with bf16 dot products).
    pub fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    /// The dtype served adapters are held in: the base's precision. Over a
    /// bf16 base on the CPU that is bf16 (the LoRA kernel widens as it
    /// reads, and 32 distinct adapters stream half the bytes); otherwise
    /// the activations' dtype.
    pub fn adapter_dtype(&self) -> DType {
        if self.device.is_cpu() && self.dtype == DType::F32 && self.weight_dtype == DType::BF16 {
            DType::BF16
        } else {
            self.dtype
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes held by weights (quantized ones at their packed size).
    pub fn weight_bytes(&self) -> usize {
        let blocks: usize = self.blocks.iter().map(Block::weight_bytes).sum();
        let embed = match &self.embed {
            Embedding::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
            Embedding::Native(q) => q.bytes(),
            Embedding::Packed(_) => 0, // counted once, as the output head
        };
        blocks + embed + self.lm_head.weight_bytes()
    }

    /// Every weight as a dense tensor under its Hugging Face name (q/k in
    /// rotate-half order): the reference a merged adapter is checked
    /// against, and what an exporter would write. Never the serving path.
    pub fn dense_weights(&self) -> candle_core::Result<std::collections::HashMap<String, Tensor>> {
        let mut out = std::collections::HashMap::new();
        out.insert("model.embed_tokens.weight".to_string(), self.embed.dense()?);
        out.insert("model.norm.weight".to_string(), self.final_norm.clone());
        out.insert("lm_head.weight".to_string(), self.lm_head.dense_weight()?);
        for (l, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.insert(format!("{p}.input_layernorm.weight"), b.input_norm.clone());
            out.insert(format!("{p}.post_attention_layernorm.weight"), b.post_attention_norm.clone());
            for site in Site::ALL {
                let group = if matches!(site, Site::Gate | Site::Up | Site::Down) { "mlp" } else { "self_attn" };
                out.insert(format!("{p}.{group}.{}.weight", site.module_name()), b.site_weight(site)?.contiguous()?);
            }
        }
        Ok(out)
    }

    /// The transformer blocks (for LoRA site listing and tests).
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Runs one packed step. Returns f32 logits `[rows, vocab]`, rows in
    /// sequence order as each sequence's [`LogitsWanted`] asks. Each cache
    /// grows by its sequence's token count.
    pub fn forward(&self, batch: &mut [SequenceInput<'_>]) -> Result<Tensor, ModelError> {
        self.forward_with_adapters(batch, &[])
    }

    /// [`Llama::forward`] where sequence `i` uses `adapters[i]` (missing or
    /// `None`: the base model). Consecutive sequences with the same adapter
    /// form one segment, so ordering a batch by adapter minimises the work.
    pub fn forward_with_adapters(
        &self,
        batch: &mut [SequenceInput<'_>],
        adapters: &[Option<Arc<LoraAdapter>>],
    ) -> Result<Tensor, ModelError> {
        let mut segments: Vec<AdapterSegment> = Vec::new();
        let mut row = 0;
        for (i, s) in batch.iter().enumerate() {
            let adapter = adapters.get(i).cloned().flatten();
            let same = segments.last().is_some_and(|last| match (&last.adapter, &adapter) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            });
            match segments.last_mut() {
                Some(last) if same => last.len += s.tokens.len(),
                _ => segments.push(AdapterSegment { start: row, len: s.tokens.len(), adapter }),
            }
            row += s.tokens.len();
        }
        if !batched::any_adapter(&segments) {
            segments.clear();
        }
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if total == 0 {
            return Ok(Tensor::zeros(
                (0, self.config.vocab_size),
                DType::F32,
                &self.device,
            )?);
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
                LogitsWanted::All => {
                    logit_rows.extend((0..s.tokens.len()).map(|i| (offset + i) as u32))
                }
                LogitsWanted::None => {}
            }
            ids.extend_from_slice(s.tokens);
            positions.extend((0..s.tokens.len()).map(|i| (start + i) as u32));
        }
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let position_ids = positions;
        let positions = Tensor::from_slice(&position_ids, total, &self.device)?;
        let mut x = self.embed.lookup(&ids)?.to_dtype(self.dtype)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(layer, block, &x, (&positions, &position_ids), batch, &segments)?;
        }
        for s in batch.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        if logit_rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.config.vocab_size),
                DType::F32,
                &self.device,
            )?);
        }
        let rows = Tensor::from_vec(logit_rows.clone(), logit_rows.len(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = self.rms_norm(&x, &self.final_norm)?;
        let logits = self.lm_head.forward(&x)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        if self.ggml(x) {
            return ggml_numerics::rms_norm(x, weight, self.config.rms_norm_eps as f32);
        }
        candle_nn::ops::rms_norm(x, weight, self.config.rms_norm_eps as f32)
    }

    fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            heads: self.config.num_attention_heads,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
            pool: self.pool,
        }
    }

    /// Every projection goes through here: the frozen base, plus each
    /// adapted segment's LoRA delta for the modules `parts` names (in the
    /// projection's output column order).
    fn project(
        &self,
        layer: usize,
        proj: &Projection,
        parts: &[(&str, usize)],
        x: &Tensor,
        segments: &[AdapterSegment],
    ) -> candle_core::Result<Tensor> {
        let y = proj.forward(x)?;
        if segments.is_empty() {
            return Ok(y);
        }
        match batched::delta(x, layer, parts, segments, self.pool)? {
            Some(d) => {
                let d = d.to_dtype(y.dtype())?;
                y + d
            }
            None => Ok(y),
        }
    }

    /// Where adapters may attach: every projection of every block.
    pub fn lora_sites(&self) -> Vec<SiteSpec> {
        let mut sites = Vec::with_capacity(self.blocks.len() * 7);
        for (layer, block) in self.blocks.iter().enumerate() {
            for site in Site::ALL {
                let (in_features, out_features) = block.site_shape(site);
                sites.push(SiteSpec { layer, module: site.module_name().to_string(), in_features, out_features });
            }
        }
        sites
    }

    fn block_forward(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        (positions, position_ids): (&Tensor, &[u32]),
        batch: &mut [SequenceInput<'_>],
        segments: &[AdapterSegment],
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.config;
        let t = x.dim(0)?;
        let (hidden, inter) = (cfg.hidden_size, block.intermediate);
        let h = self.rms_norm(x, &block.input_norm)?;
        let qkv_parts = [("q_proj", block.q_dim), ("k_proj", block.kv_dim), ("v_proj", block.kv_dim)];
        let qkv = self.project(layer, &block.qkv, &qkv_parts, &h, segments)?;
        let (qd, kvd) = (block.q_dim, block.kv_dim);
        if self.ggml(&qkv) {
            // llama.cpp's element order for Q and K (attention sums in it)
            // and its f16 cache for K and V, in one pass.
            let (q, k, v) = self.rope.ggml_attention_inputs(&qkv, position_ids, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)?;
            let attn = self.attend(layer, &q, &k, &v, batch)?;
            let x = (x + self.project(layer, &block.o, &[("o_proj", hidden)], &attn, segments)?)?;
            let h = self.rms_norm(&x, &block.post_attention_norm)?;
            let gate_up = self.project(layer, &block.gate_up, &[("gate_proj", inter), ("up_proj", inter)], &h, segments)?;
            let act = ggml_numerics::swiglu_fused(&gate_up)?;
            let mlp = self.project(layer, &block.down, &[("down_proj", hidden)], &act, segments)?;
            return Ok((x + mlp)?);
        }
        let q = qkv
            .narrow(1, 0, qd)?
            .reshape((t, cfg.num_attention_heads, cfg.head_dim))?;
        let k = qkv
            .narrow(1, qd, kvd)?
            .reshape((t, cfg.num_key_value_heads, cfg.head_dim))?;
        let v = qkv.narrow(1, qd + kvd, kvd)?.contiguous()?.reshape((
            t,
            cfg.num_key_value_heads,
            cfg.head_dim,
        ))?;
        let q = self.rope.apply(&q, positions)?;
        let k = self.rope.apply(&k, positions)?;
        let attn = self.attend(layer, &q, &k, &v, batch)?;
        let x = (x + self.project(layer, &block.o, &[("o_proj", hidden)], &attn, segments)?)?;
        let h = self.rms_norm(&x, &block.post_attention_norm)?;
        let gate_up = self.project(layer, &block.gate_up, &[("gate_proj", inter), ("up_proj", inter)], &h, segments)?;
        let i = block.intermediate;
        let act = (candle_nn::ops::silu(&gate_up.narrow(1, 0, i)?)? * gate_up.narrow(1, i, i)?)?;
        let mlp = self.project(layer, &block.down, &[("down_proj", hidden)], &act, segments)?;
        Ok((x + mlp)?)
    }

    /// [`Llama::attend`] under llama.cpp's arithmetic, after the caches are
    /// written. Per sequence, as llama.cpp decides per batch: chunks under
    /// 64 rows replay its one-row flash attention; longer prompt chunks take
    /// the f32 matmul path (llama.cpp's tiled path, up to summation order).
    /// Deciding per sequence keeps each answer independent of what else is
    /// in the batch.
    fn attend_ggml(&self, layer: usize, q: &Tensor, batch: &[SequenceInput<'_>], spans: &[(usize, usize)]) -> Result<Tensor, ModelError> {
        let shape = self.attention_shape();
        let width = shape.heads * shape.head_dim;
        let qs = q.flatten_all()?.to_vec1::<f32>()?;
        let short = |len: usize| len > 0 && len < FLASH_TILE_ROWS;
        let seqs: Vec<attention::FlashSeq> = batch
            .iter()
            .zip(spans)
            .filter(|(_, (_, len))| short(*len))
            .map(|(s, &(off, len))| {
                let (kc, vc) = s.cache.layer(layer);
                attention::FlashSeq { q: &qs[off * width..(off + len) * width], k: kc, v: vc, past: s.cache.len(), len }
            })
            .collect();
        let flashed = attention::flash_batch(shape, &seqs)
            .ok_or_else(|| ModelError::InvalidConfig("the ggml attention needs CPU caches".into()))?;
        let mut out = Vec::with_capacity(qs.len());
        let mut next = 0;
        for (s, &(off, len)) in batch.iter().zip(spans) {
            if short(len) {
                out.extend_from_slice(&flashed[next..next + len * width]);
                next += len * width;
            } else if len > 0 {
                let past = s.cache.len();
                let (kc, vc) = s.cache.layer(layer);
                let as_f32 = |t: &Tensor| t.narrow(1, 0, past + len)?.to_dtype(DType::F32);
                let rows = attention::prefill(shape, &q.narrow(0, off, len)?, &as_f32(kc)?, &as_f32(vc)?, past)?;
                out.extend(rows.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        let rows = out.len() / width;
        Ok(Tensor::from_vec(out, (rows, width), q.device())?)
    }

    /// Writes each sequence's new keys/values to its cache and attends.
    /// Returns `[T, heads * head_dim]` in packed row order.
    fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &mut [SequenceInput<'_>],
    ) -> Result<Tensor, ModelError> {
        let shape = self.attention_shape();
        let mut offset = 0;
        let mut spans = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            let len = s.tokens.len();
            if len > 0 {
                s.cache.append(
                    layer,
                    &k.narrow(0, offset, len)?,
                    &v.narrow(0, offset, len)?,
                )?;
            }
            spans.push((offset, len));
            offset += len;
        }
        let width = shape.heads * shape.head_dim;
        if self.ggml(q) {
            return self.attend_ggml(layer, q, batch, &spans);
        }
        // Single-token (decode) rows through the direct kernel, in one call.
        let mut decoded: Option<Vec<f32>> = None;
        let decode_rows = spans.iter().filter(|(_, len)| *len == 1).count();
        if decode_rows > 0 && attention::kernel_applies(q) {
            let q_rows = q.flatten_from(1)?.contiguous()?;
            let (guard, _) = q_rows.storage_and_layout();
            if let candle_core::Storage::Cpu(cpu) = &*guard {
                let qs = cpu.as_slice::<f32>()?;
                let queries: Vec<attention::DecodeQuery> = batch
                    .iter()
                    .zip(&spans)
                    .filter(|(_, (_, len))| *len == 1)
                    .map(|(s, (off, _))| {
                        let (kc, vc) = s.cache.layer(layer);
                        attention::DecodeQuery {
                            q: &qs[off * width..(off + 1) * width],
                            k: kc,
                            v: vc,
                            len: s.cache.len() + 1,
                        }
                    })
                    .collect();
                decoded = attention::decode_batch(shape, &queries);
            }
        }
        if let (Some(out), true) = (&decoded, decode_rows == spans.len()) {
            return Ok(Tensor::from_slice(out, (decode_rows, width), q.device())?);
        }
        let mut outputs = Vec::with_capacity(batch.len());
        let mut next_decoded = 0;
        for (s, &(off, len)) in batch.iter().zip(&spans) {
            if len == 0 {
                continue;
            }
            if let (Some(out), 1) = (&decoded, len) {
                let row = &out[next_decoded * width..(next_decoded + 1) * width];
                next_decoded += 1;
                outputs.push(Tensor::from_slice(row, (1, width), q.device())?);
                continue;
            }
            let past = s.cache.len();
            let (kc, vc) = s.cache.layer(layer);
            let (kc, vc) = (kc.narrow(1, 0, past + len)?, vc.narrow(1, 0, past + len)?);
            outputs.push(attention::prefill(
                shape,
                &q.narrow(0, off, len)?,
                &kc,
                &vc,
                past,
            )?);
        }
        Ok(if outputs.len() == 1 {
            outputs.pop().expect("one output")
        } else {
            Tensor::cat(&outputs, 0)?
        })
    }
}

/// Argmax of each row of an f32 `[rows, vocab]` tensor (greedy decoding in tests).
pub fn argmax_rows(logits: &Tensor) -> candle_core::Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1::<u32>()
}
