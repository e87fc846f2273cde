//! Tokenizer (the `tokenizers` crate) and chat template (`minijinja`), from an HF directory or
//! from GGUF metadata, plus the ids that stop generation.

use crate::error::{load_err, LoadError, Result};
use crate::gguf::GgufModel;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer as HfTokenizer};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
/// One chat turn.
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl ChatMessage {
    /// A user turn.
    pub fn user(text: &str) -> Self {
        Self {
            role: "user".into(),
            content: text.into(),
        }
    }
}

/// A model's tokenizer with its chat template and stop ids.
pub struct Tokenizer {
    /// The tokenizer, special tokens parsed.
    pub tokenizer: HfTokenizer,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// The template's `bos_token`.
    pub bos_token: Option<String>,
    /// The template's `eos_token`.
    pub eos_token: Option<String>,
    /// Generation stops on any of these.
    pub stop_ids: BTreeSet<u32>,
    /// The same tokenizer with special-token parsing off: user text that spells a control token
    /// (`<|im_start|>`) is encoded as plain text, so it cannot forge chat turns.
    plain: HfTokenizer,
    /// Long texts may be encoded in parallel pieces (see [`Tokenizer::encode`]).
    splittable: bool,
}

/// Texts at least this long are encoded in parallel pieces when the tokenizer allows it (a 32K-token
/// prompt took ~80 ms on one core: most of what the server added to its time to first token).
const PARALLEL_MIN_BYTES: usize = 64 << 10;

/// Whether cutting a text before a space that sits between two ASCII letters gives the same ids
/// as encoding it whole. True for GPT-2-style byte-level BPE (Llama-3, Qwen-2.5, SmolLM2): a
/// pre-tokenizer chain of only ByteLevel (with its GPT-2 regex), Digits, and Split on a regex with
/// the GPT-style letter rule (`?\p{L}+`: " word" always starts a new piece), since BPE merges
/// never cross pieces; no normalizer but NFC; no added token containing whitespace. Anything else
/// (SentencePiece's Metaspace, custom splits) is encoded whole.
fn splittable(t: &HfTokenizer) -> bool {
    let Some(pre) = t
        .get_pre_tokenizer()
        .and_then(|p| serde_json::to_value(p).ok())
    else {
        return false;
    };
    let chain: Vec<serde_json::Value> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"].as_array().cloned().unwrap_or_default(),
        _ => vec![pre],
    };
    let mut letters_split = false;
    let mut byte_level = false;
    for p in &chain {
        match p["type"].as_str() {
            Some("Digits") => {}
            Some("Split") => {
                let pattern = p["pattern"]["Regex"].as_str().unwrap_or("");
                if !pattern.contains(r"?\p{L}+") {
                    return false;
                }
                letters_split = true;
            }
            Some("ByteLevel") => {
                if p["use_regex"] != serde_json::Value::Bool(true) && !letters_split {
                    return false;
                }
                byte_level = true;
            }
            _ => return false,
        }
    }
    let norm = t
        .get_normalizer()
        .and_then(|n| serde_json::to_value(n).ok());
    byte_level
        && norm.is_none_or(|n| n["type"] == "NFC")
        && !t
            .get_added_tokens_decoder()
            .values()
            .any(|a| a.content.chars().any(char::is_whitespace))
}

/// Cut points (byte offsets) splitting `text` into about `parts` pieces, each cut before a space
/// between two ASCII letters.
fn cut_points(text: &str, parts: usize) -> Vec<usize> {
    let b = text.as_bytes();
    let mut cuts: Vec<usize> = Vec::new();
    for k in 1..parts {
        let mut i = (b.len() * k / parts).max(cuts.last().map_or(1, |c| c + 1));
        while i + 1 < b.len()
            && !(b[i] == b' ' && b[i - 1].is_ascii_alphabetic() && b[i + 1].is_ascii_alphabetic())
        {
            i += 1;
        }
        if i + 1 < b.len() {
            cuts.push(i);
        }
    }
    cuts
}

/// Encodes `text`, in parallel pieces when it is long and `split` says that is exact.
fn encode_with(t: &HfTokenizer, text: &str, split: bool) -> Result<Vec<u32>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let parts = if split && text.len() >= PARALLEL_MIN_BYTES {
        threads
    } else {
        1
    };
    encode_pieces(t, text, parts)
}

/// Encodes `text` as about `parts` pieces (one thread each) cut by [`cut_points`].
fn encode_pieces(t: &HfTokenizer, text: &str, parts: usize) -> Result<Vec<u32>> {
    let cuts = if parts > 1 {
        cut_points(text, parts)
    } else {
        vec![]
    };
    let one = |piece: &str| -> Result<Vec<u32>> {
        t.encode(piece, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| load_err!("tokenizer: {e}"))
    };
    if cuts.is_empty() {
        return one(text);
    }
    let starts = std::iter::once(0).chain(cuts.iter().copied());
    let ends = cuts.iter().copied().chain(std::iter::once(text.len()));
    let bounds: Vec<(usize, usize)> = starts.zip(ends).collect();
    let pieces: Vec<Result<Vec<u32>>> = std::thread::scope(|s| {
        let hs: Vec<_> = bounds
            .iter()
            .map(|&(a, b)| s.spawn(move || one(&text[a..b])))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(load_err!("tokenizer thread panicked")))
            })
            .collect()
    });
    let mut ids = Vec::new();
    for p in pieces {
        ids.extend(p?);
    }
    Ok(ids)
}

/// Special tokens that end a turn in the families we load.
const END_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "</s>",
];

impl Tokenizer {
    fn finish(
        tokenizer: HfTokenizer,
        chat_template: Option<String>,
        bos: Option<String>,
        eos: Option<String>,
        eos_ids: &[u32],
    ) -> Self {
        let mut stop_ids: BTreeSet<u32> = eos_ids.iter().copied().collect();
        for t in END_TOKENS.iter().copied().chain(eos.as_deref()) {
            if let Some(id) = tokenizer.token_to_id(t) {
                stop_ids.insert(id);
            }
        }
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        Self {
            splittable: splittable(&tokenizer),
            plain,
            tokenizer,
            chat_template,
            bos_token: bos,
            eos_token: eos,
            stop_ids,
        }
    }

    /// From an HF model directory: `tokenizer.json` and, if present, `tokenizer_config.json`
    /// (chat template, special tokens) and `chat_template.jinja`.
    pub fn from_dir(dir: &Path, eos_ids: &[u32]) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(LoadError::file(&tj, "missing tokenizer.json: the model directory needs its tokenizer (download it with the weights)"));
        }
        let tokenizer = HfTokenizer::from_file(&tj)
            .map_err(|e| LoadError::file(&tj, format!("invalid tokenizer ({e})")))?;
        let mut template = None;
        let (mut bos, mut eos) = (None, None);
        let tc = dir.join("tokenizer_config.json");
        if tc.exists() {
            let text = std::fs::read_to_string(&tc).map_err(|e| LoadError::file(&tc, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| LoadError::file(&tc, format!("invalid JSON ({e})")))?;
            template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(String::from),
                _ => None,
            };
            let tok_str = |k: &str| match v.get(k) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                None => None,
            };
            bos = tok_str("bos_token");
            eos = tok_str("eos_token");
        }
        let jinja = dir.join("chat_template.jinja");
        if template.is_none() && jinja.exists() {
            template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| LoadError::file(&jinja, e))?);
        }
        Ok(Self::finish(tokenizer, template, bos, eos, eos_ids))
    }

    /// From GGUF metadata (`tokenizer.ggml.*`); gpt2-style byte-level BPE.
    pub fn from_gguf(g: &GgufModel, eos_ids: &[u32]) -> Result<Self> {
        let model = g.md_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(load_err!(
                "GGUF tokenizer model '{model}' is not supported (supported: gpt2 byte-level BPE)"
            ));
        }
        let tokens = g.md_strings("tokenizer.ggml.tokens")?;
        let merges = g.md_strings("tokenizer.ggml.merges")?;
        let types = g.md_i32s("tokenizer.ggml.token_type");
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| load_err!("GGUF tokenizer: {e}"))?;
        let mut tokenizer = HfTokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        // SmolLM ("smollm" pre-tokenizer) splits digits individually before byte-level BPE.
        let pre: PreTokenizerWrapper = match g.md_str("tokenizer.ggml.pre") {
            Some("smollm") => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            _ => byte_level.into(),
        };
        tokenizer.with_pre_tokenizer(Some(pre));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| load_err!("GGUF tokenizer: {e}"))?;
        let name = |key: &str| {
            g.md_token_id(key)
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        let template = g.md_str("tokenizer.chat_template").map(String::from);
        Ok(Self::finish(
            tokenizer,
            template,
            name("tokenizer.ggml.bos_token_id"),
            name("tokenizer.ggml.eos_token_id"),
            eos_ids,
        ))
    }

    /// Encodes trusted text (templates, raw prompts): special-token spellings become their ids.
    /// Long texts are encoded in parallel pieces where that gives the same ids (tested).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode_with(&self.tokenizer, text, self.splittable)
    }

    /// Whether long texts are encoded in parallel pieces.
    pub fn encodes_in_parallel(&self) -> bool {
        self.splittable
    }

    /// Test hook: `text` encoded in `parts` pieces, as [`Tokenizer::encode`] (or, with `plain`,
    /// [`Tokenizer::encode_plain`]) does on a machine of that many threads.
    #[doc(hidden)]
    pub fn encode_in_pieces(&self, text: &str, parts: usize, plain: bool) -> Result<Vec<u32>> {
        encode_pieces(
            if plain { &self.plain } else { &self.tokenizer },
            text,
            parts,
        )
    }

    /// Encodes untrusted text (a user's message): special-token spellings stay plain text.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        encode_with(&self.plain, text, self.splittable)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| load_err!("tokenizer: {e}"))
    }

    /// Renders `messages` with the model's chat template, ending with the assistant prompt.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| load_err!("this model has no chat template, so chat prompts cannot be built: give it a plain prompt (apb generate without --chat, the server's /v1/completions)"))?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| load_err!("chat template: {e}"))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| load_err!("chat template: {e}"))
    }
}
