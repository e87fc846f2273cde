//! Batched decode at the rank program's level (threads over `LocalGroup`, SmolLM2 in f32): a
//! decode step of several sequences that each span both ranks is one all-gather per layer, and
//! each row comes out bit for bit as the sequence alone would get it (a batch of one runs as two
//! rows: see `apb_host::engine`); with rank 0 alone computing (ranks sharing compute), two
//! collectives per layer and the same rows.

use apb_host::engine::{Engine, Request};
use apb_host::prompt::PromptParts;
use apb_host::runner::{prepare, Alone, RankSeqs, Row};
use apb_host::{GenParams, Method};
use apb_integration_tests::*;
use apb_plugin::{Communicator, LocalGroup, Pending};
use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A communicator that counts its collectives.
struct Counting(Arc<dyn Communicator>, AtomicUsize);

impl Communicator for Counting {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_gather(&self, t: &Tensor) -> apb_plugin::Result<Vec<Tensor>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.all_gather(t)
    }
    fn all_gather_pending(&self, t: &Tensor) -> apb_plugin::Result<Pending<Vec<Tensor>>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.all_gather_pending(t)
    }
    fn ring_pass(&self, t: &Tensor) -> apb_plugin::Result<Pending> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.ring_pass(t)
    }
    fn all_to_all(&self, parts: &[Tensor]) -> apb_plugin::Result<Vec<Tensor>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.all_to_all(parts)
    }
    fn broadcast(&self, t: Option<&Tensor>, root: usize) -> apb_plugin::Result<Tensor> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.broadcast(t, root)
    }
    fn barrier(&self) -> apb_plugin::Result<()> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.barrier()
    }
    fn abort(&self, why: &str) {
        self.0.abort(why)
    }
}

/// One rank's collectives in a batched step, its batched rows, each row alone, and the
/// collectives and rows (rank 0) of the same step with rank 0 alone computing (`lead`).
type RankResult = (
    usize,
    Vec<Vec<f32>>,
    Vec<Vec<f32>>,
    usize,
    Option<Vec<Vec<f32>>>,
);

/// A prompt of `n` context tokens (arbitrary ids), a 9-token query and a question inside it.
fn prompt(n: usize) -> PromptParts {
    PromptParts {
        context: (1000..1000 + n as u32).collect(),
        query_segment: (500..509).collect(),
        question: (502..506).collect(),
        prefix_len: 0,
    }
}

#[test]
fn a_decode_step_of_many_sequences_is_one_collective_per_layer_and_each_row_as_alone() {
    // SmolLM2: its layers are wide enough (≥ 576) for the GEMM library to compute every row of
    // a several-row product alike; the tiny fixtures' 64-wide layers are not.
    let runner = smollm2_runner();
    let layers = runner.model().cfg.num_hidden_layers;
    // Three sequences on both ranks, of different methods and lengths.
    let seqs: Vec<(Method, usize)> =
        vec![(Method::ZIGZAG, 61), (Method::APB, 57), (Method::RING, 40)];
    let jobs: Vec<_> = seqs
        .iter()
        .map(|&(m, n)| {
            let mut j = job(&prompt(n), m, 2, &GenParams::default());
            if m == Method::APB {
                (j.settings.anchor_len, j.settings.passing_len) = (Some(8), Some(4));
            }
            let p = prepare(runner.model(), &j).unwrap();
            assert_eq!(p.plan.world, 2, "{m:?}");
            (j, p)
        })
        .collect();
    let comms = LocalGroup::ranks(2);
    let never = AtomicBool::new(false);
    // Each rank: prefill the three, then one batched step (3 rows) counting collectives, then
    // each sequence alone (its row and a padding row) from a copy of the same state.
    let per_rank: Vec<RankResult> = std::thread::scope(|sc| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                let (runner, jobs, never) = (&runner, &jobs, &never);
                sc.spawn(move || {
                    let row = |id: u64, n: usize| Row {
                        seq: Some(id),
                        token: 7 + id as u32,
                        pos: n as u32,
                        kv_rank: id as u32 % 2,
                    };
                    let fill = |seqs: &mut RankSeqs| {
                        for (id, (j, p)) in jobs.iter().enumerate() {
                            let c: Arc<dyn Communicator> = c.clone();
                            runner
                                .prefill_seq(seqs, id as u64, j, p, c, never, &mut Alone)
                                .unwrap()
                                .unwrap();
                        }
                    };
                    let mut batch = RankSeqs::default();
                    fill(&mut batch);
                    let rows: Vec<Row> = jobs
                        .iter()
                        .enumerate()
                        .map(|(id, (j, _))| row(id as u64, j.prompt.len()))
                        .collect();
                    let kv_len = |seqs: &RankSeqs| -> Vec<usize> {
                        rows.iter()
                            .map(|r| seqs.kv_len(r.seq.unwrap()).unwrap())
                            .collect()
                    };
                    let before = kv_len(&batch);
                    let counting = Counting(c.clone(), AtomicUsize::new(0));
                    let h = runner
                        .decode_rows(&mut batch, &rows, &counting, false)
                        .unwrap()
                        .unwrap();
                    let collectives = counting.1.load(Ordering::SeqCst);
                    // Each row's K/V went to the rank its row names, and only there (the
                    // engine spreads a sequence's generated tokens over its ranks).
                    for ((r, b), a) in rows.iter().zip(&before).zip(kv_len(&batch)) {
                        let kept = (r.kv_rank as usize == c.rank()) as usize;
                        assert_eq!(a, b + kept, "rank {}: {r:?}", c.rank());
                    }
                    let batched: Vec<Vec<f32>> = h.squeeze(0).unwrap().to_vec2().unwrap();
                    let mut alone = RankSeqs::default();
                    fill(&mut alone);
                    let singles = rows
                        .iter()
                        .map(|r| {
                            let pad = Row { seq: None, ..*r };
                            let h = runner
                                .decode_rows(&mut alone, &[*r, pad], c.as_ref(), false)
                                .unwrap()
                                .unwrap();
                            h.squeeze(0).unwrap().to_vec2::<f32>().unwrap().remove(0)
                        })
                        .collect();
                    // Rank 0 alone runs the projections and MLP (ranks sharing compute).
                    let mut led = RankSeqs::default();
                    fill(&mut led);
                    let counting = Counting(c.clone(), AtomicUsize::new(0));
                    let h = runner
                        .decode_rows(&mut led, &rows, &counting, true)
                        .unwrap();
                    let lead_rows = h.map(|h| h.squeeze(0).unwrap().to_vec2().unwrap());
                    let lead_collectives = counting.1.load(Ordering::SeqCst);
                    // Led by rank 0, the rows' K/V lands where it did without.
                    assert_eq!(kv_len(&led), kv_len(&batch), "rank {}: led", c.rank());
                    (collectives, batched, singles, lead_collectives, lead_rows)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (collectives, batched, singles, lead_collectives, lead_rows)) in
        per_rank.iter().enumerate()
    {
        // A broadcast of q/k/v and the gather of the parts per layer; rank 0 alone gets rows,
        // bit for bit those of every rank computing them.
        assert_eq!(
            *lead_collectives,
            2 * layers,
            "rank {rank}: collectives, lead"
        );
        assert_eq!(lead_rows.is_some(), rank == 0, "rank {rank}: rows, lead");
        if let Some(l) = lead_rows {
            assert!(l == batched, "rank 0 alone computing changed the rows");
        }
        assert_eq!(
            *collectives, layers,
            "rank {rank}: collectives in one decode step"
        );
        for (i, (b, s)) in batched.iter().zip(singles).enumerate() {
            assert!(
                b == s,
                "rank {rank}: sequence {i}'s row differs batched and alone"
            );
        }
    }
    // Every rank holds the same merged rows.
    assert!(per_rank[0].1 == per_rank[1].1);
}

/// Runs `job` alone in a batching engine (a lone row runs as two, as it does beside others).
fn alone(group: &apb_host::ranks::Group, job: &apb_host::Job) -> Vec<u32> {
    let mut eng = Engine::batching(None);
    let mut done = eng
        .add(group, request(job.clone(), 0))
        .map_err(|e| e.1)
        .unwrap();
    while done.is_none() {
        done = eng.step(group).unwrap().pop();
    }
    done.unwrap().1.tokens
}

fn request<'a>(job: apb_host::Job, tag: usize) -> Request<'a, usize> {
    Request {
        job,
        cancel: Arc::new(AtomicBool::new(false)),
        on_text: Box::new(|_| {}),
        tag,
    }
}

/// A prefill lets the running sequences decode between its layers
/// (`Engine::with_decode_gap`): over 2 thread ranks, a 2-rank sequence decodes inside another's
/// 2-rank prefill (the prefill's worker runs the interleaved steps, then resumes) and inside a
/// 1-rank prefill; every request still gets, token for token, what it gets alone.
#[test]
fn running_sequences_decode_inside_a_prefill_and_keep_their_tokens() {
    let group = apb_host::ranks::Group::threads(smollm2_runner(), 2).unwrap();
    let params = GenParams {
        max_new_tokens: 20,
        ignore_eos: true,
        ..GenParams::default()
    };
    let mut b = job(&prompt(300), Method::APB, 2, &params);
    (b.settings.anchor_len, b.settings.passing_len) = (Some(8), Some(4));
    let jobs = [
        job(&prompt(61), Method::ZIGZAG, 2, &params),
        b,
        job(&prompt(12), Method::DENSE, 1, &params),
    ];
    let want: Vec<Vec<u32>> = jobs.iter().map(|j| alone(&group, j)).collect();
    let mut eng = Engine::batching(None).with_decode_gap(std::time::Duration::ZERO);
    let mut got = vec![Vec::new(); jobs.len()];
    let mut inside = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if let Some((t, g)) = eng
            .add(&group, request(j.clone(), i))
            .map_err(|e| e.1)
            .unwrap()
        {
            got[t] = g.tokens;
        }
        inside.push(eng.take_stats().len());
        for (t, g) in eng.take_finished() {
            got[t] = g.tokens;
        }
    }
    // The first prefill had nothing to interleave; the 2-rank one (30 layers, the ranks agree
    // every 4) and the 1-rank one (every layer) let the running sequences step.
    assert_eq!(inside[0], 0);
    assert!(
        inside[1] >= 5,
        "steps inside the 2-rank prefill: {}",
        inside[1]
    );
    assert!(
        inside[2] >= 5,
        "steps inside the 1-rank prefill: {}",
        inside[2]
    );
    while eng.running() > 0 {
        for (t, g) in eng.step(&group).unwrap() {
            got[t] = g.tokens;
        }
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}: tokens differ from its run alone");
    }
}

/// Short requests spread over the ranks (`apb serve --spread-short-requests`, where ranks own
/// their device): over 2 thread ranks beside a running 2-rank apb sequence, two one-rank
/// requests each get a rank of their own (the one holding the least KV first), prefill side by
/// side in one step and decode there, in the same batch as the apb one; every request gets,
/// token for token, what it gets alone on rank 0, and each ends on the rank it was given.
#[test]
fn short_requests_spread_over_ranks_side_by_side_and_keep_their_tokens() {
    let mut group = apb_host::ranks::Group::threads(smollm2_runner(), 2).unwrap();
    group.set_spread(true);
    assert!(group.spreads());
    let params = GenParams {
        max_new_tokens: 12,
        ignore_eos: true,
        ..GenParams::default()
    };
    let mut long = job(&prompt(300), Method::APB, 2, &params);
    (long.settings.anchor_len, long.settings.passing_len) = (Some(8), Some(4));
    let jobs = [
        long,
        job(&prompt(12), Method::DENSE, 1, &params),
        job(&prompt(20), Method::DENSE, 1, &params),
    ];
    let want: Vec<Vec<u32>> = jobs.iter().map(|j| alone(&group, j)).collect();
    let mut eng = Engine::batching(None);
    assert!(eng
        .add(&group, request(jobs[0].clone(), 0))
        .map_err(|e| e.1)
        .unwrap()
        .is_none());
    // The apb sequence's KV: its question segment and more of its new tokens on rank 1.
    let used = eng.kv_used().to_vec();
    assert!(used[1] > used[0], "KV held per rank: {used:?}");
    let mut a = eng
        .place(&group, request(jobs[1].clone(), 1))
        .unwrap_or_else(|e| panic!("{}", e.1));
    let mut b = eng
        .place(&group, request(jobs[2].clone(), 2))
        .unwrap_or_else(|e| panic!("{}", e.1));
    assert!(a.one_rank() && b.one_rank());
    assert!(eng.reserve_home(&group, &mut a, &[]));
    assert_eq!(a.home(), 0, "the rank holding the least KV first");
    assert!(eng.reserve_home(&group, &mut b, &[a.home()]));
    assert_eq!(b.home(), 1);
    let with_b = eng.kv_used().to_vec();
    assert!(
        with_b[1] > used[1] && with_b[0] > used[0],
        "room held: {with_b:?}"
    );
    for started in eng.start_side_by_side(&group, vec![a, b]) {
        assert!(started.map_err(|e| e.1).unwrap().is_none());
    }
    let mut got = vec![Vec::new(); jobs.len()];
    let mut first_rank = vec![usize::MAX; jobs.len()];
    let mut spanning_steps = 0;
    while eng.running() > 0 {
        for (t, g) in eng.step(&group).unwrap() {
            got[t] = g.tokens;
            first_rank[t] = g.first_rank;
        }
        spanning_steps += eng.take_stats().iter().filter(|s| s.rows == 3).count();
    }
    assert!(
        spanning_steps >= 10,
        "steps with all three: {spanning_steps}"
    );
    assert_eq!(first_rank, [0, 0, 1]);
    assert_eq!(eng.kv_used(), [0, 0], "every rank freed what it held");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}: tokens differ from its run alone");
    }
}
