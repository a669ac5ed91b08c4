//! Incremental detokenization: turns one token at a time into text deltas
//! that never split a multi-byte character and keep the spacing a full
//! decode would give.

use crate::model::TextTokenizer;

/// How many tokens of context a window keeps before the unread ones.
const CONTEXT: usize = 6;
/// Most tokens one character can span (UTF-8 bytes as byte-fallback tokens).
const MAX_CHAR_TOKENS: usize = 4;

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
        IncrementalDecoder {
            ids: keep.to_vec(),
            prefix_offset: 0,
            read_offset: keep.len(),
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])
            .unwrap_or_default();
        let full = tokenizer
            .decode(&self.ids[self.prefix_offset..])
            .unwrap_or_default();
        // A character is at most 4 byte tokens: past that, U+FFFD is the real text.
        let stuck = self.ids.len() - self.read_offset > MAX_CHAR_TOKENS;
        if full.len() > prefix.len()
            && (stuck || !full.ends_with('\u{FFFD}'))
            && full.starts_with(prefix.as_str())
        {
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
        let prefix = tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])
            .unwrap_or_default();
        let full = tokenizer
            .decode(&self.ids[self.prefix_offset..])
            .unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::builtin::byte_tokenizer;

    fn tok() -> TextTokenizer {
        TextTokenizer::new(
            byte_tokenizer().unwrap(),
            Some("<s>".into()),
            Some("</s>".into()),
            true,
            &[],
        )
    }

    #[test]
    fn a_multibyte_character_is_released_whole() {
        let t = tok();
        let mut d = IncrementalDecoder::new(&[1]);
        let ids = t.encode_chat("é").unwrap();
        let out: Vec<String> = ids[1..].iter().map(|&id| d.push(&t, id)).collect();
        assert_eq!(out, vec!["".to_string(), "é".to_string()]);
    }

    #[test]
    fn invalid_bytes_do_not_hold_text_forever() {
        let t = tok();
        let mut d = IncrementalDecoder::new(&[1]);
        let bad = 0xFF + 3; // byte 0xFF never starts a valid character
        let emitted: String = (0..6).map(|_| d.push(&t, bad)).collect();
        assert!(!emitted.is_empty());
    }
}
