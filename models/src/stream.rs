//! The streaming protocol of XSMoE (arXiv 2508.05993) on MovieLens
//! (`ml-latest-small`: `ratings.csv`, `movies.csv`): the ratings in global
//! time order cut into windows; train on window t, test on window t + 1.
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
use std::path::Path;

use crate::data::{RankingCase, TrainSequence};
use crate::error::{invalid, Error, Result};

/// One rating: who, which movie, when (Unix seconds). The score is not used (implicit feedback).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rating {
    /// MovieLens `userId`.
    pub user: u32,
    /// MovieLens `movieId`.
    pub movie: u32,
    /// Unix seconds.
    pub timestamp: i64,
}

/// A movie's content: what the frozen item encoder may read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Movie {
    /// MovieLens `movieId`.
    pub movie: u32,
    /// The title without its release year.
    pub title: String,
    /// The release year in the title's trailing `(YYYY)`, if any.
    pub year: Option<u16>,
    /// The genres (`|`-separated in the file; none for `(no genres listed)`).
    pub genres: Vec<String>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn data_error(file: &str, line: usize, message: String) -> Error {
    Error::Data {
        file: file.to_string(),
        line,
        message,
    }
}

/// The lines after the expected header, numbered from 2 (CRLF endings accepted).
fn body<'t>(text: &'t str, file: &str, header: &str) -> Result<impl Iterator<Item = (usize, &'t str)>> {
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    match lines.next() {
        Some(first) if first == header => {}
        other => {
            return Err(data_error(
                file,
                1,
                format!("expected the header {header:?}, got {:?}", other.unwrap_or("")),
            ))
        }
    }
    Ok(lines.enumerate().map(|(i, l)| (i + 2, l)))
}

/// Parses `ratings.csv` (`userId,movieId,rating,timestamp`); `file` names it in errors.
pub fn parse_ratings(text: &str, file: &str) -> Result<Vec<Rating>> {
    let mut ratings = Vec::new();
    for (line, row) in body(text, file, "userId,movieId,rating,timestamp")? {
        let fields: Vec<&str> = row.split(',').collect();
        let [user, movie, _rating, timestamp] = fields[..] else {
            return Err(data_error(
                file,
                line,
                format!("expected 4 fields, got {}: {row:?}", fields.len()),
            ));
        };
        let number = |name: &str, value: &str| -> Result<u64> {
            value
                .parse()
                .map_err(|_| data_error(file, line, format!("malformed {name} {value:?}: expected an integer")))
        };
        let id = |name: &str, value: &str| -> Result<u32> {
            u32::try_from(number(name, value)?)
                .map_err(|_| data_error(file, line, format!("{name} {value} is beyond 4294967295")))
        };
        ratings.push(Rating {
            user: id("userId", user)?,
            movie: id("movieId", movie)?,
            timestamp: i64::try_from(number("timestamp", timestamp)?)
                .map_err(|_| data_error(file, line, format!("timestamp {timestamp} is out of range")))?,
        });
    }
    if ratings.is_empty() {
        return Err(data_error(file, 0, "no ratings".into()));
    }
    Ok(ratings)
}

/// Splits one CSV row into fields: quoted fields may hold commas and `""`.
fn csv_fields(row: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = row.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut field)),
            (_, c) => field.push(c),
        }
    }
    (!quoted).then(|| {
        fields.push(field);
        fields
    })
}

/// Parses `movies.csv` (`movieId,title,genres`); `file` names it in errors.
pub fn parse_movies(text: &str, file: &str) -> Result<Vec<Movie>> {
    let mut movies = Vec::new();
    for (line, row) in body(text, file, "movieId,title,genres")? {
        let fields = csv_fields(row).ok_or_else(|| data_error(file, line, format!("unterminated quote: {row:?}")))?;
        let [movie, title, genres] = &fields[..] else {
            return Err(data_error(
                file,
                line,
                format!("expected 3 fields, got {}: {row:?}", fields.len()),
            ));
        };
        let movie: u32 = movie
            .parse()
            .map_err(|_| data_error(file, line, format!("malformed movieId {movie:?}: expected an integer")))?;
        let title = title.trim();
        // "Heat (1995)": the year is the trailing parenthesised 4 digits.
        let year = title
            .strip_suffix(')')
            .and_then(|t| t.rsplit_once('('))
            .and_then(|(rest, y)| Some((rest.trim_end(), y.parse::<u16>().ok().filter(|_| y.len() == 4)?)));
        let (title, year) = match year {
            Some((rest, y)) => (rest.to_string(), Some(y)),
            None => (title.to_string(), None),
        };
        let genres = match genres.as_str() {
            "(no genres listed)" => Vec::new(),
            g => g.split('|').map(str::to_string).collect(),
        };
        movies.push(Movie {
            movie,
            title,
            year,
            genres,
        });
    }
    Ok(movies)
}

/// The MovieLens files of one directory.
#[derive(Clone, Debug)]
pub struct MovieLens {
    /// In file order.
    pub ratings: Vec<Rating>,
    /// Content by `movieId`; every rated movie has one.
    pub movies: HashMap<u32, Movie>,
}

/// Reads `dir/ratings.csv` and `dir/movies.csv`; a rated movie missing from `movies.csv` is an error.
pub fn load_movielens(dir: &Path) -> Result<MovieLens> {
    let ratings_path = dir.join("ratings.csv");
    let movies_path = dir.join("movies.csv");
    let ratings = parse_ratings(&read(&ratings_path)?, &ratings_path.display().to_string())?;
    let movies: HashMap<u32, Movie> = parse_movies(&read(&movies_path)?, &movies_path.display().to_string())?
        .into_iter()
        .map(|m| (m.movie, m))
        .collect();
    if let Some((i, r)) = ratings.iter().enumerate().find(|(_, r)| !movies.contains_key(&r.movie)) {
        return Err(data_error(
            &ratings_path.display().to_string(),
            i + 2,
            format!("movieId {} is not in movies.csv", r.movie),
        ));
    }
    Ok(MovieLens { ratings, movies })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn ratings(rows: &[(u32, u32, i64)]) -> Vec<Rating> {
        rows.iter()
            .map(|&(user, movie, timestamp)| Rating { user, movie, timestamp })
            .collect()
    }

    #[test]
    fn parses_quoted_titles_years_and_genres() {
        let text = "movieId,title,genres\r\n1,Toy Story (1995),Adventure|Animation\r\n\
                    11,\"American President, The (1995)\",Comedy\r\n\
                    7789,\"11'09\"\"01 - September 11 (2002)\",Drama\r\n\
                    40697,Babylon 5,(no genres listed)\r\n";
        let movies = parse_movies(text, "movies.csv").unwrap();
        assert_eq!(movies[0].title, "Toy Story");
        assert_eq!(movies[0].year, Some(1995));
        assert_eq!(movies[0].genres, vec!["Adventure", "Animation"]);
        assert_eq!(movies[1].title, "American President, The");
        assert_eq!(movies[2].title, "11'09\"01 - September 11");
        assert_eq!(movies[2].year, Some(2002));
        assert_eq!((movies[3].year, movies[3].genres.len()), (None, 0));
    }

    #[test]
    fn bad_input_names_file_line_and_value() {
        let e = parse_ratings("userId,movieId,rating,timestamp\n1,2,4.0,x\n", "r.csv").unwrap_err();
        assert_eq!(e.to_string(), "r.csv:2: malformed timestamp \"x\": expected an integer");
        let e = parse_ratings("user,movie\n", "r.csv").unwrap_err().to_string();
        assert!(e.starts_with("r.csv:1: expected the header"), "{e}");
        let e = parse_ratings("userId,movieId,rating,timestamp\n", "r.csv").unwrap_err();
        assert_eq!(e.to_string(), "r.csv:0: no ratings");
        let e = parse_movies("movieId,title,genres\n1,\"open,Drama\n", "m.csv").unwrap_err();
        assert!(e.to_string().starts_with("m.csv:2: unterminated quote"), "{e}");
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
}
