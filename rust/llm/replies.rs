//! Conversations an LLM wrote, read back (`[[generate]]`): a reply in the "qa" format
//! (`Question:` / `Answer:` lines, LLaVA-style) or the "json" format (a list of turns),
//! parsed and validated into alternating user/assistant turns. Whole columns of replies
//! are parsed in parallel; a reply that is no usable conversation gets the reason why.

use crate::columns::StrCol;
use rayon::prelude::*;
use regex::Regex;
use serde_json::Value;
use std::sync::LazyLock;

pub const USER: u8 = 1;
pub const ASSISTANT: u8 = 2;

/// A reply's turns: (role, text), alternating, starting with the user.
pub type Turns = Vec<(u8, String)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Qa,
    Json,
}

impl Format {
    pub fn parse(name: &str) -> Result<Format, String> {
        match name {
            "qa" => Ok(Format::Qa),
            "json" => Ok(Format::Json),
            other => Err(format!("unknown reply format '{other}' (qa, json)")),
        }
    }
}

/// What to do with one row of a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A finished reply.
    Whole,
    /// Cut at max_tokens: its last, possibly unfinished, exchange is dropped.
    Truncated,
    /// No reply (the call failed or is not in the cache): no conversation, no reason.
    Absent,
}

impl Reply {
    pub fn from_code(code: u8) -> Reply {
        match code {
            0 => Reply::Whole,
            1 => Reply::Truncated,
            _ => Reply::Absent,
        }
    }
}

// A reply wrapped in a Markdown code fence.
static FENCE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?s)^\s*```[a-zA-Z]*\s*\n(.*?)\n\s*```\s*$").unwrap());

fn role_of(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "question" | "q" | "user" | "human" => Some(USER),
        "answer" | "a" | "assistant" | "gpt" => Some(ASSISTANT),
        _ => None,
    }
}

/// The validated turns of one reply, or why it is not a usable conversation.
pub fn parse(text: &str, format: Format, min_turns: usize, reply: Reply) -> Result<Turns, String> {
    let mut turns = match format {
        Format::Qa => parse_qa(text),
        Format::Json => parse_json(text)?,
    };
    if reply == Reply::Truncated && !turns.is_empty() {
        let cut = if turns.last().map(|t| t.0) == Some(ASSISTANT) { 2 } else { 1 };
        turns.truncate(turns.len().saturating_sub(cut));
    }
    if turns.last().map(|t| t.0) == Some(USER) {
        turns.pop(); // a question left without an answer
    }
    for (i, (role, content)) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { USER } else { ASSISTANT };
        if *role != expected {
            let (found, belongs) = if *role == ASSISTANT { ("an answer", "a question") } else { ("a question", "an answer") };
            return Err(format!("turn {} is {found} where {belongs} belongs", i + 1));
        }
        if content.trim().is_empty() {
            return Err(format!("turn {} is empty", i + 1));
        }
    }
    let pairs = turns.len() / 2;
    if pairs < min_turns {
        return Err(format!(
            "{pairs} question-answer pair{}, fewer than min_turns = {min_turns}",
            if pairs == 1 { "" } else { "s" }
        ));
    }
    Ok(turns)
}

fn parse_qa(text: &str) -> Turns {
    let mut turns: Turns = Vec::new();
    for line in text.lines() {
        if let Some((role, rest)) = marker(line) {
            turns.push((role, rest.to_string()));
        } else if let Some(last) = turns.last_mut() {
            if !is_separator(line) {
                last.1.push('\n');
                last.1.push_str(line);
            }
        }
        // Text before the first marker ("Sure! Here is a conversation:") is not a turn.
    }
    turns.into_iter().map(|(role, content)| (role, content.trim().to_string())).collect()
}

/// A turn marker at the start of a line ("Question:", "**Answer:**", "## User:", "Q:"):
/// the role and the rest of the line. Matched by hand, not by a regex: every line of
/// every reply goes through here.
fn marker(line: &str) -> Option<(u8, &str)> {
    let mut s = line.trim_start();
    if let Some(rest) = s.strip_prefix("**") {
        s = rest;
    } else if let Some(rest) = s.strip_prefix("##") {
        s = rest.trim_start();
    }
    let word_len = s.bytes().take_while(u8::is_ascii_alphabetic).count();
    if word_len == 0 || word_len > "assistant".len() {
        return None;
    }
    let role = role_of(&s[..word_len])?;
    let mut s = s[word_len..].trim_start();
    if let Some(rest) = s.strip_prefix("**") {
        s = rest.trim_start();
    }
    let s = s.strip_prefix(':')?.trim_start();
    Some((role, s.strip_prefix("**").unwrap_or(s)))
}

/// A line of three or more `=` or `-` between exchanges.
fn is_separator(line: &str) -> bool {
    let t = line.trim();
    t.len() >= 3 && (t.bytes().all(|b| b == b'=') || t.bytes().all(|b| b == b'-'))
}

fn parse_json(text: &str) -> Result<Turns, String> {
    let body = FENCE.captures(text).map_or(text, |m| m.get(1).map_or(text, |g| g.as_str()));
    let mut value: Value = serde_json::from_str(body).map_err(|e| format!("not JSON ({e})"))?;
    if let Value::Object(map) = &mut value {
        for key in ["conversations", "conversation", "messages"] {
            if let Some(Value::Array(items)) = map.remove(key) {
                value = Value::Array(items);
                break;
            }
        }
    }
    match value {
        Value::Array(items) => turns_of(&items),
        other => Err(format!("expected a JSON list of turns, got {}", kind(&other))),
    }
}

/// Turns from `[{question, answer}]`, `[{from, value}]` or `[{role, content}]` items.
pub fn turns_of(items: &[Value]) -> Result<Turns, String> {
    let mut turns = Turns::new();
    for item in items {
        let Value::Object(map) = item else {
            return Err(format!("a turn is {}, not an object", kind(item)));
        };
        if map.contains_key("question") || map.contains_key("answer") {
            turns.push((USER, text_of(map.get("question"))?));
            turns.push((ASSISTANT, text_of(map.get("answer"))?));
            continue;
        }
        let role = map.get("from").or_else(|| map.get("role"));
        let Some(code) = role.and_then(Value::as_str).and_then(role_of) else {
            let shown = role.map_or("None".to_string(), Value::to_string);
            return Err(format!("a turn has no known role (from/role = {shown})"));
        };
        turns.push((code, text_of(map.get("value").or_else(|| map.get("content")))?));
    }
    Ok(turns)
}

fn text_of(value: Option<&Value>) -> Result<String, String> {
    match value {
        Some(Value::String(s)) => Ok(s.trim().to_string()),
        Some(other) => Err(format!("a turn's text is {}, not a string", kind(other))),
        None => Err("a turn's text is missing".into()),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A column of parsed replies: row i's turns are `turn_offsets[i]..turn_offsets[i + 1]`
/// of `roles` and of the strings (`content_offsets`, `content`); a row with no
/// conversation has no turns, `valid[i] = 0` and, when its reply was malformed, the
/// reason in `reasons` (empty otherwise).
#[derive(Debug, Default)]
pub struct Parsed {
    pub valid: Vec<u8>,
    pub turn_offsets: Vec<i64>,
    pub roles: Vec<u8>,
    pub content_offsets: Vec<i64>,
    pub content: Vec<u8>,
    pub reason_offsets: Vec<i64>,
    pub reasons: Vec<u8>,
}

/// Parses every reply of `texts` (row i handled as `replies[i]` says), in parallel.
pub fn parse_column(texts: StrCol<'_>, replies: &[u8], format: Format, min_turns: usize) -> Result<Parsed, String> {
    texts.check_str().map_err(|e| format!("replies: {e}"))?;
    if replies.len() != texts.len() {
        return Err(format!("{} reply states for {} replies", replies.len(), texts.len()));
    }
    let results: Vec<Option<Result<Turns, String>>> = (0..texts.len())
        .into_par_iter()
        .map(|i| match Reply::from_code(replies[i]) {
            Reply::Absent => Ok(None),
            reply => texts.get(i).map(|text| Some(parse(text, format, min_turns, reply))),
        })
        .collect::<Result<_, String>>()?;
    let mut out = Parsed { turn_offsets: vec![0], content_offsets: vec![0], reason_offsets: vec![0], ..Parsed::default() };
    for result in results {
        match result {
            Some(Ok(turns)) => {
                out.valid.push(1);
                for (role, text) in turns {
                    out.roles.push(role);
                    out.content.extend_from_slice(text.as_bytes());
                    out.content_offsets.push(out.content.len() as i64);
                }
            }
            Some(Err(reason)) => {
                out.valid.push(0);
                out.reasons.extend_from_slice(reason.as_bytes());
            }
            None => out.valid.push(0),
        }
        out.turn_offsets.push(out.roles.len() as i64);
        out.reason_offsets.push(out.reasons.len() as i64);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qa(text: &str) -> Result<Turns, String> {
        parse(text, Format::Qa, 1, Reply::Whole)
    }

    fn t(pairs: &[(u8, &str)]) -> Turns {
        pairs.iter().map(|(r, s)| (*r, s.to_string())).collect()
    }

    #[test]
    fn qa_reply_with_preamble_separators_and_continuations() {
        let text =
            "Sure, here it is.\nQuestion: What?\nAnswer: A dog.\n===\n**Q:** Any cat?\nA: Yes,\none cat.\nQuestion: left over";
        assert_eq!(
            qa(text).unwrap(),
            t(&[(USER, "What?"), (ASSISTANT, "A dog."), (USER, "Any cat?"), (ASSISTANT, "Yes,\none cat.")])
        );
    }

    #[test]
    fn markers_in_their_spellings() {
        for line in ["Question: x", "  question :x", "**Q:** x", "**Question**: x", "## User: x", "HUMAN:  x", "Q:x"] {
            assert_eq!(marker(line).map(|(role, rest)| (role, rest.trim())), Some((USER, "x")), "{line}");
        }
        for line in ["Answer: x", "A: x", "gpt: x", "Assistant:x"] {
            assert_eq!(marker(line).map(|m| m.0), Some(ASSISTANT), "{line}");
        }
        for line in ["Questions: x", "Answer x", "What: x", "Qué: x", "", "**", "answering: x", "Q. x"] {
            assert_eq!(marker(line), None, "{line}");
        }
        assert!(is_separator(" === ") && is_separator("-----") && !is_separator("==") && !is_separator("=-="));
    }

    #[test]
    fn malformed_qa_replies_say_why() {
        assert_eq!(qa("Answer: first\nQuestion: then").unwrap_err(), "turn 1 is an answer where a question belongs");
        assert_eq!(qa("Question: a\nQuestion: b\nAnswer: c").unwrap_err(), "turn 2 is a question where an answer belongs");
        assert_eq!(qa("Question: a\nAnswer:   ").unwrap_err(), "turn 2 is empty");
        assert_eq!(qa("no turns at all").unwrap_err(), "0 question-answer pairs, fewer than min_turns = 1");
    }

    #[test]
    fn truncated_reply_loses_its_last_exchange() {
        let text = "Q: a\nA: b\nQ: c\nA: half of";
        assert_eq!(parse(text, Format::Qa, 1, Reply::Truncated).unwrap(), t(&[(USER, "a"), (ASSISTANT, "b")]));
        assert!(parse("Q: a\nA: half", Format::Qa, 1, Reply::Truncated).is_err());
    }

    #[test]
    fn json_replies_in_each_shape() {
        let fenced = "```json\n[{\"question\": \"Q?\", \"answer\": \"A.\"}]\n```";
        let expected = t(&[(USER, "Q?"), (ASSISTANT, "A.")]);
        assert_eq!(parse(fenced, Format::Json, 1, Reply::Whole).unwrap(), expected);
        let wrapped = r#"{"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": " A. "}]}"#;
        assert_eq!(parse(wrapped, Format::Json, 1, Reply::Whole).unwrap(), expected);
        let messages = r#"[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]"#;
        assert_eq!(parse(messages, Format::Json, 1, Reply::Whole).unwrap(), expected);
        for (bad, why) in [
            ("[1]", "a turn is a number"),
            ("{\"a\": 1}", "expected a JSON list"),
            ("[{\"from\": \"bot\", \"value\": \"x\"}]", "no known role"),
            ("[{\"question\": \"q\", \"answer\": 3}]", "not a string"),
            ("not json", "not JSON"),
        ] {
            let err = parse(bad, Format::Json, 1, Reply::Whole).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn column_keeps_rows_apart() {
        let texts = ["Q: a\nA: b", "nothing", "", "Q: c\nA: d\nQ: e\nA: f"];
        let mut offsets = vec![0i64];
        let mut data = Vec::new();
        for s in texts {
            data.extend_from_slice(s.as_bytes());
            offsets.push(data.len() as i64);
        }
        let col = StrCol { offsets: &offsets, data: &data };
        let out = parse_column(col, &[0, 0, 2, 0], Format::Qa, 1).unwrap();
        assert_eq!(out.valid, vec![1, 0, 0, 1]);
        assert_eq!(out.turn_offsets, vec![0, 2, 2, 2, 6]);
        assert_eq!(out.roles, vec![USER, ASSISTANT, USER, ASSISTANT, USER, ASSISTANT]);
        assert_eq!(&out.content[..], b"abcdef");
        let reasons = String::from_utf8(out.reasons).unwrap();
        assert_eq!(out.reason_offsets[3] - out.reason_offsets[2], 0, "an absent reply has no reason");
        assert!(reasons.starts_with("0 question-answer pairs"));
    }

    #[test]
    fn malformed_offsets_are_an_error_not_a_panic() {
        let col = StrCol { offsets: &[0, 9], data: b"abc" };
        assert!(parse_column(col, &[0], Format::Qa, 1).is_err());
    }
}
