//! Instruction templates: "{question} Answer briefly." with `{field}` placeholders and
//! `{{`/`}}` for literal braces. One template per user turn is chosen by the
//! counter-based generator, so the choice is a pure function of (seed, source, row, turn).

use crate::rng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Field(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub pieces: Vec<Piece>,
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = src.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if matches!(chars.peek(), Some((_, '{'))) => {
                    chars.next();
                    text.push('{');
                }
                '}' if matches!(chars.peek(), Some((_, '}'))) => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let rest = &src[i + 1..];
                    let end = rest
                        .find('}')
                        .ok_or_else(|| format!("unclosed '{{' at character {i} (write '{{{{' for a literal brace)"))?;
                    let name = rest[..end].trim();
                    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                        return Err(format!("'{{{}}}' is not a field placeholder (use letters, digits and '_')", &rest[..end]));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Field(name.to_string()));
                    for _ in 0..rest[..=end].chars().count() {
                        chars.next();
                    }
                }
                '}' => return Err(format!("lone '}}' at character {i} (write '}}}}' for a literal brace)")),
                _ => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template { pieces })
    }

    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Field(f) => Some(f.as_str()),
            Piece::Text(_) => None,
        })
    }

    /// Fills the placeholders; `lookup` returns None for a field the sample lacks.
    pub fn fill<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f) => out.push_str(lookup(f).ok_or_else(|| format!("no value for placeholder {{{f}}}"))?),
            }
        }
        Ok(out)
    }
}

/// The template index for one user turn of one row.
pub fn choose(seed: u64, source: u64, row: u64, turn: u64, n_templates: usize) -> usize {
    let index = row.wrapping_mul(0x1_0000).wrapping_add(turn);
    rng::below(rng::keyed(seed, source, index, rng::PURPOSE_TEMPLATE), n_templates as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_escapes() {
        let t = Template::parse("Q: {question} {{x}} {options}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), vec!["question", "options"]);
        let filled = t.fill(|f| if f == "question" { Some("why?") } else { Some("A/B") }).unwrap();
        assert_eq!(filled, "Q: why? {x} A/B");
    }

    #[test]
    fn rejects_broken_braces() {
        assert!(Template::parse("a {question").is_err());
        assert!(Template::parse("a } b").is_err());
        assert!(Template::parse("a {two words} b").is_err());
    }

    #[test]
    fn missing_field_is_an_error() {
        let t = Template::parse("{caption}").unwrap();
        assert!(t.fill(|_| None).is_err());
    }

    #[test]
    fn choice_is_stable_and_spread() {
        let n = 8;
        let picks: Vec<usize> = (0..800).map(|r| choose(42, 7, r, 0, n)).collect();
        assert_eq!(picks, (0..800).map(|r| choose(42, 7, r, 0, n)).collect::<Vec<_>>());
        for k in 0..n {
            assert!(picks.iter().filter(|&&p| p == k).count() > 50);
        }
    }
}
