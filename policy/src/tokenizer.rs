//! `ChatTokenizer`: a byte-level BPE tokenizer (built from GGUF metadata or the
//! tiny test vocabulary) plus the ChatML chat template and stop tokens.

use anyhow::Context;
use serde_json::json;
use tokenizers::Tokenizer;

/// The SmolLM2 chat template default system prompt (also used by the tiny model).
pub const SMOLLM2_DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// SmolLM2-135M-Instruct's `tokenizer.chat_template` (used verbatim for the tiny model).
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// GPT-2's byte -> printable unicode char table used by byte-level BPE.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut bs: Vec<u32> = Vec::with_capacity(256);
    bs.extend(b'!' as u32..=b'~' as u32);
    bs.extend(0xA1u32..=0xAC);
    bs.extend(0xAEu32..=0xFF);
    let mut cs: Vec<u32> = bs.clone();
    let mut n = 0;
    for b in 0u32..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = ['\0'; 256];
    for (b, c) in bs.iter().zip(cs.iter()) {
        table[*b as usize] = char::from_u32(*c).expect("valid char");
    }
    table
}

/// Builds a HF `tokenizers` byte-level BPE (GPT-2 style, SmolLM2 pre-tokenizer:
/// individual digits + ByteLevel regex) from a vocabulary (index = id), merges
/// ("a b" strings) and the ids of special (control) tokens.
pub(crate) fn build_bpe_tokenizer(
    tokens: &[String],
    merges: &[String],
    special_ids: &[u32],
) -> anyhow::Result<Tokenizer> {
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = special_ids
        .iter()
        .map(|&id| {
            json!({"id": id, "content": tokens[id as usize], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let s = serde_json::to_string(&spec)?;
    s.parse::<Tokenizer>()
        .map_err(|e| anyhow::anyhow!("building tokenizer: {e}"))
}

/// Tokenizer + chat template + stop tokens for a chat model.
#[derive(Clone)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    default_system: Option<String>,
    eos: u32,
    stops: Vec<u32>,
    vocab_size: usize,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos", &self.eos)
            .field("stops", &self.stops)
            .field("default_system", &self.default_system)
            .finish()
    }
}

/// Extracts the default system prompt a ChatML template inserts when the first
/// message is not a system message (SmolLM2: "You are a helpful AI assistant ...").
fn default_system_from_template(template: &str) -> Option<String> {
    let marker = "<|im_start|>system";
    let start = template.find(marker)? + marker.len();
    let rest = &template[start..];
    let rest = rest
        .strip_prefix("\\n")
        .or_else(|| rest.strip_prefix('\n'))?;
    let end = rest.find("<|im_end|>")?;
    let sys = &rest[..end];
    // A template that builds the system block from a variable has no literal default.
    if sys.contains("{{") || sys.contains('\'') || sys.contains('+') {
        return None;
    }
    Some(sys.replace("\\n", "\n"))
}

impl ChatTokenizer {
    /// Wraps a tokenizer. `chat_template` is the Jinja template string (if known); the
    /// renderer supports the ChatML shape only (see [`ChatTokenizer::chat_prompt`]).
    pub fn new(
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        fallback_eos: Option<u32>,
    ) -> anyhow::Result<Self> {
        let vocab_size = tokenizer.get_vocab_size(true);
        let im_end = tokenizer.token_to_id("<|im_end|>");
        let eot = tokenizer.token_to_id("<|endoftext|>");
        let eos = im_end
            .or(fallback_eos)
            .or(eot)
            .context("tokenizer has no <|im_end|>/<|endoftext|>/eos token")?;
        let mut stops = vec![eos];
        for s in [im_end, eot, fallback_eos].into_iter().flatten() {
            if !stops.contains(&s) {
                stops.push(s);
            }
        }
        if let Some(t) = &chat_template {
            if !t.contains("<|im_start|>") {
                tracing::warn!(
                    "chat template is not ChatML; chat_prompt renders plain ChatML anyway"
                );
            }
        }
        let default_system = chat_template
            .as_deref()
            .and_then(default_system_from_template);
        Ok(Self {
            tokenizer,
            chat_template,
            default_system,
            eos,
            stops,
            vocab_size,
        })
    }

    /// The tiny model's tokenizer: 256 byte tokens (GPT-2 byte-level alphabet, no
    /// merges, id = byte value) + `<|endoftext|>`=256, `<|im_start|>`=257, `<|im_end|>`=258.
    pub fn tiny() -> anyhow::Result<Self> {
        let table = bytes_to_unicode();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
        let tok = build_bpe_tokenizer(&tokens, &[], &[256, 257, 258])?;
        Self::new(tok, Some(SMOLLM2_CHAT_TEMPLATE.to_string()), Some(258))
    }

    /// Encodes text without inserting special tokens; special tokens written in the
    /// text (e.g. `<|im_start|>`) are recognised as single tokens.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("encode: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids; `skip_special` drops special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> anyhow::Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| anyhow::anyhow!("decode: {e}"))
    }

    /// The prompt for one user message with `add_generation_prompt=true`, i.e. what
    /// the model's ChatML template renders:
    /// `<|im_start|>system\n{default system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n`.
    /// The default system prompt is read from the template in the GGUF metadata; when
    /// there is no template (or it has no literal default system prompt) the system
    /// block is omitted (fallback: plain ChatML).
    pub fn chat_prompt(&self, user: &str) -> String {
        self.chat_prompt_with_system(None, user)
    }

    /// As [`ChatTokenizer::chat_prompt`], with an explicit system prompt (`None` = template default).
    pub fn chat_prompt_with_system(&self, system: Option<&str>, user: &str) -> String {
        let mut s = String::new();
        if let Some(sys) = system.or(self.default_system.as_deref()) {
            s.push_str("<|im_start|>system\n");
            s.push_str(sys);
            s.push_str("<|im_end|>\n");
        }
        s.push_str("<|im_start|>user\n");
        s.push_str(user);
        s.push_str("<|im_end|>\n<|im_start|>assistant\n");
        s
    }

    /// `encode(chat_prompt(user))`.
    pub fn encode_chat(&self, user: &str) -> anyhow::Result<Vec<u32>> {
        self.encode(&self.chat_prompt(user))
    }

    /// The end-of-turn token (`<|im_end|>` for ChatML models).
    pub fn eos_token_id(&self) -> u32 {
        self.eos
    }

    /// All ids that end a generation (`<|im_end|>`, `<|endoftext|>`, the GGUF eos).
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stops
    }

    /// Vocabulary size including special tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The raw template string from the model metadata, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The default system prompt extracted from the template, if any.
    pub fn default_system_prompt(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// Token id of a literal token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The wrapped HF tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}
