//! `apb eval`: the RULER-style suite of [`crate::tasks`] through several methods, every method on
//! the same prompts, scored by each task's string match; a table per task and length, and the
//! average. Results go to a JSONL file one case at a time, so an interrupted run resumes.

use crate::error::{bail, err, Context, Result};
use crate::prompt;
use crate::ranks::Group;
use crate::runner::{GenParams, Job, Runner};
use crate::tasks::{self, Case};
use crate::JobSettings;
use apb_plugin::Method;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// One method of the comparison: a label, the method, its ranks and its rank program (whose
/// scorer decides APB's selection).
pub struct Arm {
    /// Column name (`apb-heads` for APB with trained heads).
    pub label: String,
    /// The method.
    pub method: Method,
    /// Ranks.
    pub world: usize,
    /// The rank program, with the scorer APB uses.
    pub runner: Runner,
}

/// One scored case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The arm's label.
    pub method: String,
    /// Task name.
    pub task: String,
    /// Target prompt length in tokens.
    pub length: usize,
    /// Case seed.
    pub seed: u64,
    /// Prompt tokens of the case.
    pub prompt_tokens: usize,
    /// String-match score in [0, 1].
    pub score: f64,
    /// The generated text.
    pub reply: String,
    /// The strings a correct reply contains.
    pub answers: Vec<String>,
    /// The settings the row was made with (model, heads, ranks, tokens): a resumed run must match.
    #[serde(default)]
    pub setup: String,
    /// What selected APB's passing KV (`None` for the other methods).
    #[serde(default)]
    pub scorer: Option<String>,
    /// Ranks the case ran on (a prompt too short for the arm's ranks falls back to fewer).
    #[serde(default)]
    pub ranks: usize,
}

/// What `apb eval` runs.
pub struct EvalConfig {
    /// Task names.
    pub tasks: Vec<String>,
    /// Target prompt lengths in tokens.
    pub lengths: Vec<usize>,
    /// Cases per task and length.
    pub cases: usize,
    /// First case seed.
    pub seed: u64,
    /// Tokens generated per case (greedy).
    pub max_new_tokens: usize,
    /// JSONL of rows: appended to, and read back to skip cases already scored.
    pub out: PathBuf,
    /// Model, heads, ranks and generation settings, stored in every row; rows made with other
    /// settings are refused on resume.
    pub setup: String,
}

/// The document text for a case of about `tokens` tokens: generated long, then cut at a sentence
/// boundary to fit (measured with the model's tokenizer).
fn case_for(
    tok: &apb_loaders::Tokenizer,
    task: &str,
    seed: u64,
    tokens: usize,
    prose: &[String],
) -> Result<Case> {
    let mut chars = tokens * 4;
    for _ in 0..4 {
        let c = tasks::generate(task, seed, chars, prose)?;
        let n = tok.encode_plain(&c.document)?.len();
        if n <= tokens || chars < 200 {
            return Ok(c);
        }
        chars = (chars as f64 * tokens as f64 / n as f64 * 0.97) as usize;
    }
    tasks::generate(task, seed, chars, prose)
}

/// Runs every case × arm not yet in `cfg.out`, then prints and returns the summary table.
pub fn run(arms: &[Arm], cfg: &EvalConfig) -> Result<String> {
    let tok = arms.first().context("no methods to evaluate")?.runner.tok();
    let prose = if cfg.tasks.iter().any(|t| t == "niah_prose") {
        tasks::prose_corpus()?
    } else {
        Vec::new()
    };
    for t in &cfg.tasks {
        if !tasks::TASKS.contains(&t.as_str()) {
            bail!("unknown task '{t}' (tasks: {})", tasks::TASKS.join(", "));
        }
    }
    let mut done: HashSet<(String, String, usize, u64)> = HashSet::new();
    let mut rows: Vec<Row> = Vec::new();
    if cfg.out.exists() {
        for (n, line) in std::fs::read_to_string(&cfg.out)?.lines().enumerate() {
            let r: Row = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a result row", cfg.out.display(), n + 1))?;
            if r.setup != cfg.setup {
                bail!(
                    "{}:{}: made with other settings ({}; now {}): use another --json",
                    cfg.out.display(),
                    n + 1,
                    r.setup,
                    cfg.setup
                );
            }
            done.insert((r.method.clone(), r.task.clone(), r.length, r.seed));
            rows.push(r);
        }
    }
    // Opened at the first row: a run that fails before it (bad model, no chat template) leaves no
    // empty file behind. Its folder is checked now, not after the first case's work.
    let folder = cfg.out.parent().filter(|p| !p.as_os_str().is_empty());
    if folder.is_some_and(|p| !p.is_dir()) {
        bail!("cannot write {}: no such folder", cfg.out.display());
    }
    let mut file: Option<std::fs::File> = None;
    let total = cfg.tasks.len() * cfg.lengths.len() * cfg.cases * arms.len();
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} runs {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("template"),
    );
    bar.set_position(done.len().min(total) as u64);
    let groups: Vec<Group> = arms
        .iter()
        .map(|a| Group::threads(a.runner.clone(), a.world))
        .collect::<Result<_>>()?;
    let params = GenParams {
        max_new_tokens: cfg.max_new_tokens,
        ..Default::default()
    };
    let never = AtomicBool::new(false);
    for &length in &cfg.lengths {
        // Case-major: an interrupted run has every task at the same number of cases.
        for i in 0..cfg.cases {
            for task in &cfg.tasks {
                let seed = cfg.seed.wrapping_add(i as u64);
                if arms
                    .iter()
                    .all(|a| done.contains(&(a.label.clone(), task.clone(), length, seed)))
                {
                    continue;
                }
                let case = case_for(tok, task, seed, length, &prose)?;
                let parts = prompt::build(tok, &case.document, Some(&case.question), true, false)?;
                for (arm, group) in arms.iter().zip(&groups) {
                    let key = (arm.label.clone(), task.clone(), length, seed);
                    if done.contains(&key) {
                        continue;
                    }
                    let job = Job {
                        settings: JobSettings::new(arm.method, arm.world),
                        prompt: parts.clone(),
                        params: params.clone(),
                    };
                    let g = group
                        .run(&job, &never, &mut |_| {})
                        .map_err(|e| err!("{} on {task} seed {seed}: {e}", arm.label))?;
                    let row = Row {
                        method: arm.label.clone(),
                        task: task.clone(),
                        length,
                        seed,
                        prompt_tokens: parts.len(),
                        score: case.score(&g.text),
                        reply: g.text,
                        answers: case.answers.clone(),
                        setup: cfg.setup.clone(),
                        scorer: g.scorer,
                        ranks: g.plan.world,
                    };
                    if g.plan.world < arm.world {
                        bar.println(format!(
                            "note: {} on {task} {length} seed {seed} ran on {} rank(s): {}",
                            arm.label,
                            g.plan.world,
                            g.plan.notes.join("; ")
                        ));
                    }
                    let f = match &mut file {
                        Some(f) => f,
                        None => file.insert(
                            std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(&cfg.out)
                                .with_context(|| format!("cannot write {}", cfg.out.display()))?,
                        ),
                    };
                    f.write_all(format!("{}\n", serde_json::to_string(&row)?).as_bytes())?;
                    f.flush()?;
                    bar.inc(1);
                    if bar.is_hidden() {
                        eprintln!(
                            "{} {task} {length} seed {seed}: {:.2}",
                            arm.label, row.score
                        );
                    }
                    done.insert(key);
                    rows.push(row);
                }
            }
        }
    }
    bar.finish();
    for g in groups {
        g.shutdown()?;
    }
    let labels: Vec<String> = arms.iter().map(|a| a.label.clone()).collect();
    // This run's cases only (a file may hold more seeds from an earlier, longer run).
    let seeds: HashSet<u64> = (0..cfg.cases as u64)
        .map(|i| cfg.seed.wrapping_add(i))
        .collect();
    rows.retain(|r| seeds.contains(&r.seed));
    Ok(table(&rows, &labels, &cfg.lengths, &cfg.tasks) + &legend(arms))
}

/// Which scorer each selecting column (APB, Spava) ran: without trained heads it is the method's
/// layout with our training-free selector, not the paper's method.
fn legend(arms: &[Arm]) -> String {
    let lines: Vec<String> = arms
        .iter()
        .filter(|a| a.method.selects())
        .map(|a| {
            format!(
                "- `{}`: {} on {} ranks with {}",
                a.label,
                a.method,
                a.world,
                a.runner.scorer.name()
            )
        })
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("\n{}\n", lines.join("\n"))
    }
}

/// Markdown: one row per task and length, one column per method (mean score in %, cases), and
/// the average over tasks per length.
pub fn table(rows: &[Row], methods: &[String], lengths: &[usize], tasks: &[String]) -> String {
    let mut acc: BTreeMap<(String, usize, String), (f64, usize)> = BTreeMap::new();
    for r in rows {
        let e = acc
            .entry((r.task.clone(), r.length, r.method.clone()))
            .or_default();
        e.0 += r.score;
        e.1 += 1;
    }
    let mut out = format!(
        "| task | length | {} |\n|---|---:|{}\n",
        methods.join(" | "),
        "---:|".repeat(methods.len())
    );
    for &l in lengths {
        let mut avg = vec![(0.0, 0usize); methods.len()];
        for t in tasks {
            let cells: Vec<String> = methods
                .iter()
                .enumerate()
                .map(|(i, m)| match acc.get(&(t.clone(), l, m.clone())) {
                    Some(&(s, n)) if n > 0 => {
                        avg[i].0 += s / n as f64;
                        avg[i].1 += 1;
                        format!("{:.1} ({n})", 100.0 * s / n as f64)
                    }
                    _ => "—".into(),
                })
                .collect();
            out += &format!("| {t} | {l} | {} |\n", cells.join(" | "));
        }
        let cells: Vec<String> = avg
            .iter()
            .map(|(s, n)| {
                if *n > 0 {
                    format!("**{:.1}**", 100.0 * s / *n as f64)
                } else {
                    "—".into()
                }
            })
            .collect();
        out += &format!("| **average** | {l} | {} |\n", cells.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_averages_tasks_per_method() {
        let row = |m: &str, t: &str, s: f64| Row {
            method: m.into(),
            task: t.into(),
            length: 4096,
            seed: 0,
            prompt_tokens: 4000,
            score: s,
            reply: String::new(),
            answers: vec![],
            setup: String::new(),
            scorer: None,
            ranks: 1,
        };
        let rows = vec![
            row("dense", "a", 1.0),
            row("dense", "a", 0.0),
            row("dense", "b", 1.0),
            row("apb", "a", 0.0),
            row("apb", "b", 0.5),
        ];
        let t = table(
            &rows,
            &["dense".into(), "apb".into()],
            &[4096],
            &["a".into(), "b".into()],
        );
        assert!(t.contains("| a | 4096 | 50.0 (2) | 0.0 (1) |"), "{t}");
        assert!(t.contains("| b | 4096 | 100.0 (1) | 50.0 (1) |"), "{t}");
        assert!(
            t.contains("| **average** | 4096 | **75.0** | **25.0** |"),
            "{t}"
        );
    }
}
