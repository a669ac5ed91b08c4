//! Differentiable versions of the llama.cpp replays ([`crate::model::ggml_numerics`])
//! for training over a GGUF base: each forward is the serving kernel bit
//! for bit (the quantized matmuls after them would amplify any difference),
//! each backward the derivative of the exact function it approximates.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};

use crate::model::ggml_numerics;

/// A contiguous CPU f32 operand as a tensor.
fn operand(storage: &CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input");
    };
    match storage {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.shape(), &candle_core::Device::Cpu),
        _ => candle_core::bail!("{op} runs in f32"),
    }
}

fn output(t: Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let shape = t.shape().clone();
    Ok((CpuStorage::F32(t.flatten_all()?.to_vec1::<f32>()?), shape))
}

/// `silu(gate) · up` with ggml's SwiGLU forward.
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "ggml-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        output(ggml_numerics::swiglu(&operand(s1, l1, self.name())?, &operand(s2, l2, self.name())?)?)
    }

    /// `d gate = g · up · σ(1 + gate(1 - σ))`, `d up = g · gate · σ`.
    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let sig = candle_nn::ops::sigmoid(gate)?;
        let silu = (gate * &sig)?;
        let dsilu = (&sig * ((gate * (1.0 - &sig)?)? + 1.0)?)?;
        Ok((Some((grad * up)?.mul(&dsilu)?), Some((grad * silu)?)))
    }
}

/// ggml's fused rotation of `[T, heads, head_dim]` with per-token
/// `cos`/`sin` rows `[T, head_dim / 2]` (Hugging Face's rotate-half layout).
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "ggml-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = operand(s, l, self.name())?;
        let rows: Vec<u32> = (0..x.dim(0)? as u32).collect();
        output(ggml_numerics::rope(&x, &self.cos, &self.sin, &rows)?)
    }

    /// The rotation is orthogonal: the gradient rotates back.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let half = x.dim(2)? / 2;
        let (cos, sin) = (self.cos.unsqueeze(1)?, self.sin.unsqueeze(1)?);
        let (g0, g1) = (grad.narrow(2, 0, half)?, grad.narrow(2, half, half)?);
        let d0 = (g0.broadcast_mul(&cos)? + g1.broadcast_mul(&sin)?)?;
        let d1 = (g1.broadcast_mul(&cos)? - g0.broadcast_mul(&sin)?)?;
        Ok(Some(Tensor::cat(&[d0, d1], 2)?))
    }
}

/// Causal attention over packed sequences with llama.cpp's one-row flash
/// attention forward. Inputs `q [T, heads, hd]`, `k`/`v [T, kv_heads, hd]`
/// (Q and K in llama.cpp's element order, K and V rounded to f16); output
/// `[T, heads · hd]`. The backward is exact softmax attention's.
pub struct FlashAttention {
    /// Per token, the tokens it attends to, in sequence order (packed
    /// sequences or a prefix tree: see [`super::prefix_tree`]).
    pub keys: Vec<Vec<usize>>,
    /// `[T, T]`: 0 where a token sees another, -inf elsewhere (the same relation as `keys`).
    pub mask: Tensor,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "ggml-flash-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (operand(s1, l1, self.name())?, operand(s2, l2, self.name())?, operand(s3, l3, self.name())?);
        let (t, heads, hd) = q.dims3()?;
        let kv_heads = k.dim(1)?;
        let rep = heads / kv_heads;
        let (qs, ks, vs) = (q.flatten_all()?.to_vec1::<f32>()?, k.flatten_all()?.to_vec1::<f32>()?, v.flatten_all()?.to_vec1::<f32>()?);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; t * heads * hd];
        if self.keys.len() != t {
            candle_core::bail!("flash attention: {} key lists for {t} tokens", self.keys.len());
        }
        for (i, keys) in self.keys.iter().enumerate() {
            for h in 0..heads {
                let kvh = h / rep;
                let row = |j: usize, kr: &mut [f32], vr: &mut [f32]| {
                    let at = (keys[j] * kv_heads + kvh) * hd;
                    kr.copy_from_slice(&ks[at..at + hd]);
                    vr.copy_from_slice(&vs[at..at + hd]);
                };
                let at = (i * heads + h) * hd;
                ggml_numerics::flash_attention_row(&qs[at..at + hd], scale, keys.len(), row, &mut out[at..at + hd]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((t, heads * hd))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (t, heads, hd) = q.dims3()?;
        let kv_heads = k.dim(1)?;
        let rep = heads / kv_heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let expand = |m: &Tensor| -> candle_core::Result<Tensor> {
            m.transpose(0, 1)?.contiguous()?.unsqueeze(1)?.expand((kv_heads, rep, t, hd))?.reshape((heads, t, hd))
        };
        let qh = q.transpose(0, 1)?.contiguous()?;
        let (kh, vh) = (expand(k)?, expand(v)?);
        let scores = (qh.matmul(&kh.t()?)? * scale)?.broadcast_add(&self.mask)?;
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let d_out = grad.reshape((t, heads, hd))?.transpose(0, 1)?.contiguous()?;
        let dv = p.t()?.matmul(&d_out)?;
        let dp = d_out.matmul(&vh.t()?)?;
        let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
        let dq = (ds.matmul(&kh)? * scale)?;
        let dk = (ds.t()?.matmul(&qh)? * scale)?;
        let fold = |m: Tensor| -> candle_core::Result<Tensor> { m.reshape((kv_heads, rep, t, hd))?.sum(1)?.transpose(0, 1)?.contiguous() };
        Ok((Some(dq.transpose(0, 1)?.contiguous()?), Some(fold(dk)?), Some(fold(dv)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= tol * m.max(1e-3), "max diff {d} vs scale {m}");
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn swiglu_backward_is_the_derivative_of_silu_times_up() {
        let (g, u) = (Var::from_tensor(&rand(&[3, 32], 1)).unwrap(), Var::from_tensor(&rand(&[3, 32], 2)).unwrap());
        let w = rand(&[3, 32], 3);
        let ours = g.as_tensor().apply_op2(u.as_tensor(), SwiGlu).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let exact = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        close(ours.get(&g).unwrap(), exact.get(&g).unwrap(), 1e-5);
        close(ours.get(&u).unwrap(), exact.get(&u).unwrap(), 1e-5);
    }

    #[test]
    fn rope_backward_rotates_back() {
        let x = Var::from_tensor(&rand(&[4, 2, 8], 4)).unwrap();
        let (cos, sin) = (rand(&[4, 4], 5).cos().unwrap(), rand(&[4, 4], 5).sin().unwrap());
        let w = rand(&[4, 2, 8], 6);
        let ours = x.as_tensor().apply_op1(Rope { cos: cos.clone(), sin: sin.clone() }).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let (c, s) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
        let (x0, x1) = (x.as_tensor().narrow(2, 0, 4).unwrap(), x.as_tensor().narrow(2, 4, 4).unwrap());
        let r0 = (x0.broadcast_mul(&c).unwrap() - x1.broadcast_mul(&s).unwrap()).unwrap();
        let r1 = (x0.broadcast_mul(&s).unwrap() + x1.broadcast_mul(&c).unwrap()).unwrap();
        let exact = Tensor::cat(&[r0, r1], 2).unwrap().mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        close(ours.get(&x).unwrap(), exact.get(&x).unwrap(), 1e-5);
    }

    #[test]
    fn flash_attention_matches_softmax_attention_forward_and_backward() {
        let (t, heads, kv_heads, hd, lens) = (7, 4, 2, 64, vec![3, 4]);
        let q = Var::from_tensor(&rand(&[t, heads, hd], 7)).unwrap();
        let k = Var::from_tensor(&ggml_numerics::round_tensor_f16(&rand(&[t, kv_heads, hd], 8)).unwrap()).unwrap();
        let v = Var::from_tensor(&ggml_numerics::round_tensor_f16(&rand(&[t, kv_heads, hd], 9)).unwrap()).unwrap();
        let mut m = vec![f32::NEG_INFINITY; t * t];
        let mut keys = Vec::new();
        let mut begin = 0;
        for &n in &lens {
            for i in begin..begin + n {
                m[i * t + begin..=i * t + i].fill(0.0);
                keys.push((begin..=i).collect::<Vec<usize>>());
            }
            begin += n;
        }
        let mask = Tensor::from_vec(m, (t, t), &Device::Cpu).unwrap();
        let w = rand(&[t, heads * hd], 10);
        let out = q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), FlashAttention { keys, mask: mask.clone() }).unwrap();
        // Exact softmax attention, by autograd.
        let rep = heads / kv_heads;
        let expand = |m: &Tensor| m.transpose(0, 1).unwrap().contiguous().unwrap().unsqueeze(1).unwrap().expand((kv_heads, rep, t, hd)).unwrap().reshape((heads, t, hd)).unwrap();
        let qh = q.as_tensor().transpose(0, 1).unwrap().contiguous().unwrap();
        let s = (qh.matmul(&expand(k.as_tensor()).t().unwrap()).unwrap() * 0.125).unwrap().broadcast_add(&mask).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        let exact = p.matmul(&expand(v.as_tensor())).unwrap().transpose(0, 1).unwrap().reshape((t, heads * hd)).unwrap();
        close(&out, &exact, 2e-3); // f16 query and running output
        let ours = out.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let reference = exact.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [&q, &k, &v] {
            close(ours.get(var).unwrap(), reference.get(var).unwrap(), 1e-4);
        }
    }
}
