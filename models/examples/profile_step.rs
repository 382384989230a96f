use candle_core::Device;
use moerec_models::batch::{RankBatch, TrainBatch};
use moerec_models::data;
use moerec_models::fame::{Fame, FameConfig};
use moerec_models::nn::Dropout;
use moerec_models::optim::{AdamW, AdamWConfig};
use moerec_models::rng::Rng;
use moerec_models::sasrec::{EncoderConfig, SasRec};
use moerec_models::scoring::{cross_entropy, top_n};
use moerec_models::Recommender;

fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or("sasrec".into());
    let d = data::load(std::path::Path::new("data/Beauty.txt"), None).unwrap();
    let split = data::split(&d, 50).unwrap();
    let dev = Device::Cpu;
    let model: Box<dyn Recommender> = if which == "sasrec" {
        Box::new(SasRec::new(EncoderConfig::sasrec(d.num_items), 1, &dev).unwrap())
    } else {
        Box::new(Fame::new(FameConfig::new(d.num_items), 1, &dev).unwrap())
    };
    let mut adam = AdamW::new(model.params(), AdamWConfig::default()).unwrap();
    let mut rng = Rng::new(1);
    let seqs: Vec<_> = split.train.iter().take(256).collect();
    let (mut tb, mut tq, mut tl, mut tg, mut ta) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for _ in 0..3 {
        let t = cpu();
        let batch = TrainBatch::new(&seqs, 50, &dev).unwrap();
        let t1 = cpu();
        let mut dropout = Dropout::new(0.2, &mut rng).unwrap();
        let q = model.query(&batch.batch, &batch.rows, &mut dropout).unwrap();
        let t2 = cpu();
        let loss = cross_entropy(&q, &batch.targets).unwrap();
        let t3 = cpu();
        let g = loss.backward().unwrap();
        let t4 = cpu();
        adam.step(model.params(), &g).unwrap();
        let t5 = cpu();
        tb += t1 - t;
        tq += t2 - t1;
        tl += t3 - t2;
        tg += t4 - t3;
        ta += t5 - t4;
        eprintln!("rows {}", batch.rows.dim(0).unwrap());
    }
    eprintln!(
        "per step cpu s: batch {:.3} query {:.3} loss {:.3} backward {:.3} adam {:.3}",
        tb / 3.0,
        tq / 3.0,
        tl / 3.0,
        tg / 3.0,
        ta / 3.0
    );
    let t = cpu();
    let cases = &split.valid[..256];
    let rb = RankBatch::new(cases, 50, &dev).unwrap();
    let q = model.query(&rb.batch, &rb.rows, &mut Dropout::off()).unwrap();
    let t1 = cpu();
    let ex: Vec<Vec<u32>> = cases.iter().map(|c| c.history.clone()).collect();
    let _ = top_n(&q, &ex, 20).unwrap();
    let t2 = cpu();
    eprintln!("eval batch: query {:.3} top_n {:.3}", t1 - t, t2 - t1);
}
