//! Examples as the model sees them (`ferrotune preprocess --show`): each
//! token's text, decoded in order (`TextTokenizer::token_pieces`), with
//! the trained tokens marked — in colour on a terminal (green trained, dim
//! the rest), else between `[[` and `]]` — and, with `ids`, each token
//! followed by its id in parentheses.
//!
//! One method per kind of example a run trains on (SFT sequence,
//! preference pair, KTO example, reward pair); a new kind gets its own
//! method here, built on `Show::tokens`.

use super::preference::{KtoExample, PreferencePair, RewardPair, completion_sequence};
use super::tokenizer::TextTokenizer;
use crate::model::batch::{IGNORE_INDEX, Sequence};

/// How trained tokens are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marking {
    /// ANSI colours: green trained tokens, dim the others.
    Color,
    /// Trained runs of tokens between `[[` and `]]`; the others plain.
    Brackets,
}

const GREEN: &str = "\x1b[32m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

pub struct Show<'a> {
    /// None (a pre-tokenized run without a tokenizer): tokens show as `<id>`.
    pub tokenizer: Option<&'a TextTokenizer>,
    pub marking: Marking,
    pub ids: bool,
}

impl Show<'_> {
    /// An SFT sequence. A token is trained when its label is not -100;
    /// the first never is (nothing before it predicts it).
    pub fn sequence(&self, s: &Sequence) -> String {
        let trained: Vec<bool> = s.labels.iter().enumerate().map(|(i, &l)| i > 0 && l != IGNORE_INDEX).collect();
        let pieces = self.pieces(&s.input_ids);
        self.tokens(&pieces, &s.input_ids, &trained)
    }

    /// A preference pair: the prompt, then each completion (trained) as it
    /// follows the prompt.
    pub fn pair(&self, p: &PreferencePair) -> String {
        let (prompt, chosen) = self.completion(&p.prompt, &p.chosen, true);
        let (_, rejected) = self.completion(&p.prompt, &p.rejected, true);
        section("prompt", &prompt) + &section("chosen", &chosen) + &section("rejected", &rejected)
    }

    /// A KTO example: the prompt and its completion, with the label.
    pub fn kto(&self, e: &KtoExample) -> String {
        let (prompt, completion) = self.completion(&e.prompt, &e.completion, true);
        let label = if e.desirable { "completion (desirable)" } else { "completion (undesirable)" };
        section("prompt", &prompt) + &section(label, &completion)
    }

    /// A GRPO prompt (its completions are sampled during training).
    pub fn prompt(&self, ids: &[u32]) -> String {
        section("prompt", &self.tokens(&self.pieces(ids), ids, &vec![false; ids.len()]))
    }

    /// A reward-model pair: both whole sequences, unmarked (the model is
    /// scored at each sequence's last token, not trained per token).
    pub fn reward(&self, r: &RewardPair) -> String {
        let show = |ids: &[u32]| self.tokens(&self.pieces(ids), ids, &vec![false; ids.len()]);
        let mut out = section("chosen", &show(&r.chosen)) + &section("rejected", &show(&r.rejected));
        if let Some(m) = r.margin {
            out += &format!("margin: {m}\n");
        }
        out
    }

    /// The prompt and the completion rendered, decoded as one sequence so
    /// the completion's first token reads as it does after the prompt.
    fn completion(&self, prompt: &[u32], completion: &[u32], trained: bool) -> (String, String) {
        let s = completion_sequence(prompt, completion);
        let pieces = self.pieces(&s.input_ids);
        let n = prompt.len();
        let head = self.tokens(&pieces[..n], prompt, &vec![false; n]);
        let tail = self.tokens(&pieces[n..], completion, &vec![trained; completion.len()]);
        (head, tail)
    }

    fn pieces(&self, ids: &[u32]) -> Vec<String> {
        match self.tokenizer {
            Some(t) => t.token_pieces(ids),
            None => ids.iter().map(|id| format!("<{id}>")).collect(),
        }
    }

    /// Tokens with their texts, each run of trained or untrained tokens
    /// opened and closed by its marking.
    pub fn tokens(&self, pieces: &[String], ids: &[u32], trained: &[bool]) -> String {
        let mut out = String::new();
        let mut run: Option<bool> = None;
        for ((piece, &id), &t) in pieces.iter().zip(ids).zip(trained) {
            if run != Some(t) {
                if let Some(prev) = run {
                    out += self.close(prev);
                }
                out += self.open(t);
                run = Some(t);
            }
            if self.ids && self.tokenizer.is_some() {
                // Line breaks and tabs escaped, so each token(id) reads as one.
                let text = piece.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r").replace('\t', "\\t");
                out += &format!("{text}({id})");
            } else {
                out += piece;
            }
        }
        if let Some(prev) = run {
            out += self.close(prev);
        }
        out
    }

    fn open(&self, trained: bool) -> &'static str {
        match (self.marking, trained) {
            (Marking::Color, true) => GREEN,
            (Marking::Color, false) => DIM,
            (Marking::Brackets, true) => "[[",
            (Marking::Brackets, false) => "",
        }
    }

    fn close(&self, trained: bool) -> &'static str {
        match (self.marking, trained) {
            (Marking::Color, _) => RESET,
            (Marking::Brackets, true) => "]]",
            (Marking::Brackets, false) => "",
        }
    }
}

/// A titled section, ending in a newline.
fn section(title: &str, body: &str) -> String {
    let nl = if body.ends_with('\n') { "" } else { "\n" };
    format!("{title}:\n{body}{nl}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(marking: Marking, ids: bool) -> Show<'static> {
        Show { tokenizer: None, marking, ids }
    }

    #[test]
    fn trained_runs_are_bracketed_and_the_first_token_never_is() {
        let s = Sequence { input_ids: vec![1, 2, 3, 4, 5], labels: vec![1, -100, 3, 4, -100] };
        assert_eq!(plain(Marking::Brackets, false).sequence(&s), "<1><2>[[<3><4>]]<5>");
        assert_eq!(
            plain(Marking::Color, false).sequence(&s),
            format!("{DIM}<1><2>{RESET}{GREEN}<3><4>{RESET}{DIM}<5>{RESET}")
        );
    }

    #[test]
    fn pairs_show_the_prompt_and_both_completions_trained() {
        let p = PreferencePair { prompt: vec![7, 8], chosen: vec![9], rejected: vec![10, 11] };
        assert_eq!(plain(Marking::Brackets, false).pair(&p), "prompt:\n<7><8>\nchosen:\n[[<9>]]\nrejected:\n[[<10><11>]]\n");
        let k = KtoExample { prompt: vec![7], completion: vec![9], desirable: false };
        assert_eq!(plain(Marking::Brackets, false).kto(&k), "prompt:\n<7>\ncompletion (undesirable):\n[[<9>]]\n");
    }
}
