//! The streaming protocol on the shipped MovieLens files: 10 equal windows in
//! time order, and every window's split is usable for training and ranking.

use std::path::PathBuf;

use moerec_models::movielens::load_movielens;
use moerec_models::stream::{ItemContent, Stream};

#[test]
fn movielens_windows_and_splits() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/ml-latest-small");
    let data = load_movielens(&dir).expect("data/ml-latest-small ships with the repository");
    assert_eq!(data.ratings.len(), 100_836);
    assert_eq!(data.movies.len(), 9_742);
    let stream = Stream::new(&data.ratings, 10, 5).unwrap();
    assert_eq!(stream.windows.len(), 10);
    // Equal windows before the user filter: 10083 or 10084 ratings, so at most that after it.
    assert!(stream.windows.iter().all(|w| !w.is_empty() && w.len() <= 10_084));
    assert!(stream.known_items.windows(2).all(|k| k[0] <= k[1]));
    assert_eq!(
        *stream.known_items.last().unwrap() as usize + 1,
        stream.movie_of_item.len()
    );
    let content = ItemContent::new(&stream, &data.movies, 64).unwrap();
    assert_eq!(content.genres.len(), 19, "{:?}", content.genres);
    assert_eq!(content.features.len(), stream.movie_of_item.len() * content.width);
    for t in 0..9 {
        let split = stream.split(t, 0.15, 10).unwrap();
        assert!(
            !split.train.is_empty() && !split.valid.is_empty() && !split.test.is_empty(),
            "window {t}"
        );
        assert_eq!(split.popularity.len(), split.num_items as usize + 1);
        let trained: u32 = split.popularity.iter().sum();
        let cut = (0.85 * stream.windows[t].len() as f64) as u32;
        assert_eq!(trained, cut, "window {t}: every training rating counted once");
        for seq in &split.train {
            assert!(seq.inputs.len() <= 10 && seq.inputs.len() == seq.targets.len());
            assert_eq!(seq.inputs[1..], seq.targets[..seq.targets.len() - 1]);
        }
        for case in split.valid.iter().chain(&split.test) {
            assert!((1..=split.num_items).contains(&case.target));
            assert!(!case.history.is_empty());
        }
    }
}
