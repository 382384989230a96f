//! Trains a seed model on an interaction file and prints validation and test
//! HR/NDCG@10; `--help` lists the options.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use candle_core::Device;
use moerec_models::data::{self, MAX_LEN};
use moerec_models::device::{self, DeviceChoice};
use moerec_models::error::{Error, Result};
use moerec_models::fame::{Fame, FameConfig};
use moerec_models::fuxi::{FeedForward, Fuxi, FuxiConfig, TableScoring};
use moerec_models::movielens::load_movielens;
use moerec_models::record::{self, RunRecord};
use moerec_models::sasrec::{EncoderConfig, SasRec};
use moerec_models::scoring::Mixing;
use moerec_models::stream::{ItemContent, Stream};
use moerec_models::streaming::{self, StreamConfig};
use moerec_models::train::{train, TrainConfig};
use moerec_models::xsmoe::{Side, Xsmoe, XsmoeConfig};
use moerec_models::Recommender;

const HELP: &str = "\
train: trains a seed model and prints validation and test HR/NDCG@10

usage: train [options]
  --model fame|sasrec|fuxi|fuxi-mme   the model (default fame)
  --model xsmoe|xsmoe-fixed|xsmoe-backbone   XSMoE on a MovieLens stream (--data a
                           directory with ratings.csv and movies.csv): expandable
                           experts, a fixed set fine-tuned each window, or none
  --data PATH              interaction file (default data/Beauty.txt)
  --num-items N            declared catalog size (default: the largest id)
  --seed N                 initialisation, shuffling and dropout seed (default 42)
  --device auto|cpu|cuda   where to train (default auto: CUDA device 0 when this build
                           has the `cuda` feature and a usable GPU, else the CPU)
  --time-budget SECONDS    stop training after this long; 0 = no limit (default 180)
  --max-epochs N           (default 200)
  --patience N             epochs without a better validation NDCG@10 (default 10)
  --batch-size N           (default 256)
  --lr X                   AdamW learning rate (default 0.001)
  --dim N --heads N --blocks N --dropout X   SASRec shape (64, 2, 2, 0.2; XSMoE d = 128)
  --facets N --experts N   FAME's heads H and query experts per head N (4, 4)
  --mixing logits|probabilities   FAME's mixing of the heads (default logits)
  --tables N --experts N --top-k N --balance X   Fuxi-MME's item tables H, experts E,
                           experts per token and load-balance coefficient (4, 4, 2, 0.01)
  --scoring per-head|concatenated   Fuxi-MME's scoring of the tables (default per-head)
  --temperature X          FuXi scores are cosines / X (default 0.05)
  --windows N              XSMoE: time windows of the stream (default 10)
  --max-windows N          XSMoE: stop after N training windows (smoke runs)
  --experts N              XSMoE: experts per side layer at the start (1; xsmoe-fixed 4)
  --bottleneck N           XSMoE: experts' bottleneck width (default 64)
  --prune-below X          XSMoE: prune the least-utilised expert below this share (0.1)
  --max-steps-per-epoch N  cap every epoch (smoke runs)
  --checkpoint PATH        save after every epoch (refuses to replace an existing file)
  --resume                 continue from --checkpoint
  --overwrite              replace an existing --checkpoint
  --results PATH           append a JSON-lines record of the run
  --note TEXT              free text stored in the record (e.g. the machine's load)
  --quiet                  no progress bar
";

fn main() -> ExitCode {
    moerec_models::alloc::keep_freed_memory();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bad(name: &str, expected: &str, actual: &str) -> Error {
    Error::InvalidArgument {
        name: name.into(),
        expected: expected.into(),
        actual: actual.into(),
    }
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| bad(name, "a number", value))
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut model_name = "fame".to_string();
    let mut data_path = PathBuf::from("data/Beauty.txt");
    let mut num_items = None;
    let mut seed = 42u64;
    let mut budget = 180u64;
    let mut config = TrainConfig::default();
    let (mut dim, mut heads, mut blocks, mut dropout) = (None, 2usize, 2usize, 0.2f32);
    let (mut facets, mut experts, mut mixing) = (4usize, None, Mixing::Logits);
    let mut stream = StreamArgs::default();
    let (mut tables, mut top_k, mut balance, mut temperature) = (4usize, 2usize, 0.01f32, 0.05f32);
    let mut scoring = TableScoring::PerHead;
    let mut results = None;
    let mut note = String::new();
    let mut device_choice = DeviceChoice::Auto;
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| bad(&flag, "a value after it", "end of arguments"))
        };
        match flag.as_str() {
            "--help" | "-h" => {
                print!("{HELP}");
                return Ok(());
            }
            "--model" => model_name = value()?,
            "--data" => data_path = PathBuf::from(value()?),
            "--num-items" => num_items = Some(number(&flag, &value()?)?),
            "--seed" => seed = number(&flag, &value()?)?,
            "--device" => device_choice = value()?.parse()?,
            "--time-budget" => budget = number(&flag, &value()?)?,
            "--max-epochs" => config.max_epochs = number(&flag, &value()?)?,
            "--patience" => config.patience = number(&flag, &value()?)?,
            "--batch-size" => config.batch_size = number(&flag, &value()?)?,
            "--lr" => config.adam.lr = number(&flag, &value()?)?,
            "--dim" => dim = Some(number(&flag, &value()?)?),
            "--heads" => heads = number(&flag, &value()?)?,
            "--blocks" => blocks = number(&flag, &value()?)?,
            "--dropout" => dropout = number(&flag, &value()?)?,
            "--facets" => facets = number(&flag, &value()?)?,
            "--experts" => experts = Some(number(&flag, &value()?)?),
            "--windows" => stream.windows = number(&flag, &value()?)?,
            "--max-windows" => stream.max_windows = Some(number(&flag, &value()?)?),
            "--bottleneck" => stream.bottleneck = number(&flag, &value()?)?,
            "--prune-below" => stream.prune_below = number(&flag, &value()?)?,
            "--mixing" => {
                mixing = match value()?.as_str() {
                    "logits" => Mixing::Logits,
                    "probabilities" => Mixing::Probabilities,
                    other => return Err(bad("--mixing", "logits or probabilities", other)),
                }
            }
            "--tables" => tables = number(&flag, &value()?)?,
            "--top-k" => top_k = number(&flag, &value()?)?,
            "--balance" => balance = number(&flag, &value()?)?,
            "--temperature" => temperature = number(&flag, &value()?)?,
            "--scoring" => {
                scoring = match value()?.as_str() {
                    "per-head" => TableScoring::PerHead,
                    "concatenated" => TableScoring::Concatenated,
                    other => return Err(bad("--scoring", "per-head or concatenated", other)),
                }
            }
            "--max-steps-per-epoch" => config.max_steps_per_epoch = Some(number(&flag, &value()?)?),
            "--checkpoint" => config.checkpoint = Some(PathBuf::from(value()?)),
            "--resume" => config.resume = true,
            "--overwrite" => config.overwrite = true,
            "--results" => results = Some(PathBuf::from(value()?)),
            "--note" => note = value()?,
            "--quiet" => config.progress = false,
            other => return Err(bad("option", "one listed by --help", other)),
        }
    }
    config.seed = seed;
    config.time_budget = (budget > 0).then(|| Duration::from_secs(budget));
    if model_name.starts_with("xsmoe") {
        // XSMoE's stream trainer builds its tensors on the CPU (not checked on CUDA).
        if device_choice == DeviceChoice::Cuda {
            return Err(bad(
                "--device",
                "cpu or auto for XSMoE (its trainer runs on the CPU)",
                "cuda",
            ));
        }
        eprintln!("device: cpu (XSMoE trains on the CPU)");
        let side = match model_name.as_str() {
            "xsmoe" => Side::Expandable {
                experts: experts.unwrap_or(1),
            },
            "xsmoe-fixed" => Side::Fixed {
                experts: experts.unwrap_or(4),
            },
            "xsmoe-backbone" => Side::BackboneOnly,
            other => return Err(bad("--model", "xsmoe, xsmoe-fixed or xsmoe-backbone", other)),
        };
        let shape = (dim.unwrap_or(128), heads, blocks, dropout);
        return run_stream(
            &model_name,
            side,
            shape,
            &data_path,
            seed,
            config,
            stream,
            results,
            &note,
        );
    }
    let (dim, experts) = (dim.unwrap_or(64), experts.unwrap_or(4));
    let (device, picked) = device::select(device_choice)?;
    eprintln!("device: {picked}");
    let dataset = data::load(&data_path, num_items)?;
    let split = data::split(&dataset, MAX_LEN)?;
    let encoder = EncoderConfig {
        num_items: dataset.num_items,
        dim,
        heads,
        blocks,
        max_len: MAX_LEN,
        dropout,
    };
    let fuxi = FuxiConfig {
        encoder: encoder.clone(),
        temperature,
        ..FuxiConfig::fuxi_alpha(dataset.num_items)
    };
    let model: Box<dyn Recommender> = match model_name.as_str() {
        "sasrec" => Box::new(SasRec::new(encoder, seed, &device)?),
        "fame" => Box::new(Fame::new(
            FameConfig {
                encoder,
                facets,
                experts,
                mixing,
            },
            seed,
            &device,
        )?),
        "fuxi" => Box::new(Fuxi::new(fuxi, seed, &device)?),
        "fuxi-mme" => Box::new(Fuxi::new(
            FuxiConfig {
                tables,
                scoring,
                feed_forward: FeedForward::Experts {
                    experts,
                    k: top_k,
                    balance,
                },
                ..fuxi
            },
            seed,
            &device,
        )?),
        other => return Err(bad("--model", "fame, sasrec, fuxi or fuxi-mme", other)),
    };
    eprintln!(
        "{model_name} on {} ({} users, {} items, {} training sequences), {} parameters, {} thread(s)",
        data_path.display(),
        dataset.sequences.len(),
        dataset.num_items,
        split.train.len(),
        model.params().count(),
        candle_core::utils::get_num_threads(),
    );
    let report = train(model.as_ref(), &split, &config, &device)?;
    println!(
        "{model_name}: best epoch {} of {} ({})",
        report.best_epoch, report.epochs_total, report.stopped_by
    );
    println!(
        "validation  HR@10 {:.4}  NDCG@10 {:.4}",
        report.best_valid.hr10(),
        report.best_valid.ndcg10()
    );
    println!(
        "test        HR@10 {:.4}  NDCG@10 {:.4}",
        report.test.hr10(),
        report.test.ndcg10()
    );
    if let Some(path) = results {
        let record = RunRecord {
            model: &model_name,
            dataset: &data_path.display().to_string(),
            seed,
            report: &report,
            note: &note,
            command: &std::env::args().collect::<Vec<_>>().join(" "),
        };
        record::append(&path, &record)?;
        eprintln!("appended the run to {}", path.display());
    }
    Ok(())
}

/// The stream options of the XSMoE models.
struct StreamArgs {
    windows: usize,
    max_windows: Option<usize>,
    bottleneck: usize,
    prune_below: f64,
}

impl Default for StreamArgs {
    fn default() -> Self {
        Self {
            windows: 10,
            max_windows: None,
            bottleneck: 64,
            prune_below: 0.1,
        }
    }
}

/// Users with fewer ratings in a window are dropped there (the reference's filter).
const MIN_USER_RATINGS: usize = 5;
/// Hashed title-token columns of the item content.
const TITLE_BUCKETS: usize = 64;

/// XSMoE or a baseline over the MovieLens stream in `dir`: prints each
/// window's test metrics and the averages; appends one record.
#[allow(clippy::too_many_arguments)]
fn run_stream(
    name: &str,
    side: Side,
    (dim, heads, blocks, dropout): (usize, usize, usize, f32),
    dir: &std::path::Path,
    seed: u64,
    train_config: TrainConfig,
    args: StreamArgs,
    results: Option<PathBuf>,
    note: &str,
) -> Result<()> {
    let device = Device::Cpu;
    let data = load_movielens(dir)?;
    let stream = Stream::new(&data.ratings, args.windows, MIN_USER_RATINGS)?;
    let content = ItemContent::new(&stream, &data.movies, TITLE_BUCKETS)?;
    let mut config = XsmoeConfig::new(stream.movie_of_item.len() as u32 - 1);
    config.encoder.dim = dim;
    config.encoder.heads = heads;
    config.encoder.blocks = blocks;
    config.encoder.dropout = dropout;
    config.bottleneck = args.bottleneck;
    config.side = side;
    let mut model = Xsmoe::new(config, &content, seed, &device)?;
    eprintln!(
        "{name} on {} ({} ratings, {} windows, {} items, content width {}), {} thread(s)",
        dir.display(),
        data.ratings.len(),
        args.windows,
        stream.movie_of_item.len() - 1,
        content.width,
        candle_core::utils::get_num_threads(),
    );
    let stream_config = StreamConfig {
        valid_fraction: 0.15,
        prune_below: args.prune_below,
        train: train_config,
        max_windows: args.max_windows,
    };
    let logs = streaming::run(&mut model, &stream, &stream_config, &device, &mut |w| {
        println!(
            "window {} -> {}  experts {:?}  {} epochs (best {})  {:.1} s  test HR@10 {:.4}  NDCG@10 {:.4}  HR@20 {:.4}  NDCG@20 {:.4}{}",
            w.window,
            w.window + 1,
            w.experts,
            w.epochs.0,
            w.epochs.1,
            w.train_seconds,
            w.test.hr[1],
            w.test.ndcg[1],
            w.test.hr[2],
            w.test.ndcg[2],
            if w.pruned.iter().any(Option::is_some) {
                format!("  pruned {:?}", w.pruned)
            } else {
                String::new()
            }
        );
    })?;
    let (hr, ndcg) = streaming::average(&logs);
    println!(
        "{name}: mean over {} windows  HR@10 {:.4}  NDCG@10 {:.4}  HR@20 {:.4}  NDCG@20 {:.4}",
        logs.len(),
        hr[1],
        ndcg[1],
        hr[2],
        ndcg[2]
    );
    if let Some(path) = results {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let line = streaming::record_json(name, &dir.display().to_string(), seed, &logs, note, &command);
        record::append_line(&path, &line)?;
        eprintln!("appended the run to {}", path.display());
    }
    Ok(())
}
