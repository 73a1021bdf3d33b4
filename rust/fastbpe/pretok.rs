//! Pre-tokenization as hand-written scanners: each split pattern below is scanned the way
//! Oniguruma's leftmost-first backtracking matches it, over the char classes of
//! `classes.rs`, so the pieces are the ones HF tokenizers' regex split gives.

use super::classes::{class, Class};

/// A split pattern the fast engine knows (the exact strings are in `mod.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3,
    /// As Llama-3 with `\p{N}` (one digit) for `\p{N}{1,3}`.
    Qwen2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// HF `Digits`: `char::is_numeric` chars isolated one by one, or in runs.
    Digits { individual: bool },
    /// A regex split with `Isolated` behaviour (also ByteLevel's own `use_regex`).
    Split(Pattern),
}

#[derive(Debug, Clone)]
pub struct Pretok {
    pub stages: Vec<Stage>,
}

impl Pretok {
    /// Calls `emit(start, end)` for each piece of `text`, in order, as byte offsets.
    pub fn split(&self, text: &str, emit: &mut dyn FnMut(usize, usize)) {
        self.run(0, text, 0, emit)
    }

    fn run(&self, stage: usize, text: &str, base: usize, emit: &mut dyn FnMut(usize, usize)) {
        if text.is_empty() {
            return;
        }
        let Some(&st) = self.stages.get(stage) else {
            emit(base, base + text.len());
            return;
        };
        let mut next = |s: usize, e: usize| self.run(stage + 1, &text[s..e], base + s, emit);
        match st {
            Stage::Digits { individual } => digits(text, individual, &mut next),
            Stage::Split(p) => {
                let mut i = 0;
                while i < text.len() {
                    let e = match p {
                        Pattern::Gpt2 => gpt2_at(text, i),
                        Pattern::Llama3 => llama3_at(text, i, 3),
                        Pattern::Qwen2 => llama3_at(text, i, 1),
                    };
                    next(i, e);
                    i = e;
                }
            }
        }
    }
}

fn digits(text: &str, individual: bool, next: &mut dyn FnMut(usize, usize)) {
    let mut gap = 0; // start of the current non-digit (or, contiguous, digit) run
    let mut in_digits = false;
    for (i, c) in text.char_indices() {
        let d = c.is_numeric();
        if individual {
            if d {
                if gap < i {
                    next(gap, i);
                }
                next(i, i + c.len_utf8());
                gap = i + c.len_utf8();
            }
        } else if d != in_digits {
            if gap < i {
                next(gap, i);
            }
            gap = i;
            in_digits = d;
        }
    }
    if gap < text.len() {
        next(gap, text.len());
    }
}

#[inline]
fn at(s: &str, i: usize) -> Option<char> {
    s.get(i..).and_then(|t| t.chars().next())
}

/// End of the run of chars of class `k` starting at `i` (which may be empty).
#[inline]
fn run_of(s: &str, mut i: usize, k: Class) -> usize {
    let b = s.as_bytes();
    while i < b.len() {
        // ASCII fast path; non-ASCII decodes one char.
        let c = if b[i] < 128 { b[i] as char } else { at(s, i).unwrap() };
        if class(c) != k {
            break;
        }
        i += c.len_utf8();
    }
    i
}

/// The length after the apostrophe of a contraction `s t re ve m ll d` at `i`, if any;
/// `fold`: case-insensitive as Oniguruma's `(?i:...)` (which also folds `ſ` to `s`).
#[inline]
fn contraction(s: &str, i: usize, fold: bool) -> Option<usize> {
    let eq = |c: Option<char>, lower: char| match c {
        Some(c) if c == lower => true,
        Some(c) if fold => c == lower.to_ascii_uppercase() || (lower == 's' && c == 'ſ'),
        _ => false,
    };
    let c1 = at(s, i);
    for l in ['s', 't', 'm', 'd'] {
        if eq(c1, l) {
            return Some(c1.unwrap().len_utf8());
        }
    }
    for (a, b) in [('r', 'e'), ('v', 'e'), ('l', 'l')] {
        if eq(c1, a) {
            let n1 = c1.unwrap().len_utf8();
            if eq(at(s, i + n1), b) {
                return Some(n1 + 1);
            }
        }
    }
    None
}

/// `\s+(?!\S)|\s+` at `i` (a whitespace char): the run, less its last char when a
/// non-space follows and the run has more than one char.
#[inline]
fn spaces(s: &str, i: usize) -> usize {
    let j = run_of(s, i, Class::Space);
    if j == s.len() {
        return j;
    }
    let last = s[..j].chars().next_back().unwrap();
    let k = j - last.len_utf8();
    if k > i {
        k
    } else {
        j
    }
}

fn gpt2_at(s: &str, i: usize) -> usize {
    let c = at(s, i).unwrap();
    if c == '\'' {
        if let Some(n) = contraction(s, i + 1, false) {
            return i + 1 + n;
        }
    }
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: the optional space, then one class.
    let (p, k) = match (c, at(s, i + 1)) {
        (' ', Some(c2)) if class(c2) != Class::Space => (i + 1, class(c2)),
        _ => (i, class(c)),
    };
    match k {
        Class::Space => spaces(s, i),
        k => run_of(s, p, k),
    }
}

fn llama3_at(s: &str, i: usize, max_digits: usize) -> usize {
    let c = at(s, i).unwrap();
    if c == '\'' {
        if let Some(n) = contraction(s, i + 1, true) {
            return i + 1 + n;
        }
    }
    let k = class(c);
    let n = c.len_utf8();
    // `[^\r\n\p{L}\p{N}]?\p{L}+`
    if k == Class::Letter {
        return run_of(s, i, Class::Letter);
    }
    if k != Class::Number && c != '\r' && c != '\n' && at(s, i + n).is_some_and(|c2| class(c2) == Class::Letter) {
        return run_of(s, i + n, Class::Letter);
    }
    // `\p{N}{1,3}` (or `\p{N}`)
    if k == Class::Number {
        let mut e = i;
        for _ in 0..max_digits {
            match at(s, e) {
                Some(d) if class(d) == Class::Number => e += d.len_utf8(),
                _ => break,
            }
        }
        return e;
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    let other_from = if k == Class::Other {
        Some(i)
    } else if c == ' ' && at(s, i + 1).is_some_and(|c2| class(c2) == Class::Other) {
        Some(i + 1)
    } else {
        None
    };
    if let Some(p) = other_from {
        let mut e = run_of(s, p, Class::Other);
        while matches!(s.as_bytes().get(e), Some(b'\r' | b'\n')) {
            e += 1;
        }
        return e;
    }
    // `\s*[\r\n]+`: through the run's last line break, when it has one.
    let j = run_of(s, i, Class::Space);
    if let Some(k) = s.as_bytes()[i..j].iter().rposition(|&b| b == b'\r' || b == b'\n') {
        return i + k + 1;
    }
    spaces(s, i)
}

/// `contraction` after a leading apostrophe, case-insensitive (for the folding test).
#[cfg(test)]
pub fn contraction_for_tests(s: &str) -> Option<usize> {
    s.strip_prefix('\'').and_then(|_| contraction(s, 1, true))
}
