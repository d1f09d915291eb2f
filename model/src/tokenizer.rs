//! `ChatTokenizer`: a Hugging Face `tokenizers` tokenizer (built from GGUF
//! metadata, loaded from a checkpoint's `tokenizer.json`, or the tiny test
//! vocabulary) plus the model's Jinja chat template (rendered with minijinja,
//! see [`crate::template`]), its special tokens and the stop tokens.

use anyhow::Context;

use crate::template::{ChatTemplate, SpecialTokens};
use serde_json::json;
use tokenizers::Tokenizer;

/// The SmolLM2 chat template default system prompt (also used by the tiny model).
pub const SMOLLM2_DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// SmolLM2-135M-Instruct's `tokenizer.chat_template` (used verbatim for the tiny model).
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Qwen2.5-Instruct's chat template (used by the `tiny-qwen2` test model).
pub const QWEN25_CHAT_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// A Llama-3.x-style chat template (bos token, `strftime_now` date, `|trim`), used
/// by the `tiny-llama3` test model.
pub const LLAMA3_STYLE_CHAT_TEMPLATE: &str = r#"{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

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
    compiled: Option<ChatTemplate>,
    special: SpecialTokens,
    model_max_length: Option<usize>,
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
            .field("special", &self.special)
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
    /// Wraps a tokenizer. `chat_template` is the Jinja template string (if known),
    /// rendered by [`ChatTokenizer::chat_prompt`]; `fallback_eos` is the model's eos id.
    pub fn new(
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        fallback_eos: Option<u32>,
    ) -> anyhow::Result<Self> {
        let special = SpecialTokens {
            eos: fallback_eos.and_then(|id| tokenizer.id_to_token(id)),
            ..SpecialTokens::default()
        };
        Self::with_special_tokens(tokenizer, chat_template, special, &[], None)
    }

    /// Wraps a tokenizer with its special-token strings (`bos`/`eos`/`pad`/`unk`, as
    /// in `tokenizer_config.json`), extra stop ids (e.g. `generation_config.json`'s
    /// eos list) and `model_max_length`. The end-of-turn token is `<|im_end|>` when
    /// the vocabulary has it, else the eos token, else `<|endoftext|>`.
    pub fn with_special_tokens(
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        special: SpecialTokens,
        extra_stops: &[u32],
        model_max_length: Option<usize>,
    ) -> anyhow::Result<Self> {
        let vocab_size = tokenizer.get_vocab_size(true);
        let im_end = tokenizer.token_to_id("<|im_end|>");
        let eot = tokenizer.token_to_id("<|endoftext|>");
        let eos_id = special
            .eos
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t));
        let eos = im_end
            .or(eos_id)
            .or(eot)
            .or(extra_stops.first().copied())
            .context("tokenizer has no <|im_end|>/<|endoftext|>/eos token")?;
        let mut stops = vec![eos];
        for s in [im_end, eot, eos_id]
            .into_iter()
            .flatten()
            .chain(extra_stops.iter().copied())
        {
            if !stops.contains(&s) && (s as usize) < vocab_size {
                stops.push(s);
            }
        }
        let compiled = match chat_template.as_deref() {
            Some(t) => match ChatTemplate::new(t) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("{e:#}; chat prompts fall back to plain ChatML");
                    None
                }
            },
            None => None,
        };
        let default_system = chat_template
            .as_deref()
            .and_then(default_system_from_template);
        Ok(Self {
            tokenizer,
            chat_template,
            compiled,
            special,
            model_max_length,
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
        Self::tiny_with_template(
            SMOLLM2_CHAT_TEMPLATE,
            SpecialTokens {
                bos: Some("<|im_start|>".into()),
                eos: Some("<|im_end|>".into()),
                pad: Some("<|im_end|>".into()),
                unk: Some("<|endoftext|>".into()),
            },
        )
    }

    /// The tiny byte-level vocabulary with another chat template and special tokens.
    pub fn tiny_with_template(template: &str, special: SpecialTokens) -> anyhow::Result<Self> {
        let table = bytes_to_unicode();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
        let tok = build_bpe_tokenizer(&tokens, &[], &[256, 257, 258])?;
        Self::with_special_tokens(tok, Some(template.to_string()), special, &[], Some(2048))
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

    /// The prompt for one user message with `add_generation_prompt=true`: the
    /// model's Jinja chat template rendered exactly like transformers'
    /// `apply_chat_template([{"role": "user", "content": user}], tokenize=False,
    /// add_generation_prompt=True)`. SmolLM2 (ChatML):
    /// `<|im_start|>system\n{default system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n`.
    /// Without a usable template: plain ChatML (system block only if a default is known).
    pub fn chat_prompt(&self, user: &str) -> String {
        self.chat_prompt_with_system(None, user)
    }

    /// As [`ChatTokenizer::chat_prompt`], with an explicit system message (`None` = none,
    /// i.e. the template's default).
    pub fn chat_prompt_with_system(&self, system: Option<&str>, user: &str) -> String {
        let mut msgs: Vec<(&str, &str)> = Vec::with_capacity(2);
        if let Some(sys) = system {
            msgs.push(("system", sys));
        }
        msgs.push(("user", user));
        if let Some(t) = &self.compiled {
            match t.render(&msgs, true, &self.special) {
                Ok(s) => return s,
                Err(e) => tracing::warn!("{e:#}; falling back to plain ChatML"),
            }
        }
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

    /// Renders the chat template for arbitrary `(role, content)` messages.
    pub fn apply_chat_template(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        self.compiled
            .as_ref()
            .context("tokenizer has no (usable) chat template")?
            .render(messages, add_generation_prompt, &self.special)
    }

    /// The special-token strings (`bos_token`, `eos_token`, ...).
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// `model_max_length` from `tokenizer_config.json`, if known.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Id of a special token string, if it is in the vocabulary.
    fn special_id(&self, t: &Option<String>) -> Option<u32> {
        t.as_deref().and_then(|t| self.tokenizer.token_to_id(t))
    }

    /// `bos` id (if any).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_id(&self.special.bos)
    }

    /// `pad` id (if any).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special_id(&self.special.pad)
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
