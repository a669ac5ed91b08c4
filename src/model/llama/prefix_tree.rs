//! Sequences of a training pass packed as a prefix tree: tokens that begin
//! several sequences alike (a chat template's system prompt, the prompt a
//! preference's two answers share) are computed once. Each token attends
//! to its ancestors and itself, at its depth as position, so every
//! sequence sees exactly what it would see alone; gradients through a
//! shared token add up over the sequences that read it.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

/// Tokens of several sequences merged on common prefixes, parents before children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixTree {
    pub tokens: Vec<u32>,
    /// Each token's position in its sequences (its depth).
    pub positions: Vec<u32>,
    /// The token before it in its sequences; `None` for a first token.
    pub parents: Vec<Option<usize>>,
}

impl PrefixTree {
    /// Merges `seqs`; returns the tree and, per sequence, the tree index of each of its tokens.
    pub fn build(seqs: &[&[u32]]) -> (PrefixTree, Vec<Vec<usize>>) {
        let mut tree = PrefixTree { tokens: Vec::new(), positions: Vec::new(), parents: Vec::new() };
        let mut children: HashMap<(Option<usize>, u32), usize> = HashMap::new();
        let mut paths = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let mut path = Vec::with_capacity(seq.len());
            let mut parent = None;
            for (depth, &token) in seq.iter().enumerate() {
                let node = *children.entry((parent, token)).or_insert_with(|| {
                    tree.tokens.push(token);
                    tree.positions.push(depth as u32);
                    tree.parents.push(parent);
                    tree.tokens.len() - 1
                });
                path.push(node);
                parent = Some(node);
            }
            paths.push(path);
        }
        (tree, paths)
    }

    /// Number of tokens computed.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The tokens token `i` attends to, in sequence order (ancestors, then itself).
    pub fn visible(&self, i: usize) -> Vec<usize> {
        let mut keys = vec![i];
        let mut at = self.parents[i];
        while let Some(p) = at {
            keys.push(p);
            at = self.parents[p];
        }
        keys.reverse();
        keys
    }

    /// `[T, T]` additive attention mask: 0 where a token sees another, -inf elsewhere.
    pub fn mask(&self, device: &Device) -> candle_core::Result<Tensor> {
        let t = self.len();
        let mut m = vec![f32::NEG_INFINITY; t * t];
        for i in 0..t {
            for j in self.visible(i) {
                m[i * t + j] = 0.0;
            }
        }
        Tensor::from_vec(m, (t, t), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_beginnings_are_stored_once_and_each_sequence_keeps_its_own_path() {
        let (a, b, c) = ([1u32, 2, 3, 4], [1u32, 2, 5], [7u32, 2]);
        let (tree, paths) = PrefixTree::build(&[&a, &b, &c]);
        assert_eq!(tree.tokens, vec![1, 2, 3, 4, 5, 7, 2]);
        assert_eq!(tree.positions, vec![0, 1, 2, 3, 2, 0, 1]);
        assert_eq!(paths, vec![vec![0, 1, 2, 3], vec![0, 1, 4], vec![5, 6]]);
        for (seq, path) in [&a[..], &b[..], &c[..]].iter().zip(&paths) {
            let got: Vec<u32> = path.iter().map(|&i| tree.tokens[i]).collect();
            assert_eq!(&got, seq);
            assert_eq!(tree.visible(*path.last().unwrap()), *path);
        }
    }

    #[test]
    fn identical_sequences_share_every_token_and_the_mask_is_causal_along_paths() {
        let (tree, paths) = PrefixTree::build(&[&[3, 4], &[3, 4], &[3, 9]]);
        assert_eq!(tree.len(), 3);
        assert_eq!(paths[0], paths[1]);
        let m = tree.mask(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let sees = |i: usize, j: usize| m[i][j] == 0.0;
        assert!(sees(1, 0) && sees(2, 0) && sees(1, 1));
        assert!(!sees(0, 1) && !sees(1, 2) && !sees(2, 1));
    }
}
