//! Dates and times as `to_datetime` reads them: the format `guess_datetime_format` takes
//! from a column's first value, and dateutil's reading of each value when it guesses none.

use super::*;

/// One directive of a strptime format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    Year,
    Month,
    MonthAbbr,
    MonthName,
    WeekdayAbbr,
    Day,
    Hour,
    /// `%I`: an hour on a 12-hour clock, with `%p` (AM/PM) after it.
    Hour12,
    AmPm,
    Minute,
    Second,
    Fraction,
    Offset,
    /// `%Z`: a zone name; only UTC and GMT are read.
    ZoneName,
    Literal(char),
    /// A space in a format matches any run of whitespace (Python's strptime).
    Space,
}

/// How a column's text becomes times: the format pandas guesses from the first value, which
/// every value must then match, or dateutil's reading of each value on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatetimeRule {
    Format { format: String, items: Vec<Item> },
    EachValue,
}

/// A time read from text: naive, or with its offset from UTC in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedTime {
    pub local: NaiveDateTime,
    pub offset_seconds: Option<i32>,
}

impl ParsedTime {
    /// Microseconds since the epoch in UTC; a naive time is taken as UTC, as BigQuery takes a
    /// TIMESTAMP without a zone.
    pub fn utc_micros(&self) -> i64 {
        let utc = self.local.and_utc().timestamp_micros();
        utc - i64::from(self.offset_seconds.unwrap_or(0)) * 1_000_000
    }

    /// Within pandas' nanosecond range (1677-09-21 to 2262-04-11): outside it `to_datetime`
    /// fails, so detection calls such a column text.
    pub(super) fn in_pandas_range(&self) -> bool {
        let micros = self.utc_micros();
        (-9_223_372_036_854_775..=9_223_372_036_854_775).contains(&micros)
    }
}

pub(super) const MONTHS: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];
pub(super) const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

pub(super) fn month_number(word: &str) -> Option<(u32, bool)> {
    let lower = word.to_ascii_lowercase();
    MONTHS.iter().position(|m| *m == lower).map_or_else(
        || {
            MONTHS
                .iter()
                .position(|m| lower.len() == 3 && m.starts_with(&lower))
                .map(|i| (i as u32 + 1, false))
        },
        |i| Some((i as u32 + 1, true)),
    )
}

pub(super) fn is_weekday(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    WEEKDAYS
        .iter()
        .any(|d| *d == lower || (lower.len() == 3 && d.starts_with(&lower)))
}

/// A value's pieces: digit runs, letter runs, and single other characters.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Token<'a> {
    Digits(&'a str),
    Word(&'a str),
    Space,
    Mark(char),
}

pub(super) fn tokens(text: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let run = |pred: fn(char) -> bool| rest.find(|c: char| !pred(c)).unwrap_or(rest.len());
        let (token, len) = if c.is_ascii_digit() {
            let n = run(|c| c.is_ascii_digit());
            (Token::Digits(&rest[..n]), n)
        } else if c.is_ascii_alphabetic() {
            let n = run(|c| c.is_ascii_alphabetic());
            (Token::Word(&rest[..n]), n)
        } else if c.is_whitespace() {
            (Token::Space, run(char::is_whitespace))
        } else {
            (Token::Mark(c), c.len_utf8())
        };
        out.push(token);
        rest = &rest[len..];
    }
    out
}

pub(super) fn parse_format(format: &str) -> Vec<Item> {
    let mut items = Vec::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        items.push(match c {
            '%' => match chars.next() {
                Some('Y') => Item::Year,
                Some('m') => Item::Month,
                Some('b') => Item::MonthAbbr,
                Some('B') => Item::MonthName,
                Some('a') => Item::WeekdayAbbr,
                Some('d') => Item::Day,
                Some('H') => Item::Hour,
                Some('I') => Item::Hour12,
                Some('p') => Item::AmPm,
                Some('M') => Item::Minute,
                Some('S') => Item::Second,
                Some('f') => Item::Fraction,
                Some('z') => Item::Offset,
                Some('Z') => Item::ZoneName,
                Some(other) => Item::Literal(other),
                None => Item::Literal('%'),
            },
            ' ' => Item::Space,
            other => Item::Literal(other),
        });
    }
    items
}

/// The format `guess_datetime_format` gives a value (`dayfirst=False`), for the shapes real
/// files hold: year-first dates with `-`, `/` or `.` (or 8 digits), month-first dates with a
/// four-digit year (day-first when the first number cannot be a month), month names,
/// `%Y` and `%Y-%m`, each optionally followed by a time (`T` or a space; hours, minutes,
/// seconds, a fraction) and a zone (`Z`, `±hh:mm`, `±hhmm`, `±hh`, ` UTC`). None where pandas
/// guesses nothing either (two-digit years, AM/PM, a time alone) and dateutil reads each value.
pub fn guess_format(value: &str) -> Option<String> {
    // pandas guesses only from a value it can parse as a time in its range.
    let format = guess_shape(value)?;
    parse_with(&parse_format(&format), value)
        .ok()
        .filter(ParsedTime::in_pandas_range)
        .map(|_| format)
}

/// The format a value's shape suggests (`guess_format` without the check that it parses).
pub(super) fn guess_shape(value: &str) -> Option<String> {
    let t = tokens(value);
    let num = |i: usize| match t.get(i) {
        Some(Token::Digits(d)) => Some(*d),
        _ => None,
    };
    let mark = |i: usize| match t.get(i) {
        Some(Token::Mark(c)) => Some(*c),
        _ => None,
    };
    let mut format = String::new();
    // The date: how many tokens it takes.
    let date_len;
    match (num(0), mark(1), num(2), mark(3), num(4)) {
        (Some(y), Some(s), Some(m), Some(s2), Some(d))
            if y.len() == 4 && s == s2 && "-/.".contains(s) && m.len() <= 2 && d.len() <= 2 =>
        {
            format = format!("%Y{s}%m{s}%d");
            date_len = 5;
        }
        (Some(a), Some(s), Some(b), Some(s2), Some(y))
            if y.len() == 4 && s == s2 && "-/.".contains(s) && a.len() <= 2 && b.len() <= 2 =>
        {
            let first: u32 = a.parse().ok()?;
            format = if first > 12 {
                format!("%d{s}%m{s}%Y")
            } else {
                format!("%m{s}%d{s}%Y")
            };
            date_len = 5;
        }
        (Some(y), Some('-'), Some(m), _, _) if y.len() == 4 && m.len() == 2 && t.len() == 3 => {
            return Some("%Y-%m".into());
        }
        (Some(d), _, _, _, _) if d.len() == 8 && t.len() == 1 => return Some("%Y%m%d".into()),
        (Some(y), _, _, _, _) if y.len() == 4 && t.len() == 1 => return Some("%Y".into()),
        _ => {
            // Month names: "Jan 1 2000", "January 5, 2020", "5 January 2020", with an
            // optional weekday in front ("Mon, 06 Jan 2020").
            let mut i = 0;
            if let Some(Token::Word(w)) = t.first()
                && is_weekday(w)
                && w.len() == 3
                && mark(1) == Some(',')
                && t.get(2) == Some(&Token::Space)
            {
                format.push_str("%a, ");
                i = 3;
            }
            let month_directive =
                |w: &str| month_number(w).map(|(_, full)| if full { "%B" } else { "%b" });
            let word = |k: usize| match t.get(k) {
                Some(Token::Word(w)) => Some(*w),
                _ => None,
            };
            // A separator between the parts: a space, `-` or `/`.
            let sep = |k: usize| match t.get(k) {
                Some(Token::Space) => Some(' '),
                Some(Token::Mark(c @ ('-' | '/'))) => Some(*c),
                _ => None,
            };
            let year = |k: usize| num(k).is_some_and(|y| y.len() == 4);
            // A day, with its ordinal suffix as pandas keeps it ("1st" is `%dst`): the
            // directive and the tokens it takes.
            let day = |k: usize| {
                num(k).filter(|d| d.len() <= 2)?;
                match word(k + 1) {
                    Some(w @ ("st" | "nd" | "rd" | "th")) => Some((format!("%d{w}"), 2)),
                    _ => Some(("%d".to_string(), 1)),
                }
            };
            if let (Some(m), Some(s), Some((d, n))) =
                (word(i).and_then(month_directive), sep(i + 1), day(i + 2))
            {
                // "Jan 1 2000", "January 5, 2020", "Jan-1-1995".
                let comma = s == ' ' && mark(i + 2 + n) == Some(',');
                let j = i + 2 + n + usize::from(comma);
                if sep(j) != Some(s) || !year(j + 1) {
                    return None;
                }
                format.push_str(&format!("{m}{s}{d}{}{s}%Y", if comma { "," } else { "" }));
                date_len = j + 2;
            } else if let Some((d, n)) = day(i)
                && let Some(s) = sep(i + n)
                && let Some(m) = word(i + n + 1).and_then(month_directive)
                && sep(i + n + 2) == Some(s)
                && year(i + n + 3)
            {
                // "5 January 2020", "01-Jan-1995", "1st Jan 2020".
                format.push_str(&format!("{d}{s}{m}{s}%Y"));
                date_len = i + n + 4;
            } else if let (true, Some(s), Some(m)) =
                (year(i), sep(i + 1), word(i + 2).and_then(month_directive))
                && s != ' '
                && sep(i + 3) == Some(s)
                && num(i + 4).is_some_and(|d| d.len() <= 2)
            {
                // "1995-Jan-01".
                format.push_str(&format!("%Y{s}{m}{s}%d"));
                date_len = i + 5;
            } else {
                return None;
            }
        }
    }
    let rest = &t[date_len..];
    if rest.is_empty() {
        return Some(format);
    }
    // The time.
    let mut k = 0;
    let at = |k: usize| rest.get(k);
    match at(0) {
        Some(Token::Word("T")) => format.push('T'),
        Some(Token::Space) => format.push(' '),
        _ => return None,
    }
    k += 1;
    let digits = |k: usize, max: usize| matches!(at(k), Some(Token::Digits(d)) if d.len() <= max);
    // "T10" alone is an hour.
    if !digits(k, 2) {
        return None;
    }
    format.push_str("%H");
    k += 1;
    for directive in ["%M", "%S"] {
        if at(k) == Some(&Token::Mark(':')) && digits(k + 1, 2) {
            format.push(':');
            format.push_str(directive);
            k += 2;
        } else {
            break;
        }
    }
    if format.ends_with("%S") && at(k) == Some(&Token::Mark('.')) && digits(k + 1, 9) {
        format.push_str(".%f");
        k += 2;
    }
    // A 12-hour clock: pandas guesses `%I … %p` only where the written hour is the day's
    // hour (AM before noon, 12 PM), and nothing for other PM times (dateutil reads them).
    if at(k) == Some(&Token::Space)
        && let Some(Token::Word(w)) = at(k + 1)
        && (w.eq_ignore_ascii_case("AM") || w.eq_ignore_ascii_case("PM"))
    {
        let hour: u32 = match rest.get(1) {
            Some(Token::Digits(h)) => h.parse().ok()?,
            _ => return None,
        };
        let pm = w.eq_ignore_ascii_case("PM");
        if !(1..=12).contains(&hour) || (pm != (hour == 12)) {
            return None;
        }
        format = format.replacen("%H", "%I", 1);
        format.push_str(" %p");
        k += 2;
    }
    // The zone.
    match (at(k), at(k + 1), at(k + 2), at(k + 3)) {
        (None, ..) => {}
        (Some(Token::Word("Z" | "z")), None, ..) => format.push_str("%z"),
        (Some(Token::Mark('+' | '-')), Some(Token::Digits(h)), None, _)
            if h.len() == 2 || h.len() == 4 =>
        {
            format.push_str("%z")
        }
        (
            Some(Token::Mark('+' | '-')),
            Some(Token::Digits(h)),
            Some(Token::Mark(':')),
            Some(Token::Digits(m)),
        ) if h.len() == 2 && m.len() == 2 && rest.len() == k + 4 => format.push_str("%z"),
        (Some(Token::Space), Some(Token::Word("UTC")), None, _) => format.push_str(" %Z"),
        _ => return None,
    }
    Some(format)
}

/// Reads up to `max` digits (at least one), the longest prefix whose value is at most `limit`,
/// as Python's strptime regexes (`1[0-2]|0[1-9]|[1-9]`) do.
pub(super) fn take_number(text: &str, max: usize, limit: u32) -> Option<(u32, &str)> {
    let n = text
        .bytes()
        .take(max)
        .take_while(u8::is_ascii_digit)
        .count();
    (1..=n).rev().find_map(|len| {
        let v: u32 = text[..len].parse().ok()?;
        (v <= limit).then_some((v, &text[len..]))
    })
}

pub(super) fn take_word<'a>(
    text: &'a str,
    words: &[&str],
    abbreviated: bool,
) -> Option<(u32, &'a str)> {
    words.iter().enumerate().find_map(|(i, w)| {
        let w = if abbreviated { &w[..3] } else { w };
        let head = text.get(..w.len())?;
        head.eq_ignore_ascii_case(w)
            .then(|| (i as u32 + 1, &text[w.len()..]))
    })
}

/// The time `text` holds under `items`, or why not.
pub(super) fn parse_with(items: &[Item], text: &str) -> Result<ParsedTime, String> {
    let mut rest = text;
    let (mut year, mut month, mut day) = (1900, 1, 1);
    let (mut hour, mut minute, mut second, mut nanos) = (0, 0, 0, 0u32);
    let mut offset = None;
    let unmatched = || "does not match".to_string();
    for item in items {
        match item {
            Item::Year => {
                if rest.len() < 4 || !rest.as_bytes()[..4].iter().all(u8::is_ascii_digit) {
                    return Err(unmatched());
                }
                year = rest[..4].parse().map_err(|_| unmatched())?;
                rest = &rest[4..];
            }
            Item::Month => (month, rest) = take_number(rest, 2, 12).ok_or_else(unmatched)?,
            Item::MonthAbbr => {
                (month, rest) = take_word(rest, &MONTHS, true).ok_or_else(unmatched)?
            }
            Item::MonthName => {
                (month, rest) = take_word(rest, &MONTHS, false).ok_or_else(unmatched)?
            }
            Item::WeekdayAbbr => {
                (_, rest) = take_word(rest, &WEEKDAYS, true).ok_or_else(unmatched)?
            }
            Item::Day => (day, rest) = take_number(rest, 2, 31).ok_or_else(unmatched)?,
            Item::Hour => (hour, rest) = take_number(rest, 2, 23).ok_or_else(unmatched)?,
            Item::Hour12 => {
                (hour, rest) = take_number(rest, 2, 12).ok_or_else(unmatched)?;
                if hour == 0 {
                    return Err(unmatched());
                }
            }
            Item::AmPm => {
                let head = rest.get(..2).ok_or_else(unmatched)?;
                let pm = head.eq_ignore_ascii_case("PM");
                if !pm && !head.eq_ignore_ascii_case("AM") {
                    return Err(unmatched());
                }
                hour = hour % 12 + if pm { 12 } else { 0 };
                rest = &rest[2..];
            }
            Item::Minute => (minute, rest) = take_number(rest, 2, 59).ok_or_else(unmatched)?,
            Item::Second => (second, rest) = take_number(rest, 2, 59).ok_or_else(unmatched)?,
            Item::Fraction => {
                let n = rest.bytes().take(9).take_while(u8::is_ascii_digit).count();
                if n == 0 {
                    return Err(unmatched());
                }
                nanos = format!("{:0<9}", &rest[..n])
                    .parse()
                    .map_err(|_| unmatched())?;
                rest = &rest[n..];
            }
            Item::Offset => {
                let (seconds, after) = take_offset(rest).ok_or_else(unmatched)?;
                offset = Some(seconds);
                rest = after;
            }
            Item::ZoneName => {
                let head = rest.get(..3).ok_or_else(unmatched)?;
                if !head.eq_ignore_ascii_case("UTC") && !head.eq_ignore_ascii_case("GMT") {
                    return Err(unmatched());
                }
                offset = Some(0);
                rest = &rest[3..];
            }
            Item::Space => {
                let trimmed = rest.trim_start();
                if trimmed.len() == rest.len() {
                    return Err(unmatched());
                }
                rest = trimmed;
            }
            Item::Literal(c) => rest = rest.strip_prefix(*c).ok_or_else(unmatched)?,
        }
    }
    if !rest.is_empty() {
        return Err(format!("has {rest:?} left over"));
    }
    let date = NaiveDate::from_ymd_opt(year, month, day)
        .ok_or_else(|| format!("is not a date ({year}-{month:02}-{day:02})"))?;
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)
        .ok_or_else(|| "is not a time of day".to_string())?;
    Ok(ParsedTime {
        local: date.and_time(time),
        offset_seconds: offset,
    })
}

/// `Z`, `±hh`, `±hhmm` or `±hh:mm`, in seconds east of UTC.
pub(super) fn take_offset(text: &str) -> Option<(i32, &str)> {
    if let Some(rest) = text.strip_prefix(['Z', 'z']) {
        return Some((0, rest));
    }
    let sign = match text.chars().next()? {
        '+' => 1,
        '-' => -1,
        _ => return None,
    };
    let rest = &text[1..];
    let digits =
        |s: &str, n: usize| s.len() >= n && s.as_bytes()[..n].iter().all(u8::is_ascii_digit);
    if !digits(rest, 2) {
        return None;
    }
    let hours: i32 = rest[..2].parse().ok()?;
    let rest = &rest[2..];
    let rest_minutes = rest.strip_prefix(':').unwrap_or(rest);
    let (minutes, rest) = if digits(rest_minutes, 2) {
        (rest_minutes[..2].parse::<i32>().ok()?, &rest_minutes[2..])
    } else {
        (0, rest)
    };
    // `+05:75` or `+99:00` is no offset (pandas refuses them too).
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some((sign * (hours * 3600 + minutes * 60), rest))
}

/// Two-digit years as dateutil reads them: within 50 years of today.
pub(super) fn full_year(two_digits: i32, this_year: i32) -> i32 {
    let century = this_year - this_year % 100;
    let mut year = century + two_digits;
    if year >= this_year + 50 {
        year -= 100;
    } else if year < this_year - 50 {
        year += 100;
    }
    year
}

/// pandas' quarters (`_parse_dateabbr_string`): `1974Q1`, `1974-Q1`, `1Q1974`, `2Q-1974`,
/// `74Q1` (20yy), in any case; the quarter's first day.
pub(super) fn quarter(text: &str) -> Option<NaiveDate> {
    let upper = text.to_ascii_uppercase();
    if !(4..=7).contains(&upper.len()) || !upper.is_ascii() {
        return None;
    }
    let q = upper[1..].find('Q')? + 1;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (year, quarter): (&str, &str) = match q {
        // (\d)Q-?(\d\d) and (\d)Q-?(\d{4})
        1 => (
            upper[2..].strip_prefix('-').unwrap_or(&upper[2..]),
            &upper[..1],
        ),
        // (\d\d)-?Q(\d) and (\d{4})-?Q(\d)
        2..=5 => (
            upper[..q].strip_suffix('-').unwrap_or(&upper[..q]),
            &upper[q + 1..],
        ),
        _ => return None,
    };
    if !digits(year) || !digits(quarter) || quarter.len() != 1 {
        return None;
    }
    let year: i32 = match year.len() {
        2 => 2000 + year.parse::<i32>().ok()?,
        4 => year.parse().ok()?,
        _ => return None,
    };
    let quarter: u32 = quarter.parse().ok()?;
    if !(1..=4).contains(&quarter) {
        return None;
    }
    NaiveDate::from_ymd_opt(year, (quarter - 1) * 3 + 1, 1)
}

/// dateutil's reading of a value pandas guessed no format for, for the shapes real files
/// hold: `m/d/yy` (or `d/m/yy` when the first number cannot be a month; `-` and `.` too),
/// "March 2020", month-name dates, each optionally with a time `H:MM[:SS[.f]]`, `AM`/`PM`
/// and a zone (`Z`, `UTC`, `GMT`, `±hh:mm`); a time alone falls on today's date, as pandas
/// puts it.
pub(super) fn parse_each_value(text: &str, today: NaiveDate) -> Result<ParsedTime, String> {
    let unknown = || "is not a date and time pandas reads".to_string();
    if let Some(date) = quarter(text) {
        return Ok(ParsedTime {
            local: date.and_time(NaiveTime::MIN),
            offset_seconds: None,
        });
    }
    let t = tokens(text);
    let mut i = 0;
    let at = |i: usize| t.get(i);
    let number = |i: usize| match t.get(i) {
        Some(Token::Digits(d)) => d.parse::<i32>().ok().map(|v| (v, d.len())),
        _ => None,
    };
    let mark = |i: usize| match t.get(i) {
        Some(Token::Mark(c)) => Some(*c),
        _ => None,
    };
    let mut date = None;
    // Numeric dates.
    if let (Some((a, a_len)), Some(s), Some((b, _)), Some(s2), Some((c, c_len))) =
        (number(0), mark(1), number(2), mark(3), number(4))
        && s == s2
        && "/-.".contains(s)
    {
        // Year first when it has four digits (`2020-01-02 10:00 PM`), else month (or day,
        // when the first cannot be a month) first, the year last.
        let (year, m, d) = if a_len == 4 {
            (a, b, c)
        } else {
            let year = if c_len <= 2 {
                full_year(c, today.year())
            } else {
                c
            };
            let (m, d) = if a > 12 { (b, a) } else { (a, b) };
            (year, m, d)
        };
        date = Some(
            NaiveDate::from_ymd_opt(year, m as u32, d as u32)
                .ok_or_else(|| format!("is not a date ({year}-{m:02}-{d:02})"))?,
        );
        i = 5;
    } else if let Some(Token::Word(w)) = at(0)
        && let Some((m, _)) = month_number(w)
    {
        // "March 2020", "Jan 1 2000", "January 5, 2020".
        match (at(1), number(2), mark(3)) {
            (Some(Token::Space | Token::Mark('-' | '/')), Some((y, 4)), _)
                if at(3).is_none() || at(3) == Some(&Token::Space) =>
            {
                date = NaiveDate::from_ymd_opt(y, m, 1);
                i = 3;
            }
            (Some(Token::Space), Some((d, 1 | 2)), comma) => {
                let j = 3 + usize::from(comma == Some(','));
                if let (Some(Token::Space), Some((y, 4))) = (at(j), number(j + 1)) {
                    date = Some(NaiveDate::from_ymd_opt(y, m, d as u32).ok_or_else(unknown)?);
                    i = j + 2;
                }
            }
            _ => {}
        }
        date.ok_or_else(unknown)?;
    }
    let date_given = date.is_some();
    if date_given {
        match at(i) {
            None => {}
            Some(Token::Space) => i += 1,
            _ => return Err(unknown()),
        }
    }
    let mut time = NaiveTime::MIN;
    let mut offset = None;
    if let (Some((h, 1 | 2)), Some(':'), Some((m, 2))) = (number(i), mark(i + 1), number(i + 2)) {
        let (mut h, mut s, mut nanos) = (h as u32, 0, 0);
        i += 3;
        if let (Some(':'), Some((sec, 2))) = (mark(i), number(i + 1)) {
            s = sec as u32;
            i += 2;
            if let (Some('.'), Some(Token::Digits(f))) = (mark(i), at(i + 1))
                && f.len() <= 9
            {
                nanos = format!("{f:0<9}").parse().map_err(|_| unknown())?;
                i += 2;
            }
        }
        if at(i) == Some(&Token::Space)
            && let Some(Token::Word(w)) = at(i + 1)
            && (w.eq_ignore_ascii_case("AM") || w.eq_ignore_ascii_case("PM"))
        {
            if !(1..=12).contains(&h) {
                return Err(unknown());
            }
            h = h % 12 + if w.eq_ignore_ascii_case("PM") { 12 } else { 0 };
            i += 2;
        }
        time = NaiveTime::from_hms_nano_opt(h, m as u32, s, nanos).ok_or_else(unknown)?;
        let zone_text: String = t[i..]
            .iter()
            .map(|tok| match tok {
                Token::Digits(d) | Token::Word(d) => d.to_string(),
                Token::Space => " ".into(),
                Token::Mark(c) => c.to_string(),
            })
            .collect();
        let zone = zone_text.trim_start();
        if !zone.is_empty() {
            if zone.eq_ignore_ascii_case("UTC") || zone.eq_ignore_ascii_case("GMT") {
                offset = Some(0);
            } else {
                match take_offset(zone) {
                    Some((seconds, "")) => offset = Some(seconds),
                    _ => return Err(unknown()),
                }
            }
        }
    } else if !date_given || at(i).is_some() {
        return Err(unknown());
    }
    Ok(ParsedTime {
        local: date.unwrap_or(today).and_time(time),
        offset_seconds: offset,
    })
}

impl DatetimeRule {
    /// The rule `to_datetime` follows for a column whose first value (missing ones skipped)
    /// is `first`.
    pub fn for_first_value(first: &str) -> Self {
        match guess_format(first) {
            Some(format) => {
                let items = parse_format(&format);
                DatetimeRule::Format { format, items }
            }
            None => DatetimeRule::EachValue,
        }
    }

    /// The rule under which every value of a column parses, in pandas' range, as
    /// `pd.to_datetime(column)` requires; None when it raises.
    pub fn for_column<'a>(mut values: impl Iterator<Item = &'a str>) -> Option<Self> {
        let today = chrono::Utc::now().date_naive();
        let values_left = values.by_ref().filter(|v| !NAT_VALUES.contains(v));
        let mut values_left = values_left.peekable();
        let first = *values_left.peek()?;
        if !looks_like_a_datetime(first) {
            return None;
        }
        let rule = Self::for_first_value(first);
        for v in values_left {
            match rule.parse(v, today) {
                Ok(t) if t.in_pandas_range() => {}
                _ => return None,
            }
        }
        Some(rule)
    }

    /// `text` as a time under this rule.
    pub fn parse(&self, text: &str, today: NaiveDate) -> Result<ParsedTime, String> {
        match self {
            DatetimeRule::Format { items, .. } => parse_with(items, text),
            DatetimeRule::EachValue => {
                if !looks_like_a_datetime(text) {
                    return Err(unknown_value());
                }
                parse_each_value(text, today)
            }
        }
    }

    /// How the rule is described in an error.
    pub fn describe(&self) -> String {
        match self {
            DatetimeRule::Format { format, .. } => {
                format!("the format {format} of the column's first value")
            }
            DatetimeRule::EachValue => "a date and time pandas reads".into(),
        }
    }
}

pub(super) fn unknown_value() -> String {
    "is not a date and time pandas reads".into()
}

/// pandas' `_does_string_look_like_datetime`: a number under 1000 is not a date (unless it
/// starts with 0), nor are the single letters dateutil would read as AM/PM or a zone.
pub(super) fn looks_like_a_datetime(text: &str) -> bool {
    if text.starts_with('0') {
        return true;
    }
    if let Ok(v) = text.trim().parse::<f64>()
        && v < 1000.0
    {
        return false;
    }
    !matches!(text, "a" | "A" | "m" | "M" | "p" | "P" | "t" | "T")
}
