//! CSV as the workers read it: quoting followed across chunks (to name an unclosed quote
//! and the line it opened on), and the decoder's errors in the seed's words.

use super::*;

/// Follows CSV quoting as the decoder reads it (a quote opens a quoted field only at the
/// start of a field; `""` inside one is a quote; elsewhere a quote is a character), to tell
/// whether the input ended inside a quoted field, and on which line that field opened. It
/// stops only at quotes; line ends are counted once per chunk.
#[derive(Debug)]
pub(super) struct QuoteScan {
    pub(super) delimiter: u8,
    pub(super) quote: u8,
    pub(super) state: QuoteState,
    /// The byte before the next one fed; None at the start of the input.
    pub(super) last: Option<u8>,
    /// Lines seen so far, counted from 1 (the header included).
    pub(super) line: u64,
    pub(super) opened_on: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum QuoteState {
    Outside,
    Quoted,
    /// A quote inside a quoted field: it closes the field, or with a second quote is one.
    QuoteInQuoted,
}

/// Line ends in `bytes`, counted in blocks of 255 into a byte so the compiler vectorises the
/// loop (about ten times a search per line, or a count into a wide integer).
pub(super) fn line_ends(bytes: &[u8]) -> u64 {
    bytes
        .chunks(255)
        .map(|block| {
            let ends = block
                .iter()
                .fold(0u8, |n, &b| n.wrapping_add(u8::from(b == b'\n')));
            u64::from(ends)
        })
        .sum()
}

impl QuoteScan {
    pub(super) fn new(delimiter: u8, quote: u8) -> Self {
        QuoteScan {
            delimiter,
            quote,
            state: QuoteState::Outside,
            last: None,
            line: 1,
            opened_on: 0,
        }
    }

    pub(super) fn feed(&mut self, bytes: &[u8]) {
        use QuoteState::*;
        let Some(&final_byte) = bytes.last() else {
            return;
        };
        let mut from = 0;
        if self.state == QuoteInQuoted {
            // A second quote is a quote in the value; anything else follows a closed field.
            if bytes[0] == self.quote {
                self.state = Quoted;
                from = 1;
            } else {
                self.state = Outside;
            }
        }
        // Where in `bytes` the field open at the end (if any) opened, when it opened here.
        let mut opened_here = None;
        let mut last_quote = None;
        for found in memchr::memchr_iter(self.quote, &bytes[from..]) {
            let at = from + found;
            if self.state == QuoteInQuoted {
                if last_quote == Some(at - 1) {
                    self.state = Quoted;
                    last_quote = Some(at);
                    continue;
                }
                self.state = Outside;
            }
            let previous = if at > 0 {
                Some(bytes[at - 1])
            } else {
                self.last
            };
            self.state = match self.state {
                Quoted => QuoteInQuoted,
                // A quote opens a field at the start of the input, a line or a field. The
                // decoder (csv_core) ends a line at a lone `\r` too.
                _ if previous.is_none_or(|b| b == self.delimiter || b == b'\n' || b == b'\r') => {
                    opened_here = Some(at);
                    Quoted
                }
                // Inside an unquoted value a quote is a character.
                other => other,
            };
            last_quote = Some(at);
        }
        // A closing quote followed by more bytes here closed its field.
        if self.state == QuoteInQuoted && last_quote != Some(bytes.len() - 1) {
            self.state = Outside;
        }
        // Lines are counted once a chunk; an opening line only for a field still open.
        if let Some(opened) = opened_here
            && self.state != Outside
        {
            self.opened_on = self.line + line_ends(&bytes[..opened]);
        }
        self.line += line_ends(bytes);
        self.last = Some(final_byte);
    }

    /// The line the open quoted field started on, when the input so far ends inside one.
    pub(super) fn unclosed_since(&self) -> Option<u64> {
        (self.state == QuoteState::Quoted).then_some(self.opened_on)
    }
}

/// An arrow CSV error as "file, line N: what" (lines counted from 1, the header included).
/// Arrow counts records from 0 in value errors and from 1 in field-count errors.
pub fn csv_error(uri: &str, e: &arrow::error::ArrowError) -> Error {
    let text = e.to_string();
    let text = text
        .trim_start_matches("Csv error: ")
        .trim_start_matches("Parser error: ");
    let number_after = |marker: &str| -> Option<(usize, usize)> {
        let at = text.find(marker)? + marker.len();
        let digits: String = text[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((digits.parse().ok()?, at + digits.len()))
    };
    if let Some((line, _)) = number_after("for line ") {
        // "incorrect number of fields for line 3, expected 2 got 1"
        return Error::Source(format!("{uri}, line {line}: {text}"));
    }
    if let (Some(start), Some((line, _))) = (
        text.find("Error while parsing value "),
        number_after(" at line "),
    ) {
        // "Error while parsing value 'x' as type 'Int64' for column 2 at line 5. Row data: …"
        let what = &text[start + "Error while parsing value ".len()..];
        let what = what.split(" at line ").next().unwrap_or(what);
        return Error::Source(format!(
            "{uri}, line {}: cannot parse value {what}",
            line + 1
        ));
    }
    if let (Some(rest), Some((line, end))) = (
        text.strip_prefix("Error parsing column "),
        number_after(" at line "),
    ) {
        // "Error parsing column 1 at line 2: Parser error: …": the decoder counts records from
        // 0, the header included.
        let column = rest.split(' ').next().unwrap_or("?");
        let why = text[end..]
            .trim_start_matches(": ")
            .trim_start_matches("Parser error: ");
        return Error::Source(format!("{uri}, line {}: column {column}: {why}", line + 1));
    }
    if let Some((line, _)) = number_after(" at line ") {
        // Inference (the csv crate) counts lines from 1.
        return Error::Source(format!("{uri}, line {line}: {text}"));
    }
    Error::Source(format!("{uri}: {text}"))
}
