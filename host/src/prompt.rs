//! Splitting a request into what APB needs: the context (prefilled across ranks), the trailing
//! query segment (run by every rank after prefill), and the clean question (embedded in anchors).

use crate::error::{bail, Result};
use apb_loaders::{ChatMessage, Tokenizer};

/// The split itself is the methods' input type.
pub use apb_plugin::PromptParts;

/// Marks message `i`'s content in a rendered template (control characters no template emits).
fn mark(i: usize) -> String {
    format!("\u{1}APB-MSG-{i}\u{1}")
}

/// The documented rule for `--chat` without `--question`: the question is the last paragraph of
/// the prompt (the text after its last blank line); the rest is the document.
pub fn split_question(text: &str) -> Option<(&str, &str)> {
    let (doc, q) = text.trim_end().rsplit_once("\n\n")?;
    let q = q.trim();
    (!q.is_empty()).then_some((doc, q))
}

/// The CLI's prompt: `text` as one user turn (`chat`) or raw text. Raw text without `question`
/// has its last paragraph as the question with `split` (methods that need one, as the server's
/// completions endpoint does), else none; a chat turn follows [`build_chat`]'s rule.
pub fn build(
    tok: &Tokenizer,
    text: &str,
    question: Option<&str>,
    chat: bool,
    split: bool,
) -> Result<PromptParts> {
    if chat {
        build_chat(tok, &[ChatMessage::user(text)], question)
    } else {
        build_text(tok, text, question, split)
    }
}

/// A raw prompt (no chat template; special tokens in it are parsed, as completions APIs do).
/// The question is `question`, else with `split` the last paragraph, else none.
pub fn build_text(
    tok: &Tokenizer,
    text: &str,
    question: Option<&str>,
    split: bool,
) -> Result<PromptParts> {
    let question = question.map(str::trim).filter(|q| !q.is_empty());
    // The query keeps the text's own separator, so every method sees the same prompt.
    let (doc, tail, q) = match question {
        Some(q) => (text, format!("\n{q}"), Some(q)),
        None => match split_question(text).filter(|_| split) {
            Some((d, q)) => (d, text[d.len()..].to_string(), Some(q)),
            None => (text, String::new(), None),
        },
    };
    let context = encode_nonempty(tok, doc, false)?;
    let query = encode_nonempty(tok, &tail, false)?;
    finish(tok, context, query, q, 0)
}

/// A chat, rendered with the model's template. Message contents are user text: encoded without
/// special-token parsing. The question (what APB embeds in its anchors) is, in order: the
/// `question` argument (appended to the last user turn); the last paragraph of the last user
/// turn (after its last blank line); or, when earlier messages exist, the whole last user turn.
/// Everything before the question is the context.
pub fn build_chat(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    question: Option<&str>,
) -> Result<PromptParts> {
    let Some(last) = messages.last() else {
        bail!("no messages");
    };
    // A chat may end with an assistant turn (the model continues after it, in a new turn) or be
    // a system message alone, as OpenAI accepts; then no user turn holds a question.
    let user_last = last.role == "user";
    if !user_last && question.is_some_and(|q| !q.trim().is_empty()) {
        bail!("'question' is appended to the last user turn: the last message must be the user's");
    }
    let marked: Vec<ChatMessage> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| ChatMessage {
            role: m.role.clone(),
            content: mark(i),
        })
        .collect();
    let rendered = tok.apply_chat_template(&marked)?;
    // Template pieces before each message's content, in order; `rest` ends as the suffix.
    let mut pieces = Vec::with_capacity(messages.len());
    let mut rest = rendered.as_str();
    for i in 0..messages.len() {
        match rest.split_once(&mark(i)) {
            Some((before, after)) => {
                pieces.push(before);
                rest = after;
            }
            None => bail!(
                "the chat template does not place message {i} verbatim; cannot split the prompt"
            ),
        }
    }
    // Earlier user or assistant turns make it a conversation (a system message alone does not).
    let conversation = messages[..messages.len() - 1]
        .iter()
        .any(|m| m.role != "system");
    let (doc, q) = match question.map(str::trim).filter(|q| !q.is_empty()) {
        Some(q) => (last.content.as_str(), Some(q)),
        None if !user_last => (last.content.as_str(), None),
        None => match split_question(&last.content) {
            Some((d, q)) => (d, Some(q)),
            None if conversation => ("", Some(last.content.trim())),
            None => (last.content.as_str(), None),
        },
    };
    let mut context = Vec::new();
    let mut prefix_len = 0;
    for (i, m) in messages.iter().enumerate() {
        context.extend(encode_nonempty(tok, pieces[i], false)?);
        if i == 0 {
            prefix_len = context.len();
        }
        let content = if i + 1 == messages.len() {
            doc
        } else {
            m.content.as_str()
        };
        context.extend(encode_nonempty(tok, content, true)?);
    }
    let mut query = match q {
        Some(q) if doc.is_empty() => tok.encode_plain(q)?,
        Some(q) => tok.encode_plain(&format!("\n\n{q}"))?,
        None => vec![],
    };
    query.extend(encode_nonempty(tok, rest, false)?);
    finish(tok, context, query, q, prefix_len)
}

/// Template text (trusted: special tokens parsed) or user text (`plain`).
fn encode_nonempty(tok: &Tokenizer, text: &str, plain: bool) -> Result<Vec<u32>> {
    Ok(match (text.is_empty(), plain) {
        (true, _) => vec![],
        (false, true) => tok.encode_plain(text)?,
        (false, false) => tok.encode(text)?,
    })
}

fn finish(
    tok: &Tokenizer,
    mut context: Vec<u32>,
    mut query: Vec<u32>,
    question: Option<&str>,
    prefix_len: usize,
) -> Result<PromptParts> {
    if query.is_empty() {
        // No question: the last prompt token starts the generation phase.
        match context.pop() {
            Some(t) => query.push(t),
            None => bail!("the prompt is empty"),
        }
    }
    let question = match question {
        Some(q) if !q.is_empty() => tok.encode_plain(q)?,
        _ => vec![],
    };
    Ok(PromptParts {
        prefix_len: prefix_len.min(context.len()),
        context,
        query_segment: query,
        question,
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
