//! The streaming protocol of XSMoE (arXiv 2508.05993) on MovieLens ratings
//! (see [`crate::movielens`]): the ratings in global time order cut into
//! windows; train on window t, test on window t + 1.
//!
//! Following the public reference implementation
//! (qykcq/Efficient-Multimodal-Streaming-Recommendation-via-Expandable-Side-Mixture-of-Experts,
//! `utils/preprocess.py`), with the choices it leaves open written here:
//! - Order: ascending timestamp, ties in file order (the file is sorted by
//!   user, then movie). Windows hold equal counts of ratings, the first
//!   `len % count` one more (NumPy's `array_split`).
//! - In each window, users with fewer than `min_user_ratings` ratings there
//!   are dropped (the reference's per-window "k-core", a filter on users only).
//! - Item ids are dense and 1-based in order of first appearance in the
//!   filtered stream (0 is padding), so the items known by the end of window
//!   t are exactly `1..=known_items[t]`.
//! - Window t's ratings in time order: the first `floor((1 - valid) n)` train,
//!   the rest validate; window t + 1 tests.
//! - Training sequences, as the reference's: per user, the user's items in
//!   the training part, the last `max_len + 1` of them, users with at least 2;
//!   every item predicts the next.
//! - Ranking cases (one per user with at least 2 items in the validation part,
//!   or in the test window): the target is the user's last item there; the
//!   history is everything the user rated before it in the filtered stream,
//!   all windows, so the model's input is the user's latest `max_len` items
//!   (possibly from earlier windows; the reference restarts each part's
//!   sequence) and every item the user had is excluded from the ranking, as
//!   the reference excludes its history.
//! - The catalog of window t's split is every item known by the end of the
//!   test window (`known_items[t + 1]`), so a test target is always a
//!   candidate; popularity counts come from the training part only.

use std::collections::HashMap;

use crate::data::{RankingCase, TrainSequence};
use crate::error::{invalid, Result};
use crate::movielens::{Movie, Rating};

/// One interaction of the stream, with the dense item id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// MovieLens `userId`.
    pub user: u32,
    /// Dense item id, `1..`.
    pub item: u32,
}

/// The ratings cut into time windows, filtered and re-indexed.
#[derive(Clone, Debug)]
pub struct Stream {
    /// Each window's events in time order.
    pub windows: Vec<Vec<Event>>,
    /// `movie_of_item[i]` is item i's `movieId` (`[0]` is padding, 0).
    pub movie_of_item: Vec<u32>,
    /// `known_items[t]`: the items seen by the end of window t are `1..=known_items[t]`.
    pub known_items: Vec<u32>,
}

impl Stream {
    /// Cuts `ratings` into `count` windows of equal size in time order and drops,
    /// per window, the users with fewer than `min_user_ratings` ratings there.
    pub fn new(ratings: &[Rating], count: usize, min_user_ratings: usize) -> Result<Self> {
        if count < 2 || count > ratings.len() {
            return Err(invalid(
                "windows",
                format!(
                    "2..={} (one test window after a training one, no empty window)",
                    ratings.len()
                ),
                count,
            ));
        }
        let mut order: Vec<usize> = (0..ratings.len()).collect();
        order.sort_by_key(|&i| ratings[i].timestamp);
        let (base, extra) = (ratings.len() / count, ratings.len() % count);
        let mut item_of_movie: HashMap<u32, u32> = HashMap::new();
        let mut movie_of_item = vec![0u32];
        let (mut windows, mut known_items) = (Vec::with_capacity(count), Vec::with_capacity(count));
        let mut start = 0;
        for w in 0..count {
            let end = start + base + usize::from(w < extra);
            let window = &order[start..end];
            start = end;
            let mut per_user: HashMap<u32, usize> = HashMap::new();
            for &i in window {
                *per_user.entry(ratings[i].user).or_default() += 1;
            }
            let events: Vec<Event> = window
                .iter()
                .map(|&i| ratings[i])
                .filter(|r| per_user[&r.user] >= min_user_ratings)
                .map(|r| {
                    let item = *item_of_movie.entry(r.movie).or_insert_with(|| {
                        movie_of_item.push(r.movie);
                        (movie_of_item.len() - 1) as u32
                    });
                    Event { user: r.user, item }
                })
                .collect();
            windows.push(events);
            known_items.push((movie_of_item.len() - 1) as u32);
        }
        if let Some(w) = windows.iter().position(Vec::is_empty) {
            return Err(invalid(
                "min_user_ratings",
                format!("a filter that leaves window {w} some ratings"),
                min_user_ratings,
            ));
        }
        Ok(Self {
            windows,
            movie_of_item,
            known_items,
        })
    }

    /// The split of window `t` (train and validation) with window `t + 1` as test.
    pub fn split(&self, t: usize, valid_fraction: f64, max_len: usize) -> Result<WindowSplit> {
        if t + 1 >= self.windows.len() {
            return Err(invalid("window", format!("0..{}", self.windows.len() - 1), t));
        }
        if !(valid_fraction > 0.0 && valid_fraction < 1.0) {
            return Err(invalid("valid_fraction", "a fraction in (0, 1)", valid_fraction));
        }
        if max_len == 0 {
            return Err(invalid("max_len", "at least 1", 0));
        }
        let window = &self.windows[t];
        let cut = ((1.0 - valid_fraction) * window.len() as f64) as usize;
        let (train_part, valid_part) = window.split_at(cut);
        // Everything each user had before the current part.
        let mut history: HashMap<u32, Vec<u32>> = HashMap::new();
        for e in self.windows[..t].iter().flatten() {
            history.entry(e.user).or_default().push(e.item);
        }
        let num_items = self.known_items[t + 1];
        let mut popularity = vec![0u32; num_items as usize + 1];
        let mut train = Vec::new();
        for (_, items) in by_user(train_part) {
            for &i in &items {
                popularity[i as usize] += 1;
            }
            if items.len() >= 2 {
                let tail = &items[items.len().saturating_sub(max_len + 1)..];
                train.push(TrainSequence {
                    inputs: tail[..tail.len() - 1].to_vec(),
                    targets: tail[1..].to_vec(),
                });
            }
        }
        for e in train_part {
            history.entry(e.user).or_default().push(e.item);
        }
        let valid = ranking_cases(valid_part, &history);
        for e in valid_part {
            history.entry(e.user).or_default().push(e.item);
        }
        let test = ranking_cases(&self.windows[t + 1], &history);
        Ok(WindowSplit {
            num_items,
            max_len,
            train,
            valid,
            test,
            popularity,
        })
    }
}

/// Each user's items in event order, users in order of first event.
fn by_user(events: &[Event]) -> Vec<(u32, Vec<u32>)> {
    let mut slot: HashMap<u32, usize> = HashMap::new();
    let mut lists: Vec<(u32, Vec<u32>)> = Vec::new();
    for e in events {
        let s = *slot.entry(e.user).or_insert_with(|| {
            lists.push((e.user, Vec::new()));
            lists.len() - 1
        });
        lists[s].1.push(e.item);
    }
    lists
}

/// One case per user with at least 2 events in `part`: the last is the target,
/// the history is all the user had before it.
fn ranking_cases(part: &[Event], before: &HashMap<u32, Vec<u32>>) -> Vec<RankingCase> {
    by_user(part)
        .into_iter()
        .filter(|(_, items)| items.len() >= 2)
        .map(|(user, items)| {
            let (target, earlier) = items.split_last().expect("at least 2 items");
            let mut history = before.get(&user).cloned().unwrap_or_default();
            history.extend_from_slice(earlier);
            RankingCase {
                history,
                target: *target,
            }
        })
        .collect()
}

/// Window t's training data, validation and test cases.
#[derive(Clone, Debug)]
pub struct WindowSplit {
    /// Catalog size: the items known by the end of the test window.
    pub num_items: u32,
    /// Longest input sequence.
    pub max_len: usize,
    /// From the first `1 - valid_fraction` of window t.
    pub train: Vec<TrainSequence>,
    /// From the rest of window t.
    pub valid: Vec<RankingCase>,
    /// From window t + 1.
    pub test: Vec<RankingCase>,
    /// `[num_items + 1]` ratings per item in the training part (for `-log p(item)`).
    pub popularity: Vec<u32>,
}

/// Content features of a stream's items, for the frozen item encoder:
/// `[V+1, width]` row-major f32 (row 0, padding, is zero). Columns: one per
/// genre (multi-hot, the genres sorted by name), the release year scaled to
/// `[0, 1]` over the data's range, a missing-year flag, then the title's
/// lowercase alphanumeric tokens hashed (FNV-1a) into `title_buckets`
/// counts, L2-normalised.
#[derive(Clone, Debug)]
pub struct ItemContent {
    /// The features, row-major.
    pub features: Vec<f32>,
    /// Columns per item.
    pub width: usize,
    /// The genre of each leading column.
    pub genres: Vec<String>,
}

impl ItemContent {
    /// The features of `stream`'s items from `movies`.
    pub fn new(stream: &Stream, movies: &HashMap<u32, Movie>, title_buckets: usize) -> Result<Self> {
        let items: Vec<&Movie> = stream.movie_of_item[1..]
            .iter()
            .map(|m| {
                movies
                    .get(m)
                    .ok_or_else(|| invalid("movies", "every streamed movie", format!("no movieId {m}")))
            })
            .collect::<Result<_>>()?;
        let mut genres: Vec<String> = items.iter().flat_map(|m| m.genres.iter().cloned()).collect();
        genres.sort();
        genres.dedup();
        let years = items.iter().filter_map(|m| m.year);
        let (first, last) = (years.clone().min().unwrap_or(0), years.max().unwrap_or(0));
        let width = genres.len() + 2 + title_buckets;
        let mut features = vec![0f32; (items.len() + 1) * width];
        for (row, movie) in features.chunks_mut(width).skip(1).zip(&items) {
            for g in &movie.genres {
                let column = genres.binary_search(g).expect("every genre is in the vocabulary");
                row[column] = 1.0;
            }
            match movie.year {
                Some(y) => row[genres.len()] = (y - first) as f32 / (last - first).max(1) as f32,
                None => row[genres.len() + 1] = 1.0,
            }
            if title_buckets > 0 {
                let title = &mut row[genres.len() + 2..];
                for token in movie
                    .title
                    .to_lowercase()
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|t| !t.is_empty())
                {
                    title[(fnv1a(token) % title_buckets as u64) as usize] += 1.0;
                }
                let norm = title.iter().map(|v| v * v).sum::<f32>().sqrt();
                if norm > 0.0 {
                    title.iter_mut().for_each(|v| *v /= norm);
                }
            }
        }
        Ok(Self {
            features,
            width,
            genres,
        })
    }
}

/// The 64-bit FNV-1a hash (stable across runs and platforms, unlike std's hasher).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratings(rows: &[(u32, u32, i64)]) -> Vec<Rating> {
        rows.iter()
            .map(|&(user, movie, timestamp)| Rating { user, movie, timestamp })
            .collect()
    }

    #[test]
    fn too_many_windows_is_an_error() {
        let e = Stream::new(&ratings(&[(1, 1, 0)]), 2, 1).unwrap_err().to_string();
        assert!(e.starts_with("windows: expected 2..=1"), "{e}");
    }

    #[test]
    fn windows_are_equal_in_time_order_filtered_and_reindexed() {
        // 7 ratings, 3 windows: sizes 3, 2, 2. User 9 rates once in window 0 and is dropped there.
        let r = ratings(&[
            (1, 50, 5),
            (9, 70, 1),
            (1, 60, 2),
            (2, 50, 9),
            (2, 80, 7),
            (2, 80, 30),
            (2, 60, 20),
        ]);
        let s = Stream::new(&r, 3, 2).unwrap();
        // Time order: (9,70,1) (1,60,2) (1,50,5) | (2,80,7) (2,50,9) | (2,60,20) (2,80,30).
        let w: Vec<Vec<(u32, u32)>> = s
            .windows
            .iter()
            .map(|w| w.iter().map(|e| (e.user, e.item)).collect())
            .collect();
        assert_eq!(
            w,
            vec![vec![(1, 1), (1, 2)], vec![(2, 3), (2, 2)], vec![(2, 1), (2, 3)]]
        );
        // A filter that empties a window is an error naming it.
        let e = Stream::new(&r, 3, 3).unwrap_err().to_string();
        assert!(e.contains("window 0"), "{e}");
        assert_eq!(s.movie_of_item, vec![0, 60, 50, 80]);
        assert_eq!(s.known_items, vec![2, 3, 3]);
    }

    #[test]
    fn split_trains_validates_and_tests_with_whole_histories() {
        // Window 0: user 1 rates items a b c d, user 2 rates a b; window 1: user 1 rates e f.
        let r = ratings(&[
            (1, 10, 1),
            (2, 10, 2),
            (1, 20, 3),
            (2, 20, 4),
            (1, 30, 5),
            (1, 40, 6),
            (1, 50, 7),
            (1, 60, 8),
            (1, 70, 9),
            (1, 80, 10),
            (1, 90, 11),
            (1, 95, 12),
        ]);
        let s = Stream::new(&r, 2, 2).unwrap();
        assert_eq!(s.windows[0].len(), 6);
        let split = s.split(0, 0.34, 2).unwrap();
        // 6 events, valid 0.34: the first 3 train (1:a, 2:a, 1:b), the last 3 validate (2:b, 1:c, 1:d).
        assert_eq!(
            split.train,
            vec![TrainSequence {
                inputs: vec![1],
                targets: vec![2]
            }]
        );
        assert_eq!(split.popularity[..3], [0, 2, 1]);
        assert_eq!(
            split.valid,
            vec![RankingCase {
                history: vec![1, 2, 3],
                target: 4
            }]
        );
        assert_eq!(split.test.len(), 1);
        assert_eq!(split.test[0].history, vec![1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(split.test[0].target, 10);
        assert_eq!(split.num_items, 10);
        assert!(s.split(1, 0.15, 10).is_err());
        assert!(s.split(0, 1.0, 10).is_err());
    }

    #[test]
    fn item_content_has_genres_year_and_hashed_title() {
        let r = ratings(&[(1, 7, 1), (1, 8, 2)]);
        let s = Stream::new(&r, 2, 1).unwrap();
        let movie = |movie, title: &str, year, genres: &[&str]| Movie {
            movie,
            title: title.into(),
            year,
            genres: genres.iter().map(|g| g.to_string()).collect(),
        };
        let movies = HashMap::from([
            (7, movie(7, "Heat", Some(1995), &["Crime", "Action"])),
            (8, movie(8, "Heat heat", None, &["Drama"])),
        ]);
        let c = ItemContent::new(&s, &movies, 4).unwrap();
        assert_eq!(c.genres, vec!["Action", "Crime", "Drama"]);
        assert_eq!(c.width, 3 + 2 + 4);
        let rows: Vec<&[f32]> = c.features.chunks(c.width).collect();
        assert!(rows[0].iter().all(|&v| v == 0.0));
        assert_eq!(rows[1][..5], [1.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(rows[2][..5], [0.0, 0.0, 1.0, 0.0, 1.0]);
        // "heat" twice hashes to one bucket; normalised it is 1 in both titles.
        let bucket = (fnv1a("heat") % 4) as usize;
        assert_eq!((rows[1][5 + bucket], rows[2][5 + bucket]), (1.0, 1.0));
        assert!(ItemContent::new(&s, &HashMap::new(), 4).is_err());
    }
}
