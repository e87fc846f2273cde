//! Splitting a request into what APB needs: the context (prefilled across ranks), the trailing
//! query segment (run by every rank after prefill), and the clean question (embedded in anchors).

use anyhow::{bail, Result};
use apb_loaders::{ChatMessage, Tok};

#[derive(Debug, Clone)]
pub struct PromptParts {
    /// Chat-template prefix + document.
    pub context: Vec<u32>,
    /// Question + template suffix (assistant header): processed after prefill, at its true
    /// positions. Never empty.
    pub query: Vec<u32>,
    /// The clean question tokens (no template), empty when unknown.
    pub question: Vec<u32>,
    /// Tokens of the chat-template prefix at the start of `context` (where the anchor embeds
    /// the question), detected by rendering the template around a marker.
    pub prefix_len: usize,
}

impl PromptParts {
    /// The whole prompt, as the dense backend runs it.
    pub fn all(&self) -> Vec<u32> {
        [self.context.as_slice(), self.query.as_slice()].concat()
    }
}

const MARK: &str = "\u{1}APB-USER-TURN\u{1}";

/// The documented rule for `--chat` without `--question`: the question is the last paragraph of
/// the prompt (the text after its last blank line); the rest is the document.
pub fn split_question(text: &str) -> Option<(&str, &str)> {
    let (doc, q) = text.trim_end().rsplit_once("\n\n")?;
    let q = q.trim();
    (!q.is_empty() && !doc.trim().is_empty()).then_some((doc, q))
}

pub fn build(tok: &Tok, text: &str, question: Option<&str>, chat: bool) -> Result<PromptParts> {
    let (doc, question) = match question {
        Some(q) => (text, Some(q.trim())),
        None if chat => match split_question(text) {
            Some((d, q)) => (d, Some(q)),
            None => (text, None),
        },
        None => (text, None),
    };
    let (prefix, suffix) = if chat {
        let rendered = tok.apply_chat_template(&[ChatMessage::user(MARK)])?;
        match rendered.split_once(MARK) {
            Some((p, s)) => (p.to_string(), s.to_string()),
            None => bail!("the chat template does not place the user message verbatim; cannot split the prompt"),
        }
    } else {
        (String::new(), String::new())
    };
    let prefix_ids = if prefix.is_empty() {
        vec![]
    } else {
        tok.encode(&prefix)?
    };
    let mut context = prefix_ids.clone();
    context.extend(tok.encode(doc)?);
    let sep = if chat { "\n\n" } else { "\n" };
    let tail = match question {
        Some(q) => format!("{sep}{q}{suffix}"),
        None => suffix,
    };
    let mut query = if tail.is_empty() {
        vec![]
    } else {
        tok.encode(&tail)?
    };
    if query.is_empty() {
        // No question: the last prompt token starts the generation phase.
        match context.pop() {
            Some(t) => query.push(t),
            None => bail!("the prompt is empty"),
        }
    }
    if context.is_empty() {
        bail!("the prompt has no context before the question");
    }
    let question = match question {
        Some(q) => tok.encode(q)?,
        None => vec![],
    };
    Ok(PromptParts {
        context,
        query,
        question,
        prefix_len: prefix_ids.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_is_last_paragraph() {
        assert_eq!(
            split_question("doc line\n\nmore doc\n\nWhat is X?\n"),
            Some(("doc line\n\nmore doc", "What is X?"))
        );
        assert_eq!(split_question("no blank line here"), None);
    }
}
