//! AUTOMATIC1111's prompt emphasis syntax: `(text)` ×1.1, `[text]` ÷1.1, `(text:1.5)`, the
//! escapes `\(` `\)` `\[` `\]` `\\`, and `BREAK`, which starts a new 75-token chunk.
//!
//! The parse follows A1111's `parse_prompt_attention` rule for rule, quirks included, so
//! prompts written for A1111 get the same weights: brackets left open weight the rest of the
//! prompt, a closing bracket with nothing open is plain text, a lone `\` is dropped, and runs of
//! text with equal weights are merged. A weight that is not a number inside an open `(`
//! (`(a:1.2.3)`), on which A1111 itself fails, is an error naming its position.

use std::fmt;

/// The multiplier of one pair of round brackets.
const ROUND: f64 = 1.1;
/// The multiplier of one pair of square brackets.
const SQUARE: f64 = 1.0 / 1.1;
/// A1111's marker piece for `BREAK`: this text with this weight.
const BREAK_TEXT: &str = "BREAK";
const BREAK_WEIGHT: f64 = -1.0;

/// A run of prompt text and the weight its tokens get (or A1111's `BREAK` marker).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    pub weight: f64,
}

impl Piece {
    fn new(text: &str, weight: f64) -> Self {
        Self {
            text: text.to_string(),
            weight,
        }
    }

    /// Whether this piece is a `BREAK` (A1111 tells it by text and weight -1, so a `BREAK`
    /// inside brackets, whose weight was multiplied, is read as the word).
    pub fn is_break(&self) -> bool {
        self.text == BREAK_TEXT && self.weight == BREAK_WEIGHT
    }
}

/// A weight in `(text:weight)` that is not a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based character position of the `:` that starts the weight.
    pub column: usize,
    pub weight: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "prompt weight {:?} at character {} is not a number (write it as (text:1.2))",
            self.weight, self.column
        )
    }
}

impl std::error::Error for SyntaxError {}

/// One lexical element of the prompt, as A1111's tokenizing regular expression splits it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lexeme<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\`: the escaped character; a lone `\`: nothing.
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:<weight>)`, the weight as written.
    WeightClose(&'a str),
    CloseRound,
    CloseSquare,
    Text(&'a str),
}

/// Splits `text` into lexemes with their byte offsets.
fn lex(text: &str) -> Vec<(usize, Lexeme<'_>)> {
    let bytes = text.as_bytes();
    let special = |b: u8| matches!(b, b'\\' | b'(' | b')' | b'[' | b']' | b':');
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (lexeme, len) = match bytes[at] {
            b'\\' => match bytes.get(at + 1) {
                Some(b'(' | b')' | b'[' | b']' | b'\\') => {
                    (Lexeme::Escaped(&text[at + 1..at + 2]), 2)
                }
                _ => (Lexeme::Escaped(""), 1),
            },
            b'(' => (Lexeme::OpenRound, 1),
            b'[' => (Lexeme::OpenSquare, 1),
            b')' => (Lexeme::CloseRound, 1),
            b']' => (Lexeme::CloseSquare, 1),
            b':' => {
                let rest = &bytes[at + 1..];
                let sign = usize::from(matches!(rest.first(), Some(b'+' | b'-')));
                let body = rest[sign..]
                    .iter()
                    .take_while(|&&b| b == b'.' || b.is_ascii_digit())
                    .count();
                if body > 0 && rest.get(sign + body) == Some(&b')') {
                    let weight = &text[at + 1..at + 1 + sign + body];
                    (Lexeme::WeightClose(weight), sign + body + 2)
                } else {
                    (Lexeme::Text(":"), 1)
                }
            }
            _ => {
                let len = bytes[at..]
                    .iter()
                    .position(|&b| special(b))
                    .unwrap_or(bytes.len() - at);
                (Lexeme::Text(&text[at..at + len]), len)
            }
        };
        out.push((at, lexeme));
        at += len;
    }
    out
}

/// `text` split into weighted pieces, with `BREAK` markers, as A1111 parses it.
pub fn parse(text: &str) -> Result<Vec<Piece>, SyntaxError> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |pieces: &mut Vec<Piece>, from: usize, factor: f64| {
        for piece in &mut pieces[from..] {
            piece.weight *= factor;
        }
    };
    for (offset, lexeme) in lex(text) {
        match lexeme {
            Lexeme::Escaped(literal) => pieces.push(Piece::new(literal, 1.0)),
            Lexeme::OpenRound => round.push(pieces.len()),
            Lexeme::OpenSquare => square.push(pieces.len()),
            Lexeme::WeightClose(weight) if !round.is_empty() => {
                let factor: f64 = weight.parse().map_err(|_| SyntaxError {
                    column: text[..offset].chars().count() + 1,
                    weight: weight.to_string(),
                })?;
                let from = round.pop().expect("checked non-empty");
                multiply(&mut pieces, from, factor);
            }
            Lexeme::CloseRound if !round.is_empty() => {
                let from = round.pop().expect("checked non-empty");
                multiply(&mut pieces, from, ROUND);
            }
            Lexeme::CloseSquare if !square.is_empty() => {
                let from = square.pop().expect("checked non-empty");
                multiply(&mut pieces, from, SQUARE);
            }
            Lexeme::WeightClose(_) | Lexeme::CloseRound | Lexeme::CloseSquare => {
                push_text(&mut pieces, lexeme_text(text, offset, lexeme))
            }
            Lexeme::Text(plain) => push_text(&mut pieces, plain),
        }
    }
    for from in round {
        multiply(&mut pieces, from, ROUND);
    }
    for from in square {
        multiply(&mut pieces, from, SQUARE);
    }
    if pieces.is_empty() {
        pieces.push(Piece::new("", 1.0));
    }
    Ok(merge_equal_weights(pieces))
}

/// The source text of a closing lexeme read as plain text.
fn lexeme_text<'a>(text: &'a str, offset: usize, lexeme: Lexeme) -> &'a str {
    let len = match lexeme {
        Lexeme::WeightClose(weight) => weight.len() + 2,
        _ => 1,
    };
    &text[offset..offset + len]
}

/// Appends plain text, split at each `BREAK` (a whole word, with the whitespace around it).
fn push_text(pieces: &mut Vec<Piece>, text: &str) {
    let mut rest = text;
    while let Some((before, after)) = split_at_break(rest) {
        pieces.push(Piece::new(before, 1.0));
        pieces.push(Piece::new(BREAK_TEXT, BREAK_WEIGHT));
        rest = after;
    }
    pieces.push(Piece::new(rest, 1.0));
}

/// The text before the first `BREAK` word and after it, whitespace around it removed.
fn split_at_break(text: &str) -> Option<(&str, &str)> {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut search = 0;
    while let Some(found) = text[search..].find(BREAK_TEXT) {
        let start = search + found;
        let end = start + BREAK_TEXT.len();
        if !is_word(text[..start].chars().next_back()) && !is_word(text[end..].chars().next()) {
            let before = text[..start].trim_end_matches(char::is_whitespace);
            let after = text[end..].trim_start_matches(char::is_whitespace);
            return Some((before, after));
        }
        search = end;
    }
    None
}

/// Joins neighbouring pieces of exactly equal weight.
fn merge_equal_weights(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match merged.last_mut() {
            Some(last) if last.weight == piece.weight => last.text.push_str(&piece.text),
            _ => merged.push(piece),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Vec<(String, f64)> {
        parse(text)
            .unwrap()
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect()
    }

    fn expect(text: &str, expected: &[(&str, f64)]) {
        let got = pieces(text);
        let expected: Vec<(String, f64)> =
            expected.iter().map(|(t, w)| (t.to_string(), *w)).collect();
        assert_eq!(got, expected, "{text:?}");
    }

    // The examples of A1111's parse_prompt_attention docstring.
    #[test]
    fn a1111_docstring_examples() {
        expect("normal text", &[("normal text", 1.0)]);
        expect(
            "an (important) word",
            &[("an ", 1.0), ("important", 1.1), (" word", 1.0)],
        );
        expect("(unbalanced", &[("unbalanced", 1.1)]);
        expect("\\(literal\\]", &[("(literal]", 1.0)]);
        expect("(unnecessary)(parens)", &[("unnecessaryparens", 1.1)]);
        expect(
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            &[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        );
    }

    #[test]
    fn break_splits_on_whole_words_only() {
        expect(
            "a cat BREAK  a dog",
            &[("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)],
        );
        expect("aBREAK BREAKb", &[("aBREAK BREAKb", 1.0)]);
        expect("x,BREAK,y", &[("x,", 1.0), ("BREAK", -1.0), (",y", 1.0)]);
        let bracketed = parse("(BREAK)").unwrap();
        assert!(bracketed.iter().all(|p| !p.is_break()), "{bracketed:?}");
    }

    #[test]
    fn stray_closers_and_colons_are_text() {
        expect("a) b] c:1.5) d: e", &[("a) b] c:1.5) d: e", 1.0)]);
        expect("(a:)", &[("a:", 1.1)]);
        expect("a \\ b", &[("a  b", 1.0)]);
        expect("", &[("", 1.0)]);
    }

    #[test]
    fn bad_weight_is_an_error_with_its_position() {
        let err = parse("ab (cat:1.2.3)").unwrap_err();
        assert_eq!(err.column, 8);
        assert_eq!(err.weight, "1.2.3");
        assert!(parse("(x:.)").is_err());
        // Outside brackets the same characters are only text, as in A1111.
        expect("x:1.2.3)", &[("x:1.2.3)", 1.0)]);
    }
}
