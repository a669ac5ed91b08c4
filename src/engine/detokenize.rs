//! Incremental detokenization: turns one token at a time into text deltas
//! that never split a multi-byte character and keep the spacing a full
//! decode would give.

use crate::model::TextTokenizer;

/// How many tokens of context a window keeps before the unread ones.
const CONTEXT: usize = 6;

/// Decodes a growing token list into appended text.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Starts after `context` (the prompt), whose text is not emitted.
    pub fn new(context: &[u32]) -> Self {
        let keep = &context[context.len().saturating_sub(CONTEXT)..];
        IncrementalDecoder { ids: keep.to_vec(), prefix_offset: 0, read_offset: keep.len() }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]).unwrap_or_default();
        let full = tokenizer.decode(&self.ids[self.prefix_offset..]).unwrap_or_default();
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(prefix.as_str()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.compact();
            delta
        } else {
            String::new()
        }
    }

    /// Text still held because it ended in an incomplete character.
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> String {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]).unwrap_or_default();
        let full = tokenizer.decode(&self.ids[self.prefix_offset..]).unwrap_or_default();
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        full.get(prefix.len()..).unwrap_or("").to_string()
    }

    fn compact(&mut self) {
        if self.prefix_offset > 64 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}
