//! Text ⇄ token ids, with the special-token conventions of the model's
//! `tokenizer_config.json` (BOS handling) on top of `tokenizers`.

use std::path::Path;

use tokenizers::Tokenizer;

use super::ModelError;

/// A tokenizer plus the model's BOS/EOS conventions.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub add_bos_token: bool,
    /// The longest token's text in bytes (as the vocabulary spells it, which
    /// is at least its decoded length): bounds how few tokens a text can be.
    pub max_token_bytes: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tokenizer, ModelError> {
        Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Wraps a tokenizer; special tokens are resolved to ids here.
    pub fn new(
        inner: Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos_token: bool,
        extra_eos_ids: &[u32],
    ) -> Self {
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let mut eos_ids: Vec<u32> = eos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .into_iter()
            .collect();
        for id in extra_eos_ids {
            if !eos_ids.contains(id) {
                eos_ids.push(*id);
            }
        }
        let max_token_bytes = inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1);
        TextTokenizer {
            inner,
            bos_token,
            eos_token,
            bos_id,
            eos_ids,
            add_bos_token,
            max_token_bytes,
        }
    }

    /// Encodes a raw completion prompt: the tokenizer's own special tokens,
    /// plus BOS when `add_bos_token` asks and the post-processor did not.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = self.encode_raw(text, true)?;
        self.ensure_bos(&mut ids);
        Ok(ids)
    }

    /// Encodes a rendered chat prompt: the template already wrote the special
    /// tokens it wants (as Hugging Face's `apply_chat_template` does).
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = self.encode_raw(text, false)?;
        let template_wrote_bos = self
            .bos_token
            .as_deref()
            .is_some_and(|b| !b.is_empty() && text.starts_with(b));
        if !template_wrote_bos {
            self.ensure_bos(&mut ids);
        }
        Ok(ids)
    }

    /// Encodes text that continues a prompt (an answer to train on): no
    /// BOS, and the end-of-sequence token appended so the model learns to stop.
    pub fn encode_answer(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = self.encode_raw(text, false)?;
        if let Some(eos) = self.eos_ids.first() {
            ids.push(*eos);
        }
        Ok(ids)
    }

    /// Encodes text the model said after a prompt, as it said it: no BOS and
    /// no end-of-sequence (a logged answer may have been cut by `max_tokens`).
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_raw(text, false)
    }

    fn ensure_bos(&self, ids: &mut Vec<u32>) {
        if let (true, Some(bos)) = (self.add_bos_token, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
    }

    fn encode_raw(&self, text: &str, special: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The text of one token as a client sees it in logprobs (special tokens kept).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
