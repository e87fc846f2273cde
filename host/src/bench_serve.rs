//! `apb bench serve`: a load generator against a running `apb serve` (in the spirit of `vllm
//! bench serve`): N streaming completions at a fixed concurrency (all at once, or arriving at a
//! request rate as a Poisson process), prompts of a given token count
//! (`ignore_eos`, a fixed output length); time to first token, time per output token and
//! end-to-end latency (p50 / p90 / p99), request and output-token throughput.
//!
//! Prompts are random words that are one token each in byte-level BPE vocabularies (SmolLM2,
//! Llama-3, Qwen-2.5), so a prompt of P words is P tokens; the server's `usage` reports the exact
//! count, which the results carry. Plain HTTP/1.1 over TCP, one thread per concurrent client.

use crate::error::{bail, err, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Common words, one token each (with their leading space) in byte-level BPE vocabularies.
const WORDS: &[&str] = &[
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " with", " was",
    " on", " be", " at", " by", " this", " had", " not", " are", " but", " from", " or", " have",
    " an", " they", " which", " one", " you", " were", " her", " all", " she", " there", " would",
    " their", " we", " him", " been", " has", " when", " who", " will", " more", " no", " if",
    " out", " so", " said", " what", " up", " its", " about", " into", " than", " them", " can",
    " only", " other", " new", " some", " could", " time", " these", " two", " may", " then",
    " do", " first", " any", " my", " now", " such", " like", " our", " over", " man", " me",
];

/// The load to send.
#[derive(Debug, Clone)]
pub struct Load {
    /// `http://host:port` of the server.
    pub url: String,
    /// Requests in all.
    pub num_prompts: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Requests a second, arriving as a Poisson process (seeded by `seed`); None: all at once
    /// (each client sends its next request when its last one ends).
    pub request_rate: Option<f64>,
    /// Prompt tokens per request.
    pub input_len: usize,
    /// Output tokens per request (`ignore_eos`).
    pub output_len: usize,
    /// Prompt seed (the same seed, the same prompts).
    pub seed: u64,
    /// Appended to every prompt after a blank line (APB and Star servers take the last
    /// paragraph as the question).
    pub question: Option<String>,
    /// `Authorization: Bearer` key, if the server wants one.
    pub api_key: Option<String>,
}

/// One request's timings.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Time to the first text chunk (s).
    pub ttft_s: f64,
    /// End to end (s).
    pub e2e_s: f64,
    /// The longest wait between two text chunks after the first (s): a stream's worst stall,
    /// e.g. behind another request's prefill.
    pub max_gap_s: f64,
    /// Tokens generated (`usage`).
    pub output_tokens: usize,
    /// Prompt tokens (`usage`).
    pub prompt_tokens: usize,
    /// Ranks it ran on and the method (the `apb` object).
    pub ranks: usize,
    /// The rank it started on (`apb.first_rank`: not 0 for a short request spread to another).
    pub first_rank: usize,
    /// What ran (`apb.method`).
    pub method: String,
}

/// p50 / p90 / p99 of one measure.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests completed.
    pub completed: usize,
    /// Wall time of the whole run (s).
    pub duration_s: f64,
    /// Requests per second.
    pub request_throughput: f64,
    /// Generated tokens per second, over all requests.
    pub output_throughput: f64,
    /// Time to first token (s).
    pub ttft_s: Percentiles,
    /// Time per output token after the first (s).
    pub tpot_s: Percentiles,
    /// Each request's longest wait between two tokens (s).
    pub max_gap_s: Percentiles,
    /// End-to-end latency (s).
    pub e2e_s: Percentiles,
    /// Each request, in order sent.
    pub samples: Vec<Sample>,
}

/// A prompt of `n` one-token words.
fn prompt(n: usize, seed: u64) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            WORDS[(x >> 33) as usize % WORDS.len()]
        })
        .collect::<String>()
        .trim_start()
        .to_string()
}

/// When each request is sent (s after the start) for `rate` requests a second arriving as a
/// Poisson process: exponential gaps of mean 1 / rate, from a seeded generator.
fn arrivals(n: usize, rate: f64, seed: u64) -> Vec<f64> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Uniform in (0, 1] from the top 53 bits.
            let u = ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            t += -u.ln() / rate;
            t
        })
        .collect()
}

/// Sends one streaming completion and times it.
fn one(load: &Load, addr: &str, i: usize) -> Result<Sample> {
    let mut text = prompt(load.input_len, load.seed.wrapping_add(i as u64));
    if let Some(q) = &load.question {
        text = format!("{text}\n\n{q}");
    }
    let body = json!({
        "prompt": text,
        "max_tokens": load.output_len,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let t0 = Instant::now();
    let mut c = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    c.set_read_timeout(Some(Duration::from_secs(3600)))?;
    let auth = load
        .api_key
        .as_ref()
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(c);
    let mut status = String::new();
    r.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut r, &mut rest);
        bail!("request {i}: {} {}", status.trim(), rest.trim());
    }
    let (mut ttft, mut usage, mut apb) = (None, Value::Null, Value::Null);
    let (mut last, mut max_gap) = (None::<f64>, 0f64);
    for line in r.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).context("a malformed event")?;
        if let Some(e) = v.get("error") {
            bail!("request {i}: {e}");
        }
        if v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            let now = t0.elapsed().as_secs_f64();
            ttft.get_or_insert(now);
            if let Some(l) = last {
                max_gap = max_gap.max(now - l);
            }
            last = Some(now);
        }
        if v.get("apb").is_some() {
            apb = v["apb"].clone();
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    let e2e = t0.elapsed().as_secs_f64();
    Ok(Sample {
        ttft_s: ttft.unwrap_or(e2e),
        e2e_s: e2e,
        max_gap_s: max_gap,
        output_tokens: usage["completion_tokens"].as_u64().unwrap_or(0) as usize,
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0) as usize,
        ranks: apb["ranks"].as_u64().unwrap_or(0) as usize,
        first_rank: apb["first_rank"].as_u64().unwrap_or(0) as usize,
        method: apb["method"].as_str().unwrap_or("").to_string(),
    })
}

/// Runs the load against the server and measures it.
pub fn run(load: &Load) -> Result<Report> {
    if load.num_prompts == 0 || load.concurrency == 0 || load.input_len == 0 || load.output_len == 0
    {
        bail!("--num-prompts, --concurrency, --input-len and --output-len must be at least 1");
    }
    if let Some(r) = load.request_rate {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--request-rate {r}: give requests a second above 0 (leave it out to send all at once)");
        }
    }
    let at = load
        .request_rate
        .map(|r| arrivals(load.num_prompts, r, load.seed));
    let addr = load
        .url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .ok_or_else(|| err!("--url must be http://HOST:PORT, got {}", load.url))?
        .to_string();
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(vec![None; load.num_prompts]);
    let first_error = Mutex::new(None);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..load.concurrency.min(load.num_prompts) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= load.num_prompts {
                    break;
                }
                if let Some(at) = &at {
                    let due = t0 + Duration::from_secs_f64(at[i]);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                match one(load, &addr, i) {
                    Ok(x) => samples.lock().expect("samples")[i] = Some(x),
                    Err(e) => {
                        first_error.lock().expect("error").get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("error") {
        return Err(e);
    }
    let duration = t0.elapsed().as_secs_f64();
    let samples: Vec<Sample> = samples
        .into_inner()
        .expect("samples")
        .into_iter()
        .flatten()
        .collect();
    let tokens: usize = samples.iter().map(|s| s.output_tokens).sum();
    let tpot = samples
        .iter()
        .map(|s| (s.e2e_s - s.ttft_s) / (s.output_tokens.max(2) - 1) as f64)
        .collect();
    Ok(Report {
        completed: samples.len(),
        duration_s: duration,
        request_throughput: samples.len() as f64 / duration,
        output_throughput: tokens as f64 / duration,
        ttft_s: Percentiles::of(samples.iter().map(|s| s.ttft_s).collect()),
        tpot_s: Percentiles::of(tpot),
        max_gap_s: Percentiles::of(samples.iter().map(|s| s.max_gap_s).collect()),
        e2e_s: Percentiles::of(samples.iter().map(|s| s.e2e_s).collect()),
        samples,
    })
}

impl Report {
    /// A table for the console.
    pub fn table(&self) -> String {
        let row = |name: &str, p: &Percentiles, scale: f64, unit: &str| {
            format!(
                "{name:<22} {:>10.1} {:>10.1} {:>10.1} {:>10.1}  {unit}\n",
                p.mean * scale,
                p.p50 * scale,
                p.p90 * scale,
                p.p99 * scale
            )
        };
        let mut ranks: Vec<String> = self
            .samples
            .iter()
            .map(|s| match s.ranks {
                1 => format!("{} on rank {}", s.method, s.first_rank),
                n => format!("{} on {n} ranks", s.method),
            })
            .collect();
        ranks.sort();
        ranks.dedup();
        format!(
            "completed {} requests in {:.2} s: {:.3} req/s, {:.1} output tokens/s; ran as {}\n{:<22} {:>10} {:>10} {:>10} {:>10}\n{}{}{}{}",
            self.completed,
            self.duration_s,
            self.request_throughput,
            self.output_throughput,
            ranks.join(", "),
            "",
            "mean",
            "p50",
            "p90",
            "p99",
            row("time to first token", &self.ttft_s, 1e3, "ms"),
            row("time per output token", &self.tpot_s, 1e3, "ms"),
            row("longest token gap", &self.max_gap_s, 1e3, "ms"),
            row("end to end", &self.e2e_s, 1e3, "ms"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_have_the_asked_words_and_percentiles_order() {
        let p = prompt(100, 3);
        assert_eq!(p.split(' ').count(), 100);
        assert_eq!(p, prompt(100, 3));
        assert_ne!(p, prompt(100, 4));
        let q = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((q.p50, q.p90, q.p99), (51.0, 90.0, 99.0));
    }

    #[test]
    fn arrivals_are_a_seeded_poisson_process_of_the_asked_rate() {
        let a = arrivals(4000, 8.0, 1);
        assert_eq!(a, arrivals(4000, 8.0, 1));
        assert_ne!(a, arrivals(4000, 8.0, 2));
        assert!(a.windows(2).all(|w| w[1] > w[0]) && a[0] > 0.0);
        // 4000 arrivals at 8 a second: ~500 s (the mean gap's standard error is 1.6 %), and
        // exponential gaps: their standard deviation equals their mean.
        let gaps: Vec<f64> = std::iter::once(a[0])
            .chain(a.windows(2).map(|w| w[1] - w[0]))
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
        assert!((mean - 0.125).abs() < 0.125 * 0.06, "mean gap {mean}");
        assert!((sd / mean - 1.0).abs() < 0.1, "sd / mean {}", sd / mean);
    }
}
