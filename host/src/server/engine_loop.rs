//! The engine thread: the loop that takes requests from the queue, places them within the KV
//! budget, prefills them and runs decode steps of the batch ([`crate::engine`]), and answers each
//! request as it finishes (metrics counted here). Also where the KV budget is sized.

use super::openai::ApiError;
use super::queue::{Ev, Pick, Queued, Running};
use super::state::{Ready, ServeConfig, Server, BODY_BYTES_PER_TOKEN, BODY_PERMITS, BODY_SLACK};
use crate::engine::{self};
use crate::engine::{Engine, KvBudget, Placed};
use crate::ranks::{Group, RunError};
use crate::runner::{Finish, Generation};
use axum::http::StatusCode;
use prometheus::IntGauge;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The engine loop: between decode steps of the running batch, prefills one waiting request
/// while there is room; when the queue closes and the batch is empty, stops the ranks.
pub(super) fn engine(s: &Arc<Server>, group: Group) -> crate::error::Result<()> {
    let loaded = group.runner().loaded.clone();
    let mut model_names = s.cfg.served_model_names.clone();
    if model_names.is_empty() {
        model_names.push(loaded.name.clone());
        model_names.extend(
            s.cfg
                .model_alias
                .iter()
                .filter(|a| **a != loaded.name)
                .cloned(),
        );
    }
    let ctx = loaded.model.cfg.context_len();
    let max_body = s.cfg.max_body_bytes.unwrap_or(
        ctx.saturating_mul(BODY_BYTES_PER_TOKEN)
            .saturating_add(BODY_SLACK),
    );
    let budget = match kv_budget(&s.cfg, &group) {
        Ok(b) => b,
        Err(why) => {
            let _ = group.shutdown();
            crate::error::bail!("{why}");
        }
    };
    let _ = s.ready.set(Ready {
        loaded,
        model_names,
        max_body,
        group: group.info(),
    });
    s.bodies.add_permits(BODY_PERMITS * max_body.div_ceil(1024));
    let info = group.info();
    eprintln!(
        "ready: {} with {} on {} rank{}{}",
        s.ready
            .get()
            .map(|r| r.model_names[0].as_str())
            .unwrap_or(""),
        s.cfg.settings.method.name(),
        group.world(),
        if group.world() == 1 { "" } else { "s" },
        if group.world() == 1 {
            String::new()
        } else {
            format!(
                " ({}, comm {}{})",
                info.rank_mode,
                info.comm,
                if group.spreads() {
                    "; short requests spread over the ranks"
                } else {
                    ""
                }
            )
        }
    );
    if let Some(b) = &budget {
        eprintln!(
            "KV budget: {:.2} GiB = {} positions{} ({} bytes a position)",
            (b.positions * b.bytes_per_position) as f64 / (1u64 << 30) as f64,
            b.positions,
            if b.shared {
                " shared by the ranks"
            } else {
                " per rank"
            },
            b.bytes_per_position
        );
    }
    let answer_now = s.clone();
    let mut eng: Engine<Running> = if s.cfg.max_num_seqs > 1 {
        Engine::batching(budget)
            .with_decode_gap(s.cfg.max_decode_gap)
            .on_done_inside_prefill(move |(r, g)| answer(&answer_now, r, Ok(g)))
    } else {
        Engine::with_budget(budget)
    };
    // A request waiting for KV room: it keeps its turn (nothing overtakes it).
    let mut held: Option<Placed<Running>> = None;
    // The per-rank KV gauges, looked up once (set after every step).
    let kv_gauges: Vec<IntGauge> = (0..group.world())
        .map(|rank| s.metrics.kv_used.with_label_values(&[&rank.to_string()]))
        .collect();
    loop {
        if let Some(p) = held.take() {
            if let Some(why) = s.fatal_cause() {
                answer(s, p.into_tag(), Err(RunError::Failed(why)));
            } else if p.cancelled() {
                gone_while_queued(s, p.into_tag());
            } else if spread_short(s, &group, &p) {
                side_by_side(s, &group, &mut eng, p, &mut held);
            } else if eng.fits(&p) {
                start_seq(s, &group, &mut eng, p);
            } else {
                held = Some(p);
            }
        }
        // Prefill one waiting request between decode steps while there is room; with nothing
        // running, wait for one.
        let next = if held.is_none() && eng.running() < s.cfg.max_num_seqs {
            s.next_queued(eng.running() == 0)
        } else {
            Pick::Empty
        };
        match next {
            Pick::Item(q) => {
                if let Some(req) = running_request(s, *q) {
                    match eng.place(&group, req) {
                        Ok(p) if spread_short(s, &group, &p) => {
                            side_by_side(s, &group, &mut eng, p, &mut held)
                        }
                        Ok(p) if eng.fits(&p) => start_seq(s, &group, &mut eng, p),
                        Ok(p) => held = Some(p),
                        Err((r, e)) => answer(s, r, Err(e)),
                    }
                }
            }
            Pick::Closed if eng.running() == 0 && held.is_none() => break,
            Pick::Empty | Pick::Closed => {}
        }
        if eng.running() > 0 {
            s.metrics.running.set(eng.running() as i64);
            match eng.step(&group) {
                Ok(done) => done.into_iter().for_each(|(r, g)| answer(s, r, Ok(g))),
                Err(e) => {
                    for r in eng.drain() {
                        answer(s, r, Err(RunError::Failed(format!("{e}"))));
                    }
                }
            }
        }
        record_steps(s, &mut eng, "decode");
        s.metrics.running.set(eng.running() as i64);
        for (g, &used) in kv_gauges.iter().zip(eng.kv_used()) {
            g.set(used as i64);
        }
        s.running.store(eng.running() > 0, Ordering::SeqCst);
    }
    group.shutdown()
}

/// `--gpu-memory-utilization`: a share of the device, in (0, 1] (checked at launch and again
/// where the budget is made, for a `ServeConfig` built by hand).
pub fn gpu_memory_utilization(f: f64) -> Result<f64, String> {
    if f > 0.0 && f <= 1.0 {
        Ok(f)
    } else {
        Err(format!("--gpu-memory-utilization {f}: give a fraction of the GPU's memory, above 0 and at most 1 (e.g. 0.9)"))
    }
}

/// The KV budget: `--kv-cache-memory-bytes`, else on the CPU half the memory available at
/// start (thread ranks share it; rank processes split it by the ranks on the node), on a GPU
/// `--gpu-memory-utilization` of its memory less what is in use now that the model is loaded
/// (rank processes split it by the ranks on rank 0's GPU). An error when that leaves nothing.
pub(super) fn kv_budget(cfg: &ServeConfig, group: &Group) -> Result<Option<KvBudget>, String> {
    let model = group.runner().model();
    let c = &model.cfg;
    let bytes_per_position = 2
        * c.num_hidden_layers
        * c.num_key_value_heads
        * c.head_dim
        * model.dtype().size_in_bytes();
    // A prefill row's largest transient tensors in one layer: the hidden state and residual,
    // the norm's output, q|k|v and the attention output, and the MLP's gate, up and their
    // product (an estimate of the peak; the layers run one after another).
    let prefill_bytes_per_row = (4 * c.hidden_size
        + 3 * c.intermediate_size
        + (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim)
        * model.dtype().size_in_bytes();
    let shared = group.info().rank_mode == "threads";
    let bytes = match cfg.kv_cache_memory_bytes {
        Some(b) => b,
        None if model.device().is_cpu() => {
            let Some(avail_kib) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            }) else {
                return Ok(None);
            };
            let avail = avail_kib * 1024;
            let per = if shared { 1 } else { group.world() as u64 };
            avail / 2 / per
        }
        None => {
            gpu_memory_utilization(cfg.gpu_memory_utilization)?;
            let Some((free, total)) = crate::device::memory(model.device())? else {
                return Ok(None);
            };
            let allowed = (cfg.gpu_memory_utilization * total as f64) as u64;
            let used = total - free;
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            if allowed <= used {
                return Err(format!(
                    "--gpu-memory-utilization {} allows {:.2} GiB of the GPU's {:.2} GiB, but {:.2} GiB are in use with the model loaded: no room for KV (raise it, or set --kv-cache-memory-bytes)",
                    cfg.gpu_memory_utilization,
                    gib(allowed),
                    gib(total),
                    gib(used)
                ));
            }
            let per = if shared {
                1
            } else {
                group.world().div_ceil(crate::launch::gpu_count().max(1)) as u64
            };
            (allowed - used) / per
        }
    };
    Ok(Some(KvBudget {
        positions: (bytes / bytes_per_position as u64) as usize,
        shared,
        bytes_per_position,
        prefill_bytes_per_row,
    }))
}

/// A queued request's client left while it waited for KV room.
pub(super) fn gone_while_queued(s: &Server, r: Running) {
    s.current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(_, c)| !Arc::ptr_eq(c, &r.cancel));
    s.metrics.cancelled.with_label_values(&["queued"]).inc();
}

/// A request picked from the queue as the engine takes it (None: answered already).
pub(super) fn running_request<'a>(
    s: &Arc<Server>,
    q: Queued,
) -> Option<engine::Request<'a, Running>> {
    if let Some(why) = s.fatal_cause() {
        let _ = q.events.send(Ev::Fail(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the server is stopping after a rank failure: {why}"),
        )));
        return None;
    }
    s.current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((q.events.clone(), q.cancel.clone()));
    if s.cut_by_shutdown.load(Ordering::SeqCst) {
        q.cancel.store(true, Ordering::SeqCst);
    }
    let events = q.events.clone();
    Some(engine::Request {
        tag: Running {
            events: q.events,
            cancel: q.cancel.clone(),
            waited: q.queued_at.elapsed(),
            method: q.job.settings.method.name(),
        },
        job: q.job,
        cancel: q.cancel,
        on_text: Box::new(move |t: &str| {
            let _ = events.send(Ev::Text(t.to_string()));
        }),
    })
}

/// Prefills a placed request (its first token comes with it).
pub(super) fn start_seq<'a>(
    s: &Arc<Server>,
    group: &Group,
    eng: &mut Engine<'a, Running>,
    p: Placed<'a, Running>,
) {
    s.running.store(true, Ordering::SeqCst);
    s.metrics.steps.with_label_values(&["prefill"]).inc();
    let started = eng.start(group, p);
    record_steps(s, eng, "decode_in_prefill");
    started_seq(s, eng, started);
}

/// Whether `p` is a short request the group spreads over its ranks: one rank, and a prompt
/// shorter than `--long-prefill-token-threshold`. A side-by-side prefill runs to its end (no
/// decode step between its layers, no cancel off rank 0), so a long one-rank prompt (dense)
/// prefills on rank 0, where it yields to running requests and stops when its client leaves.
fn spread_short(s: &Server, group: &Group, p: &Placed<'_, Running>) -> bool {
    group.spreads() && p.one_rank() && p.prompt_tokens() < s.cfg.long_prefill_token_threshold
}

/// Where the group spreads short requests over its ranks: `first` and the short requests
/// queued behind it, up to one a rank (and `--max-num-seqs`), each on the rank with the least
/// KV that has room, prefilled side by side in one step. The first that is not short, or finds
/// no room, is held for the next turn (it keeps its place).
fn side_by_side<'a>(
    s: &Arc<Server>,
    group: &Group,
    eng: &mut Engine<'a, Running>,
    first: Placed<'a, Running>,
    held: &mut Option<Placed<'a, Running>>,
) {
    let mut batch: Vec<Placed<'a, Running>> = Vec::new();
    let mut next = Some(first);
    while let Some(mut p) = next.take() {
        let taken: Vec<usize> = batch.iter().map(|b| b.home()).collect();
        if !spread_short(s, group, &p) || !eng.reserve_home(group, &mut p, &taken) {
            *held = Some(p);
            break;
        }
        batch.push(p);
        if batch.len() == group.world() || eng.running() + batch.len() >= s.cfg.max_num_seqs {
            break;
        }
        // The next waiting request (a bad one is answered and skipped).
        while let Pick::Item(q) = s.next_queued(false) {
            let Some(req) = running_request(s, *q) else {
                continue;
            };
            match eng.place(group, req) {
                Ok(p) => {
                    next = Some(p);
                    break;
                }
                Err((r, e)) => answer(s, r, Err(e)),
            }
        }
    }
    if batch.is_empty() {
        return;
    }
    s.running.store(true, Ordering::SeqCst);
    s.metrics.steps.with_label_values(&["prefill"]).inc();
    for started in eng.start_side_by_side(group, batch) {
        started_seq(s, eng, started);
    }
}

/// Answers a request that ended with its prefill (or failed in it); a failed group fails the
/// running ones too.
fn started_seq(s: &Arc<Server>, eng: &mut Engine<'_, Running>, started: engine::Started<Running>) {
    match started {
        Ok(None) => {}
        Ok(Some((r, g))) => answer(s, r, Ok(g)),
        Err((r, e)) => {
            let failed = matches!(e, RunError::Failed(_));
            answer(s, r, Err(e));
            if failed {
                for r in eng.drain() {
                    answer(s, r, Err(RunError::Failed("the group failed".into())));
                }
            }
        }
    }
}

/// The decode steps the engine ran since the last call, into the metrics (`kind`: `decode`, or
/// `decode_in_prefill` for those run between a prefill's layers).
pub(super) fn record_steps(s: &Server, eng: &mut Engine<'_, Running>, kind: &str) {
    let m = &s.metrics;
    for st in eng.take_stats() {
        m.steps.with_label_values(&[kind]).inc();
        m.batch.observe(st.rows as f64);
        m.spanning.observe(st.spanning as f64);
        if let Some(g) = st.gap_s {
            m.gap.observe(g);
        }
        m.step.observe(st.secs);
    }
}

/// Answers a request the engine is done with, and counts it.
pub(super) fn answer(s: &Server, r: Running, res: Result<Generation, RunError>) {
    s.current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(_, c)| !Arc::ptr_eq(c, &r.cancel));
    let method = r.method;
    match res {
        // The group failed under it: `fail` answered it already (its cancel flag may have
        // been set by its client leaving after that answer, not before).
        _ if s.fatal_cause().is_some() => {}
        Ok(g) if g.finish == Finish::Cancelled && s.cut_by_shutdown.load(Ordering::SeqCst) => {
            let _ = r.events.send(Ev::Fail(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the server shut down before this request finished (--shutdown-timeout {:?}); retry",
                    s.cfg.shutdown_timeout
                ),
            )));
        }
        Ok(g) => {
            let m = &s.metrics;
            if g.finish == Finish::Cancelled {
                m.cancelled.with_label_values(&["running"]).inc();
                tracing::info!(
                    "request cancelled by its client after {} tokens",
                    g.stats.generated_tokens
                );
            } else {
                // Token counters and latency histograms are of completed requests.
                m.prompt_tokens
                    .with_label_values(&[method])
                    .inc_by(g.stats.prompt_tokens as u64);
                m.generated_tokens
                    .with_label_values(&[method])
                    .inc_by(g.stats.generated_tokens as u64);
                m.ttft
                    .with_label_values(&[method])
                    .observe(r.waited.as_secs_f64() + g.stats.prefill_ms / 1e3);
                if g.stats.decode_tokens_per_s > 0.0 {
                    m.tpot
                        .with_label_values(&[method])
                        .observe(1.0 / g.stats.decode_tokens_per_s);
                }
                if g.stats.prefill_ms > 0.0 {
                    m.prefill_tps
                        .with_label_values(&[method])
                        .observe(g.stats.prompt_tokens as f64 / (g.stats.prefill_ms / 1e3));
                }
            }
            let _ = r.events.send(Ev::Done(Box::new(g)));
        }
        Err(RunError::Input(m)) => {
            let _ = r.events.send(Ev::Fail(ApiError::bad(m)));
        }
        Err(RunError::Failed(why)) => {
            let why = format!("a rank failed: {why}");
            eprintln!("error: {why}; stopping the server");
            // The server fails first: a client told of the failure then finds /health saying
            // so (answered first, it could ask before `fail` ran and hear "ok").
            s.fail(&why);
            let _ = r.events.send(Ev::Fail(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                why,
            )));
        }
    }
}
