//! One JSON line per training run (under `bench/results/models/`): model,
//! implementation (`"impl": "rust"`; the PyTorch twin's trainer,
//! `python_ref/models/train.py`, writes the same fields with `"pytorch"`),
//! data set, seed, metrics, epochs, wall time per epoch, peak memory,
//! machine, commit, date and the command, so every number in the README can
//! be traced. Records written before `impl` and `peak_rss_mb` existed lack
//! them (and are Rust's).

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::train::TrainReport;

/// What a record is made of.
pub struct RunRecord<'a> {
    /// Model name.
    pub model: &'a str,
    /// Data file.
    pub dataset: &'a str,
    /// The run's seed.
    pub seed: u64,
    /// What training produced.
    pub report: &'a TrainReport,
    /// Free text (e.g. the machine's load while it ran).
    pub note: &'a str,
    /// The command line.
    pub command: &'a str,
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl RunRecord<'_> {
    /// The record as one line of JSON.
    pub fn to_json(&self) -> String {
        let r = self.report;
        // Partial epochs (a time budget, a step cap) are scaled to a full one by their step count.
        let ran: Vec<_> = r.epochs.iter().filter(|e| e.steps > 0).collect();
        let per_epoch = |seconds: &dyn Fn(&crate::train::EpochLog) -> Option<f64>| -> Option<f64> {
            let (total, steps) = ran
                .iter()
                .try_fold((0.0, 0usize), |(t, n), e| Some((t + seconds(e)?, n + e.steps)))?;
            (steps > 0).then(|| total / steps as f64 * r.steps_per_epoch as f64)
        };
        let wall = per_epoch(&|e| Some(e.train_seconds));
        let cpu = per_epoch(&|e| e.train_cpu_seconds);
        let sequences: f64 = ran.iter().map(|e| e.sequences_per_second * e.train_seconds).sum();
        let seconds: f64 = ran.iter().map(|e| e.train_seconds).sum();
        let number = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.1}"));
        let losses: Vec<String> = r.epochs.iter().map(|e| format!("{:.5}", e.loss)).collect();
        let steps: Vec<String> = r.epochs.iter().map(|e| e.steps.to_string()).collect();
        format!(
            "{{\"model\":{},\"impl\":\"rust\",\"dataset\":{},\"seed\":{},\"valid\":{},\"test\":{},\"epochs\":{},\"best_epoch\":{},\
             \"stopped_by\":{},\"epoch_losses\":[{}],\"epoch_steps\":[{}],\"steps_per_epoch\":{},\
             \"wall_s_per_epoch\":{},\"cpu_s_per_epoch\":{},\"sequences_per_s\":{:.1},\"peak_rss_mb\":{},\"machine\":{{\"cpu\":{},\"threads\":{}}},\"commit\":{},\"date\":{},\
             \"note\":{},\"command\":{}}}",
            json_string(self.model),
            json_string(self.dataset),
            self.seed,
            r.best_valid.to_json(),
            r.test.to_json(),
            r.epochs_total,
            r.best_epoch,
            json_string(&r.stopped_by),
            losses.join(","),
            steps.join(","),
            r.steps_per_epoch,
            number(wall),
            number(cpu),
            if seconds > 0.0 { sequences / seconds } else { 0.0 },
            number(peak_rss_mb()),
            json_string(&cpu_model()),
            candle_core::utils::get_num_threads(),
            json_string(&commit()),
            json_string(&utc_now()),
            json_string(self.note),
            json_string(self.command),
        )
    }
}

/// Appends `record` as one line to `path` (creating the file and its folder).
pub fn append(path: &Path, record: &RunRecord) -> Result<()> {
    append_line(path, &record.to_json())
}

/// Appends one line of text to `path` (creating the file and its folder).
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    writeln!(file, "{line}").map_err(io)
}

/// The process's peak resident memory in MB (Linux `VmHWM`; `None` elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The processor's model name (Linux `/proc/cpuinfo`; "unknown" elsewhere).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The commit checked out where the process runs ("unknown" outside git).
pub fn commit() -> String {
    let out = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".into(),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` from the system clock (Howard Hinnant's civil-from-days).
pub fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_json_strings() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn date_is_plausible() {
        let d = utc_now();
        assert_eq!(d.len(), 20);
        assert!(d.starts_with("20"), "{d}");
    }
}
