//! A small slice of the shipped Beauty data for the models' tests.

use std::path::PathBuf;

use moerec_models::data::{self, Dataset, Split};

/// The first `users` users of `data/Beauty.txt`, split leave-one-out at length 50.
pub fn beauty_slice(users: usize) -> (Dataset, Split) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/Beauty.txt");
    let text = std::fs::read_to_string(&path).expect("data/Beauty.txt ships with the repository");
    let slice: String = text.lines().take(users).map(|l| format!("{l}\n")).collect();
    let dataset = data::parse(&slice, "Beauty.txt (slice)", None).expect("the shipped file parses");
    let split = data::split(&dataset, data::MAX_LEN).expect("every user has at least 3 items");
    (dataset, split)
}
