//! Column names BigQuery can take. A source column whose name BigQuery refuses is loaded under
//! another name, chosen by one deterministic rule; the plan and the report list every rename.
//!
//! BigQuery's rule (Column names): "A column name can contain letters (a-z, A-Z), numbers
//! (0-9), or underscores (_), and it must start with a letter or underscore. [...] Column names
//! have a maximum length of 300 characters. Column names can't use any of the following
//! prefixes: _TABLE_, _FILE_, _PARTITION, _ROW_TIMESTAMP, __ROOT__, _COLIDENTIFIER,
//! _CHANGE_SEQUENCE_NUMBER, _CHANGE_TYPE, _CHANGE_TIMESTAMP" and "Duplicate column names are not
//! allowed even if the case differs." Flexible column names would take more characters, but
//! whether a Parquet load accepts them depends on the project's `columnNameCharacterMap`, so
//! shardflow sticks to the plain form every project accepts.
//!
//! The rule, which depends on the set of names and not on the columns' order (a file whose
//! columns come in another order maps them the same way):
//! 1. a name BigQuery takes as it is keeps it; of names equal ignoring case, the first in byte
//!    order does (`Amount` before `amount`);
//! 2. every other name has each character other than an ASCII letter, digit or `_` replaced
//!    by `_`; one that then starts with a digit or a reserved prefix (ignoring case) gets a
//!    leading `_`; an empty one becomes `_`;
//! 3. a name longer than 300 characters keeps its first 291 and ends with `_` and 8 hex digits
//!    of the MD5 of the source name;
//! 4. those names, in byte order of their new form then of the source name, take it when it
//!    is free (ignoring case), else the first free `_2`, `_3`, …; the names kept under 1 are
//!    placed first, so a valid name never moves for a renamed one.

use md5::{Digest, Md5};

/// BigQuery's limit on a column name.
pub const MAX_COLUMN_NAME: usize = 300;

const RESERVED_PREFIXES: &[&str] = &[
    "_TABLE_",
    "_FILE_",
    "_PARTITION",
    "_ROW_TIMESTAMP",
    "__ROOT__",
    "_COLIDENTIFIER",
    "_CHANGE_SEQUENCE_NUMBER",
    "_CHANGE_TYPE",
    "_CHANGE_TIMESTAMP",
];

fn reserved(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    RESERVED_PREFIXES.iter().any(|p| upper.starts_with(p))
}

/// Whether BigQuery takes `name` as a column name as it is.
pub fn is_valid_column_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_COLUMN_NAME
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !reserved(name)
}

/// Steps 2 and 3: a valid form of `name`, not yet checked against the other columns.
fn cleaned(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    while reserved(&out) {
        out.insert(0, '_');
    }
    if out.len() > MAX_COLUMN_NAME {
        let digest = hex::encode(Md5::digest(name.as_bytes()));
        out.truncate(MAX_COLUMN_NAME - 9);
        out.push('_');
        out.push_str(&digest[..8]);
    }
    out
}

/// `base`, or `base_2`, `base_3`, … : the first not in `taken` (lower-cased), cut to fit.
fn free(base: &str, taken: &std::collections::HashSet<String>) -> String {
    if !taken.contains(&base.to_lowercase()) {
        return base.to_string();
    }
    (2..)
        .map(|n| {
            let suffix = format!("_{n}");
            let keep = base.len().min(MAX_COLUMN_NAME - suffix.len());
            format!("{}{suffix}", &base[..keep])
        })
        .find(|candidate| !taken.contains(&candidate.to_lowercase()))
        .expect("an unbounded range has a free name")
}

/// The BigQuery name of each source column, in the same order (the rule above).
pub fn bigquery_column_names(names: &[String]) -> Vec<String> {
    let mut taken = std::collections::HashSet::new();
    let mut out: Vec<Option<String>> = vec![None; names.len()];
    let mut valid: Vec<usize> = (0..names.len())
        .filter(|&i| is_valid_column_name(&names[i]))
        .collect();
    valid.sort_by(|&a, &b| names[a].cmp(&names[b]).then(a.cmp(&b)));
    for i in valid {
        if taken.insert(names[i].to_lowercase()) {
            out[i] = Some(names[i].clone());
        }
    }
    let mut renamed: Vec<(String, usize)> = (0..names.len())
        .filter(|&i| out[i].is_none())
        .map(|i| (cleaned(&names[i]), i))
        .collect();
    renamed.sort_by(|(x, a), (y, b)| {
        (x.to_lowercase(), &names[*a], a).cmp(&(y.to_lowercase(), &names[*b], b))
    });
    for (base, i) in renamed {
        let chosen = free(&base, &taken);
        taken.insert(chosen.to_lowercase());
        out[i] = Some(chosen);
    }
    out.into_iter().map(Option::unwrap_or_default).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        bigquery_column_names(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn valid_names_stay() {
        assert_eq!(
            names(&["id", "_x", "Amount_2", "a1"]),
            ["id", "_x", "Amount_2", "a1"]
        );
    }

    #[test]
    fn invalid_characters_become_underscores() {
        assert_eq!(
            names(&["order id", "prix€", "a-b.c", "ü", "", "2024 total"]),
            ["order_id", "prix_", "a_b_c", "__2", "_", "_2024_total"]
        );
    }

    #[test]
    fn case_collisions_get_a_suffix_in_byte_order() {
        // The first in byte order keeps the name; the others take suffixes in that order.
        assert_eq!(names(&["Amount", "amount"]), ["Amount", "amount_2"]);
        assert_eq!(
            names(&["Amount", "amount", "AMOUNT"]),
            ["Amount_2", "amount_3", "AMOUNT"]
        );
        // A valid name keeps its place even when an earlier column would clean into it.
        assert_eq!(names(&["order id", "order_id"]), ["order_id_2", "order_id"]);
        // A suffix that is itself taken moves on.
        assert_eq!(names(&["a", "A", "a_2"]), ["a_3", "A", "a_2"]);
    }

    #[test]
    fn the_order_of_the_columns_changes_no_name() {
        let columns = [
            "amount", "Amount", "order id", "order_id", "1st", "_1st", "x y", "x-y",
        ];
        let want: std::collections::HashMap<&str, String> =
            columns.iter().copied().zip(names(&columns)).collect();
        // Every rotation and the reversal give each source column the same name.
        let mut orders: Vec<Vec<&str>> = (0..columns.len())
            .map(|k| {
                columns
                    .iter()
                    .cycle()
                    .skip(k)
                    .take(columns.len())
                    .copied()
                    .collect()
            })
            .collect();
        orders.push(columns.iter().rev().copied().collect());
        for order in orders {
            let got: std::collections::HashMap<&str, String> =
                order.iter().copied().zip(names(&order)).collect();
            assert_eq!(got, want, "{order:?}");
        }
    }

    #[test]
    fn reserved_prefixes_and_leading_digits_are_escaped() {
        assert_eq!(
            names(&["_TABLE_SUFFIX", "_partitiontime", "__root__x", "1st"]),
            ["__TABLE_SUFFIX", "__partitiontime", "___root__x", "_1st"]
        );
    }

    #[test]
    fn long_names_are_cut_with_a_digest_and_stay_apart() {
        let a = format!("{}a", "x".repeat(400));
        let b = format!("{}b", "x".repeat(400));
        let out = names(&[&a, &b]);
        assert_eq!(out[0].len(), MAX_COLUMN_NAME);
        assert_eq!(out[1].len(), MAX_COLUMN_NAME);
        assert_ne!(out[0], out[1]);
        assert!(out[0].starts_with(&"x".repeat(291)));
        // A valid 300-character name stays.
        let fits = "y".repeat(300);
        assert_eq!(names(&[&fits]), vec![fits]);
    }

    #[test]
    fn every_result_is_valid_and_distinct() {
        let input = [
            "id", "ID", "Id ", "i d", "_TABLE_", "_table_", "", "", "9", "é", "a.b", "a_b", "A_B",
        ];
        let out = names(&input);
        let mut lower: Vec<String> = out.iter().map(|n| n.to_lowercase()).collect();
        assert!(out.iter().all(|n| is_valid_column_name(n)), "{out:?}");
        lower.sort();
        lower.dedup();
        assert_eq!(lower.len(), input.len(), "{out:?}");
        // Deterministic.
        assert_eq!(names(&input), out);
    }
}
