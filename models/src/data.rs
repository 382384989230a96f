//! Interaction files and the leave-one-out split.
//!
//! Format (S3-Rec / ICLRec): one user per line, `user item1 item2 ...`, items in
//! time order, 1-based ids; 0 is the padding id and never a real item.
//! Leave-one-out: the last item is the test target, the second-to-last the
//! validation target, the rest trains (each item predicts the next).

use std::path::Path;

use crate::error::{invalid, Error, Result};

/// The longest input sequence a model sees (older items are dropped).
pub const MAX_LEN: usize = 50;

/// Users' item sequences and the catalog they draw from.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Where the data came from (a file name), for messages and records.
    pub name: String,
    /// The catalog is ids `1..=num_items`; tables have `num_items + 1` rows (row 0 is padding).
    pub num_items: u32,
    /// One time-ordered sequence per user, each at least 3 items long.
    pub sequences: Vec<Vec<u32>>,
}

/// Reads an interaction file. `declared_items` fixes the catalog size
/// (an id beyond it is an error); without it the largest id found is used.
pub fn load(path: &Path, declared_items: Option<u32>) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, &path.display().to_string(), declared_items)
}

/// Parses interaction text; `file` names it in errors.
pub fn parse(text: &str, file: &str, declared_items: Option<u32>) -> Result<Dataset> {
    let err = |line: usize, message: String| Error::Data {
        file: file.to_string(),
        line,
        message,
    };
    if declared_items == Some(0) {
        return Err(invalid("declared_items", "at least 1", 0));
    }
    let mut sequences = Vec::new();
    let mut largest = 0u32;
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let mut tokens = line.split_whitespace();
        let user = tokens
            .next()
            .ok_or_else(|| err(line_no, "empty line: expected `user item1 item2 ...`".into()))?;
        if user.parse::<u64>().is_err() {
            return Err(err(
                line_no,
                format!("malformed user id {user:?}: expected a non-negative integer"),
            ));
        }
        let mut items = Vec::new();
        for token in tokens {
            let item: u32 = token.parse().map_err(|_| {
                err(
                    line_no,
                    format!("malformed item id {token:?}: expected an integer in 1..=4294967295"),
                )
            })?;
            if item == 0 {
                return Err(err(line_no, "item id 0: ids are 1-based, 0 is the padding id".into()));
            }
            if let Some(limit) = declared_items {
                if item > limit {
                    return Err(err(
                        line_no,
                        format!("item id {item} is beyond the declared catalog of {limit} items"),
                    ));
                }
            }
            largest = largest.max(item);
            items.push(item);
        }
        if items.len() < 3 {
            return Err(err(
                line_no,
                format!(
                    "user {user} has {} item(s); the split needs at least 3 (train, validation, test)",
                    items.len()
                ),
            ));
        }
        sequences.push(items);
    }
    if sequences.is_empty() {
        return Err(err(0, "empty file: no users".into()));
    }
    Ok(Dataset {
        name: file.to_string(),
        num_items: declared_items.unwrap_or(largest),
        sequences,
    })
}

/// One training sequence: `targets[t]` is the item after `inputs[t]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainSequence {
    /// At most `max_len` items, oldest first.
    pub inputs: Vec<u32>,
    /// The next item for each input position.
    pub targets: Vec<u32>,
}

/// One ranking case: predict `target` from `history`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankingCase {
    /// Every item the user had before the target, oldest first; the model sees
    /// its last `max_len`, and all of it is excluded from the ranking.
    pub history: Vec<u32>,
    /// The held-out item.
    pub target: u32,
}

impl RankingCase {
    /// The model's input: the last `max_len` items of the history.
    pub fn input(&self, max_len: usize) -> &[u32] {
        &self.history[self.history.len().saturating_sub(max_len)..]
    }
}

/// The leave-one-out split of a [`Dataset`].
#[derive(Clone, Debug)]
pub struct Split {
    /// Catalog size (ids `1..=num_items`).
    pub num_items: u32,
    /// Longest input sequence.
    pub max_len: usize,
    /// One per user with at least two training items.
    pub train: Vec<TrainSequence>,
    /// One per user: history = all but the last two items.
    pub valid: Vec<RankingCase>,
    /// One per user: history = all but the last item.
    pub test: Vec<RankingCase>,
}

/// Leave-one-out split with inputs cut to the last `max_len` items.
pub fn split(data: &Dataset, max_len: usize) -> Result<Split> {
    if max_len == 0 {
        return Err(invalid("max_len", "at least 1", 0));
    }
    let mut train = Vec::with_capacity(data.sequences.len());
    let mut valid = Vec::with_capacity(data.sequences.len());
    let mut test = Vec::with_capacity(data.sequences.len());
    for (index, seq) in data.sequences.iter().enumerate() {
        let n = seq.len();
        if n < 3 {
            return Err(Error::Data {
                file: data.name.clone(),
                line: index + 1,
                message: format!("sequence of {n} item(s); the split needs at least 3"),
            });
        }
        let train_part = &seq[..n - 2];
        if train_part.len() >= 2 {
            let start = (train_part.len() - 1).saturating_sub(max_len);
            train.push(TrainSequence {
                inputs: train_part[start..train_part.len() - 1].to_vec(),
                targets: train_part[start + 1..].to_vec(),
            });
        }
        valid.push(RankingCase {
            history: train_part.to_vec(),
            target: seq[n - 2],
        });
        test.push(RankingCase {
            history: seq[..n - 1].to_vec(),
            target: seq[n - 1],
        });
    }
    Ok(Split {
        num_items: data.num_items,
        max_len,
        train,
        valid,
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str, declared: Option<u32>) -> String {
        parse(text, "t.txt", declared).unwrap_err().to_string()
    }

    #[test]
    fn parses_and_splits_leave_one_out() {
        let data = parse("1 5 6 7 8\n2 3 4 9\n", "t.txt", None).unwrap();
        assert_eq!(data.num_items, 9);
        let s = split(&data, 50).unwrap();
        assert_eq!(
            s.train[0],
            TrainSequence {
                inputs: vec![5],
                targets: vec![6]
            }
        );
        assert_eq!(
            s.valid[0],
            RankingCase {
                history: vec![5, 6],
                target: 7
            }
        );
        assert_eq!(
            s.test[0],
            RankingCase {
                history: vec![5, 6, 7],
                target: 8
            }
        );
        // A user with exactly one training item has no training pair.
        assert_eq!(s.train.len(), 1);
        assert_eq!(s.test[1].target, 9);
    }

    #[test]
    fn long_sequences_keep_the_most_recent_items() {
        let line = format!("1 {}", (1..=10).map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
        let s = split(&parse(&line, "t", None).unwrap(), 3).unwrap();
        assert_eq!(
            s.train[0],
            TrainSequence {
                inputs: vec![5, 6, 7],
                targets: vec![6, 7, 8]
            }
        );
        assert_eq!(s.test[0].input(3), &[7, 8, 9]);
        assert_eq!(s.test[0].history.len(), 9);
    }

    #[test]
    fn bad_input_names_file_line_and_value() {
        assert_eq!(message("", None), "t.txt:0: empty file: no users");
        assert!(message("1 2 3 4\n2 3 x 5\n", None).starts_with("t.txt:2: malformed item id \"x\""));
        assert!(message("1 2 0 4\n", None).starts_with("t.txt:1: item id 0"));
        assert!(message("1 2 3 40\n", Some(30)).contains("t.txt:1: item id 40 is beyond the declared catalog of 30"));
        assert!(message("1 2 3 4\n7 2 3 4\n8 2\n", None).starts_with("t.txt:3: user 8 has 1 item(s)"));
        assert!(message("u 2 3 4\n", None).contains("malformed user id \"u\""));
        assert!(message("1 2 3 4\n\n", None).starts_with("t.txt:2: empty line"));
        assert!(message("1 2 3 -4\n", None).contains("\"-4\""));
        assert!(message("1 2 3 99999999999\n", None).contains("\"99999999999\""));
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let e = load(Path::new("/nonexistent/x.txt"), None).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/x.txt:"), "{e}");
    }
}
