//! Chat-template rendering with minijinja, HF-compatible (trim_blocks, lstrip_blocks,
//! `raise_exception`, Python string methods), plus the character span of every
//! message's content in the rendered text.
//!
//! Spans come from invisible markers: each message's content is rendered wrapped in a
//! pair of private-use characters unique to that message, which are then stripped. The
//! markers sit inside the content's outer whitespace, so a template that trims content
//! still trims it. When a message is empty (templates may test for that) or the data
//! holds marker characters, the plain render is checked against or searched instead.

use crate::error::{Error, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn from_code(code: u8) -> Option<Role> {
        match code {
            0 => Some(Role::System),
            1 => Some(Role::User),
            2 => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// The rendered conversation and, per message, the byte span of its content (None when
/// the template did not render that message).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub spans: Vec<Option<(usize, usize)>>,
}

const START_BASE: u32 = 0xF0000; // Supplementary Private Use Area-A
const END_BASE: u32 = 0x100000; // Supplementary Private Use Area-B
const MAX_MESSAGES: usize = 0xFFFD;
// Stand-ins for a message's outer whitespace: whitespace themselves (a trimming template
// removes them), and recognizable afterwards (telling whether the template kept it).
const LEAD_WS: char = '\u{2028}';
const TRAIL_WS: char = '\u{2029}';

fn is_marker(c: char) -> bool {
    (c as u32) >= START_BASE || c == LEAD_WS || c == TRAIL_WS
}

/// Built-in templates for models without one and for alignment data.
pub fn builtin(name: &str) -> Option<&'static str> {
    Some(match name {
        "chatml" => concat!(
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}",
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
        "llama3" => concat!(
            "{{ bos_token }}{% for message in messages %}",
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}",
            "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        ),
        "vicuna" => concat!(
            "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}{% set rest = messages[1:] %}",
            "{% else %}{{ \"A chat between a curious human and an artificial intelligence assistant. ",
            "The assistant gives helpful, detailed, and polite answers to the human's questions. \" }}{% set rest = messages %}{% endif %}",
            "{% for message in rest %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}",
            "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}",
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
        ),
        "alpaca" => concat!(
            "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}",
            "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}",
            "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}",
            "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
        ),
        "plain" => concat!(
            "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n' }}",
            "{% elif message['role'] == 'user' %}{{ message['content'] }}{% endif %}{% endfor %}"
        ),
        _ => return None,
    })
}

pub const BUILTINS: &[&str] = &["chatml", "llama3", "vicuna", "alpaca", "plain"];

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` tags: they only mark
/// spans for HF's own mask, which mmrecipe computes from content spans instead.
pub fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}") else { break };
        let inner = rest[open + 2..open + close].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..open]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&rest[open..open + close + 2]);
        }
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    out
}

pub struct ChatRenderer {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatRenderer {
    pub fn new(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Fixed date: a wall-clock date would make releases irreproducible.
            "01 Jan 2025".to_string()
        });
        env.add_template_owned("chat", strip_generation_tags(source))
            .map_err(|e| Error::Template(format!("does not compile: {e:#}")))?;
        Ok(ChatRenderer { env, bos: bos.unwrap_or("").to_string(), eos: eos.unwrap_or("").to_string() })
    }

    fn render_raw(&self, messages: &[Message]) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            bos_token => &self.bos,
            eos_token => &self.eos,
            add_generation_prompt => false,
        })
        .map_err(|e| Error::Template(format!("{e}")))
    }

    /// Renders the conversation and locates every message's content in the result.
    pub fn render(&self, messages: &[Message]) -> Result<Rendered> {
        if messages.len() > MAX_MESSAGES {
            return Err(Error::Template(format!("{} messages in one sample; at most {MAX_MESSAGES}", messages.len())));
        }
        let has_markers = messages.iter().any(|m| m.content.chars().any(is_marker));
        if has_markers {
            let text = self.render_raw(messages)?;
            return search_spans(text, messages);
        }
        let marked: Vec<Message> =
            messages.iter().enumerate().map(|(i, m)| Message { role: m.role, content: wrap(&m.content, i) }).collect();
        let Some(rendered) = strip_markers(&self.render_raw(&marked)?, messages) else {
            return search_spans(self.render_raw(messages)?, messages);
        };
        if messages.iter().any(|m| m.content.trim().is_empty()) {
            // A template may treat an empty message differently from a marked one.
            let plain = self.render_raw(messages)?;
            if plain != rendered.text {
                return search_spans(plain, messages);
            }
        }
        Ok(rendered)
    }
}

/// (leading whitespace, core, trailing whitespace) of a message; all-whitespace content
/// is all lead.
fn split_ws(content: &str) -> (&str, &str, &str) {
    let lead_len = content.len() - content.trim_start().len();
    let core = content[lead_len..].trim_end();
    (&content[..lead_len], core, &content[lead_len + core.len()..])
}

fn wrap(content: &str, i: usize) -> String {
    let (lead, core, trail) = split_ws(content);
    let mut s = String::with_capacity(core.len() + 16);
    if !lead.is_empty() {
        s.push(LEAD_WS);
    }
    s.push(char::from_u32(START_BASE + i as u32).unwrap());
    s.push_str(core);
    s.push(char::from_u32(END_BASE + i as u32).unwrap());
    if !trail.is_empty() {
        s.push(TRAIL_WS);
    }
    s
}

/// A marked render cut into runs of plain text (copied in bulk) and single characters
/// that may be markers. Markers encode to UTF-8 starting with 0xE2 (U+2028/9) or
/// 0xF3/0xF4 (planes 15/16); only characters with such a lead byte come one by one.
enum Piece<'a> {
    Text(&'a str),
    Char(char),
}

fn pieces(marked: &str) -> impl Iterator<Item = Piece<'_>> {
    let mut rest = marked;
    std::iter::from_fn(move || {
        let c = rest.chars().next()?;
        let cut = rest.bytes().position(|b| b == 0xE2 || b >= 0xF3).unwrap_or(rest.len());
        let (piece, len) = if cut > 0 { (Piece::Text(&rest[..cut]), cut) } else { (Piece::Char(c), c.len_utf8()) };
        rest = &rest[len..];
        Some(piece)
    })
}

/// Strips the markers, putting back each message's outer whitespace where the template
/// kept it, and records each message's span (first occurrence). None when the markers
/// are not where they were put (the template rearranged content).
fn strip_markers(marked: &str, messages: &[Message]) -> Option<Rendered> {
    let mut text = String::with_capacity(marked.len());
    let mut spans: Vec<Option<(usize, usize)>> = vec![None; messages.len()];
    let mut starts: Vec<Option<usize>> = vec![None; messages.len()];
    let index = |c: char, base: u32| -> Option<usize> {
        let u = c as u32;
        (u >= base && ((u - base) as usize) < messages.len()).then(|| (u - base) as usize)
    };
    let mut pieces = pieces(marked).peekable();
    while let Some(piece) = pieces.next() {
        let c = match piece {
            Piece::Text(t) => {
                text.push_str(t);
                continue;
            }
            Piece::Char(c) => c,
        };
        if c == LEAD_WS {
            let Some(Piece::Char(n)) = pieces.next() else { return None };
            let i = index(n, START_BASE).filter(|_| (n as u32) < END_BASE)?;
            let begin = text.len();
            text.push_str(split_ws(&messages[i].content).0);
            starts[i].get_or_insert(begin);
        } else if c == TRAIL_WS {
            return None;
        } else if (c as u32) >= END_BASE {
            let i = index(c, END_BASE)?;
            if matches!(pieces.peek(), Some(Piece::Char(TRAIL_WS))) {
                pieces.next();
                text.push_str(split_ws(&messages[i].content).2);
            }
            if spans[i].is_none() {
                spans[i] = Some((starts[i]?, text.len()));
            }
        } else if (c as u32) >= START_BASE {
            let i = index(c, START_BASE)?;
            starts[i].get_or_insert(text.len());
        } else {
            text.push(c);
        }
    }
    Some(Rendered { text, spans })
}

/// Fallback: finds each message's content, in order, in the plain render.
fn search_spans(text: String, messages: &[Message]) -> Result<Rendered> {
    let mut cursor = 0;
    let mut spans = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let core = m.content.trim();
        if core.is_empty() {
            spans.push(None);
            continue;
        }
        let needle = if text[cursor..].contains(m.content.as_str()) { m.content.as_str() } else { core };
        match text[cursor..].find(needle) {
            Some(off) => {
                let s = cursor + off;
                spans.push(Some((s, s + needle.len())));
                cursor = s + needle.len();
            }
            None => {
                return Err(Error::Template(format!(
                    "message {i} ({:?}) does not appear in the rendered text; the template rewrites message content",
                    m.role
                )))
            }
        }
    }
    Ok(Rendered { text, spans })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(Role, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message { role: *r, content: c.to_string() }).collect()
    }

    #[test]
    fn chatml_spans_cover_contents() {
        let r = ChatRenderer::new(builtin("chatml").unwrap(), None, None).unwrap();
        let m = msgs(&[(Role::User, "hi there"), (Role::Assistant, " hello ")]);
        let out = r.render(&m).unwrap();
        assert_eq!(out.text, "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n hello <|im_end|>\n");
        let (s, e) = out.spans[1].unwrap();
        assert_eq!(&out.text[s..e], " hello ");
        let (s, e) = out.spans[0].unwrap();
        assert_eq!(&out.text[s..e], "hi there");
    }

    #[test]
    fn trimming_template_keeps_core_span() {
        let r = ChatRenderer::new(builtin("llama3").unwrap(), Some("<s>"), None).unwrap();
        let m = msgs(&[(Role::User, "  q  "), (Role::Assistant, "\n a \n")]);
        let out = r.render(&m).unwrap();
        let (s, e) = out.spans[1].unwrap();
        assert_eq!(&out.text[s..e], "a");
        assert!(out.text.starts_with("<s><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"));
    }

    #[test]
    fn template_whitespace_next_to_trimmed_content_is_not_content() {
        // The template's own "\n\n" precedes the trimmed content, which began with "\n".
        let r = ChatRenderer::new(builtin("llama3").unwrap(), None, None).unwrap();
        let out = r.render(&msgs(&[(Role::User, "q"), (Role::Assistant, "\nX ")])).unwrap();
        let (s, e) = out.spans[1].unwrap();
        assert_eq!(&out.text[s..e], "X");
        assert_eq!(&out.text[s - 2..s], "\n\n");
    }

    #[test]
    fn empty_message_still_renders() {
        let r = ChatRenderer::new(builtin("chatml").unwrap(), None, None).unwrap();
        let out = r.render(&msgs(&[(Role::User, "q"), (Role::Assistant, "")])).unwrap();
        assert_eq!(out.text, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n");
        let (s, e) = out.spans[1].unwrap();
        assert_eq!(s, e);
        assert_eq!(&out.text[s..], "<|im_end|>\n");
    }

    #[test]
    fn whitespace_only_message_is_not_doubled() {
        let r = ChatRenderer::new(builtin("chatml").unwrap(), None, None).unwrap();
        let out = r.render(&msgs(&[(Role::User, "q"), (Role::Assistant, " \n ")])).unwrap();
        assert_eq!(out.text, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n \n <|im_end|>\n");
        let (s, e) = out.spans[1].unwrap();
        assert_eq!(&out.text[s..e], " \n ");
    }

    #[test]
    fn generation_tags_are_stripped() {
        let src = "{% for m in messages %}{%- generation -%}{{ m.content }}{% endgeneration %}{% endfor %}";
        assert_eq!(strip_generation_tags(src), "{% for m in messages %}{{ m.content }}{% endfor %}");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let r = ChatRenderer::new("{{ raise_exception('no system') }}", None, None).unwrap();
        let err = r.render(&msgs(&[(Role::User, "x")])).unwrap_err();
        assert!(err.to_string().contains("no system"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let r = ChatRenderer::new("{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}", None, None).unwrap();
        let out = r.render(&msgs(&[(Role::User, " ab ")])).unwrap();
        assert_eq!(out.text, "AB");
    }
}
