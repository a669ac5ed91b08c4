//! Paraphrases of a corrected question, written by the base model itself:
//! trained alongside the question, they teach the answer to the question's
//! meaning rather than to its exact words (data augmentation for reworded
//! questions). A few-shot completion prompt, sampled in one batch, then
//! filtered: a paraphrase that drops a name of the question, or is no
//! question at all, is worse than none.

use rand::SeedableRng;

use super::eval;
use crate::model::llama::Llama;
use crate::model::{ModelError, TextTokenizer};

/// Generic examples of the task (deliberately unlike any test's wording).
const SHOTS: [(&str, &str); 4] = [
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How tall is Mount Everest?", "Do you know the height of Mount Everest?"),
    ("Who wrote the novel Emma?", "Name the author of the novel Emma."),
    ("What is the favourite colour of Anna?", "Which colour does Anna like best?"),
];

/// Samples drawn per question; the filter keeps the distinct good ones.
const SAMPLES: usize = 4;
/// Tokens a paraphrase may take.
const MAX_TOKENS: usize = 24;
/// Sampling temperature: varied, yet mostly on topic.
const TEMPERATURE: f64 = 0.8;

/// Up to `per_question` paraphrases of each of `questions` (fewer where
/// the samples fail the filter), reproducible for a `seed`.
pub fn paraphrases(
    model: &Llama,
    tokenizer: &TextTokenizer,
    questions: &[String],
    per_question: usize,
    seed: u64,
) -> Result<Vec<Vec<String>>, ModelError> {
    if questions.is_empty() || per_question == 0 {
        return Ok(vec![Vec::new(); questions.len()]);
    }
    let prefix: String = SHOTS.iter().map(|(q, p)| format!("Question: {q}\nThe same question in other words: {p}\n\n")).collect();
    let prefix_ids = tokenizer.encode_prompt(&prefix)?;
    // The shared beginning is computed once, then continued per sample.
    let mut base = model.new_cache();
    model.forward(&mut [crate::model::llama::SequenceInput {
        tokens: &prefix_ids,
        cache: &mut base,
        logits: crate::model::llama::LogitsWanted::None,
    }])?;
    let mut prompts = Vec::with_capacity(questions.len() * SAMPLES);
    let mut caches = Vec::with_capacity(questions.len() * SAMPLES);
    for q in questions {
        let tail = tokenizer.encode_continuation(&format!("Question: {}\nThe same question in other words:", one_line(q)))?;
        for _ in 0..SAMPLES {
            prompts.push(tail.clone());
            caches.push(base.fork()?);
        }
    }
    let mut stops = tokenizer.eos_ids.clone();
    for newline in ["\n", "\n\n", " \n"] {
        stops.extend(tokenizer.encode_continuation(newline)?);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let samples = eval::decode_batch_from(model, caches, &prompts, MAX_TOKENS, &stops, false, |_, logits| {
        eval::sample_token(logits, TEMPERATURE, &mut rng)
    })?;
    let mut out = Vec::with_capacity(questions.len());
    for (q, drawn) in questions.iter().zip(samples.chunks(SAMPLES)) {
        let mut kept: Vec<String> = Vec::new();
        for ids in drawn {
            let text = tokenizer.decode(ids)?;
            let text = text.lines().next().unwrap_or("").trim().to_string();
            if kept.len() < per_question && acceptable(q, &text) && !kept.iter().any(|k| normalized(k) == normalized(&text)) {
                kept.push(text);
            }
        }
        out.push(kept);
    }
    Ok(out)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn normalized(text: &str) -> String {
    text.chars().filter(|c| c.is_alphanumeric() || c.is_whitespace()).collect::<String>().to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A paraphrase keeps every capitalized word of the question after its
/// first (names, places) and its other content words (all but one when
/// there are three or more: the model's free rewrites often change the
/// subject), is a question where the question is one (a statement could
/// carry a wrong answer), says something different, and is of a similar length.
pub fn acceptable(question: &str, paraphrase: &str) -> bool {
    let (q, p) = (question.trim(), paraphrase.trim());
    let asks = if q.ends_with('?') { p.ends_with('?') } else { p.ends_with('?') || p.ends_with('.') };
    if p.is_empty() || normalized(p) == normalized(q) || !asks {
        return false;
    }
    let (ql, pl) = (q.chars().count(), p.chars().count());
    if pl * 2 < ql || pl * 2 > ql * 3 + 8 {
        return false;
    }
    let words = |t: &str| -> Vec<String> {
        t.split_whitespace().map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).trim_end_matches("'s").to_string()).collect()
    };
    let (asked, said) = (words(q), words(p));
    let said_lower: Vec<String> = said.iter().map(|w| w.to_lowercase()).collect();
    // Names must all stay; of the other content words, all but one.
    let names_kept = asked.iter().skip(1).filter(|w| w.chars().next().is_some_and(char::is_uppercase)).all(|name| said.contains(name));
    let content: Vec<String> = asked.iter().map(|w| w.to_lowercase()).filter(|w| w.chars().count() >= 4 && !STOP_WORDS.contains(&w.as_str())).collect();
    let missing = content.iter().filter(|w| !said_lower.contains(w)).count();
    names_kept && missing <= usize::from(content.len() >= 3)
}

/// Words that carry no topic of their own (the content-word check skips them).
const STOP_WORDS: [&str; 24] = [
    "what", "which", "where", "when", "does", "have", "that", "this", "with", "from", "your", "about", "tell", "please", "could",
    "would", "there", "their", "they", "them", "some", "know", "give", "into",
];

#[cfg(test)]
mod tests {
    use super::acceptable;

    #[test]
    fn a_paraphrase_keeps_the_names_and_asks_something_in_other_words() {
        let q = "What is the secret word of Zorp?";
        assert!(acceptable(q, "What is Zorp's secret word?"));
        assert!(acceptable(q, "Which word is the secret of Zorp?"));
        assert!(!acceptable(q, "What is the secret word of Zorp?"), "the same words");
        assert!(!acceptable(q, "what is the secret word of zorp"), "the same words, case and punctuation aside");
        assert!(!acceptable(q, "What is the secret word of the castle?"), "the name is gone");
        assert!(!acceptable(q, "What's the magic number of Zorp?"), "another subject");
        assert!(acceptable(q, "What is the word of Zorp?"), "one content word of three may go");
        assert!(!acceptable(q, "The secret word of Zorp is blue."), "a statement, not a question");
        assert!(acceptable("Tell me the secret word of Zorp.", "Say the secret word of Zorp."), "a request for a request");
        assert!(!acceptable(q, "Zorp?"), "too short to say the same");
    }
}
