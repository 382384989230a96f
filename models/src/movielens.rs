//! The MovieLens `ml-latest-small` files (`ratings.csv`, `movies.csv`; shipped
//! in `data/ml-latest-small/` beside GroupLens' `README.txt`): ratings with
//! real timestamps, and each movie's title, release year and genres. Errors
//! name the file, the line and the value.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
