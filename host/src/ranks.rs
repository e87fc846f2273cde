//! One way to start a group of ranks and feed it requests: [`start`] returns rank 0's [`Group`]
//! (threads over a [`LocalGroup`] on the CPU or one device; or one process per rank, over NCCL or
//! the host communicator: see [`launch`]), and
//! every other rank runs the steps rank 0 relays (prefill a sequence, decode rows, free
//! sequences) in a worker loop (nano-vllm's `ModelRunner` shape: the same program on every rank).
//! `apb generate` and `apb serve` both stand on it, through [`crate::engine`].

use crate::error::{bail, err, Context, Result};
use crate::launch::{self, CommKind, LaunchArgs, RankCtx};
use crate::runner::{
    prepare, Between, InputError, Job, Prepared, RankSeqs, Row, Runner, SeqId, SideBySide,
};
use crate::JobSettings;
use apb_plugin::profile::{span, Bucket};
use apb_plugin::{Communicator, LocalComm, LocalGroup};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// Most ranks run as threads of one process: each holds a cache and exchanges K/V with all the
/// others, so beyond this a CPU run only thrashes (1000 thread ranks took 16 GB and minutes).
pub const MAX_THREAD_RANKS: usize = 64;

/// How to start a group.
pub struct GroupSpec {
    /// Ranks (1: a single rank, dense or a distributed method that falls back).
    pub world: usize,
    /// The device asked for; rank processes on CUDA each take one of the node's GPUs.
    pub device: Device,
    /// How ranks run and meet (threads or processes, communicator, nodes, addresses, timeouts).
    pub launch: LaunchArgs,
}

/// How a started group runs, as printed at start and reported with every result.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct GroupInfo {
    /// `threads` or `processes`.
    pub rank_mode: &'static str,
    /// The communicator: `local` (threads), `nccl` or `host`.
    pub comm: &'static str,
}

impl GroupSpec {
    /// Whether ranks run as processes rather than threads of this process.
    pub fn processes(&self) -> bool {
        self.launch.processes(self.world, self.device.is_cuda())
    }

    /// GPUs on this node (0 on the CPU).
    fn gpus(&self) -> usize {
        if self.device.is_cuda() {
            launch::gpu_count()
        } else {
            0
        }
    }

    /// The communicator the ranks will use.
    pub fn comm(&self) -> CommKind {
        self.launch
            .comm_kind(self.world, self.device.is_cuda(), self.gpus())
    }

    /// What [`GroupInfo`] a group of this spec reports.
    pub fn info(&self) -> GroupInfo {
        GroupInfo {
            rank_mode: if self.processes() {
                "processes"
            } else {
                "threads"
            },
            comm: self.comm().name(),
        }
    }

    /// Checks the spec: rank count, launch flags, one GPU per NCCL rank.
    pub fn validate(&self) -> Result<()> {
        if self.world == 0 {
            bail!("--world-size must be at least 1");
        }
        self.launch.validate(self.world, self.device.is_cuda())?;
        if !self.processes() && self.world > MAX_THREAD_RANKS {
            bail!(
                "--world-size {} is too many ranks for threads of one process (at most {MAX_THREAD_RANKS}); run them as processes (--ranks processes, one per GPU with --device cuda)",
                self.world
            );
        }
        let per_node = self.world / self.launch.nnodes;
        if self.comm() == CommKind::Nccl && per_node > self.gpus() {
            bail!(
                "--comm nccl needs one GPU per rank process: {per_node} ranks on this node, {} GPUs (--comm host shares GPUs)",
                self.gpus()
            );
        }
        Ok(())
    }

    /// Rank processes limit their compute threads to their share of the node's cores; one
    /// process keeps candle's default, fixed once (before any other thread starts: both set
    /// `RAYON_NUM_THREADS`).
    pub fn limit_threads(&self) {
        if self.processes() {
            launch::limit_threads(self.world / self.launch.nnodes.max(1));
        } else {
            launch::fix_threads();
        }
    }

    /// One line for the console: how the ranks run.
    pub fn describe(&self) -> String {
        match (self.world, self.comm()) {
            (1, _) => "ranks: 1".into(),
            (w, CommKind::Local) => format!("ranks: {w} threads of this process"),
            (w, CommKind::Nccl) => format!("ranks: {w} processes over NCCL"),
            (w, CommKind::Host) => format!(
                "ranks: {w} processes over the host communicator (TCP), {} compute threads each",
                candle_core::utils::get_num_threads()
            ),
        }
    }
}

/// Why a request did not produce a generation.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The request cannot run as given (the caller's fault: 400).
    #[error("{0}")]
    Input(String),
    /// A rank failed: the group is no longer usable (500; a server stops).
    #[error("{0}")]
    Failed(String),
}

impl From<InputError> for RunError {
    fn from(e: InputError) -> Self {
        RunError::Input(e.0)
    }
}

/// What rank 0 relays to rank processes, once per engine step.
#[derive(Serialize, Deserialize)]
enum Message {
    /// Prefill a new sequence on every rank (rank 0 runs one too short for all ranks alone).
    Prefill {
        id: SeqId,
        job: Box<Job>,
    },
    /// One decode step of these rows (`lead`: rank 0 alone computes, see [`Runner::decode_rows`]).
    Decode {
        rows: Vec<Row>,
        lead: bool,
    },
    /// Prefill one-rank sequences side by side, each on its home rank (id, job, home).
    SideBySide(Vec<(SeqId, Job, usize)>),
    /// Drop these sequences' caches.
    Free(Vec<SeqId>),
    /// Back to the prefill that let rank 0 interleave steps ([`Between`]).
    Resume,
    Shutdown,
}

/// A step handed to a worker thread, with the communicator of the step's ranks.
enum ThreadStep {
    Prefill {
        id: SeqId,
        job: Arc<Job>,
        prep: Arc<Prepared>,
        comm: Arc<dyn Communicator>,
    },
    Decode {
        rows: Arc<Vec<Row>>,
        comm: Arc<dyn Communicator>,
        lead: bool,
    },
    SideBySide {
        items: Arc<Vec<SideBySide>>,
        comm: Arc<dyn Communicator>,
    },
    Free(Vec<SeqId>),
    /// Back to the prefill that let rank 0 interleave steps ([`Between`]).
    Resume,
}

enum Links {
    /// Worker ranks 1.. as threads; `comms[k - 1]` is the communicator of ranks `0..k` (a
    /// sequence planned on k ranks, and steps whose sequences span at most k).
    Threads {
        workers: Vec<(mpsc::Sender<ThreadStep>, JoinHandle<()>)>,
        comms: Vec<Vec<Arc<LocalComm>>>,
    },
    /// Worker ranks as processes; this is global rank 0. A sequence spans every rank or runs on
    /// rank 0 alone (`solo`): the communicator spans every process.
    Processes {
        ctx: Box<RankCtx>,
        comm: Arc<dyn Communicator>,
        solo: Arc<dyn Communicator>,
    },
}

/// Rank 0's handle on a started group: it runs rank 0's part of every step and relays the step
/// to the ranks it involves ([`crate::engine`] decides the steps).
pub struct Group {
    runner: Runner,
    world: usize,
    info: GroupInfo,
    links: Links,
    /// Rank 0's sequences.
    seqs: Mutex<RankSeqs>,
    next_id: AtomicU64,
    /// The ranks share compute (threads; processes on fewer GPUs than ranks): rank 0 alone runs
    /// a decode step's projections and MLP ([`Runner::decode_rows`]).
    lead: bool,
    /// One-rank (short) sequences run on any rank, side by side ([`Group::prefill_side_by_side`]),
    /// not all on rank 0: by default where every rank process has a GPU of its own.
    spread: bool,
}

/// Starts the group of `spec`, loading each rank's [`Runner`] with `load` on its device. Returns
/// rank 0's group; in a worker process (one spawned for a GPU rank) it serves rank 0's jobs until
/// shut down and returns None: the caller then just exits.
pub fn start(
    spec: &GroupSpec,
    load: impl FnOnce(&Device) -> Result<Runner>,
) -> Result<Option<Group>> {
    spec.validate()?;
    if !spec.processes() {
        return Group::threads(load(&spec.device)?, spec.world).map(Some);
    }
    let Member { device, comm, ctx } = join(spec)?;
    let ctx = ctx.expect("a process group has a rank context");
    let runner = load(&device)?;
    if ctx.rank == 0 {
        eprintln!("{}", spec.describe());
        let mut group = Group::new(
            runner,
            spec.world,
            spec.info(),
            Links::Processes {
                ctx: Box::new(ctx),
                comm,
                solo: LocalGroup::ranks(1).remove(0),
            },
        );
        // Processes with a GPU each compute every row in parallel at no cost; processes sharing
        // a GPU would each run all of it again. CPU processes each have their share of the cores.
        group.lead = spec.device.is_cuda() && spec.gpus() < spec.world / spec.launch.nnodes.max(1);
        group.spread = spec.device.is_cuda() && !group.lead;
        return Ok(Some(group));
    }
    process_worker(&ctx, &runner, comm)?;
    ctx.finish()?;
    Ok(None)
}

/// This process's place in a group that runs the same code on every rank (SPMD, as benchmarks
/// do): its device and communicator.
pub struct Member {
    /// This rank's device.
    pub device: Device,
    /// This rank's communicator.
    pub comm: Arc<dyn Communicator>,
    ctx: Option<RankCtx>,
}

impl Member {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Normal end: waits for the node's other rank processes and reports a failure among them.
    pub fn finish(self) -> Result<()> {
        drop(self.comm);
        match self.ctx {
            Some(ctx) => ctx.finish(),
            None => Ok(()),
        }
    }
}

/// Joins the group of `spec` as one member: a rank process (launching the node's other ranks
/// from the first process; on CUDA each takes GPU `local rank % GPUs`), or, for one rank, this
/// process alone.
pub fn join(spec: &GroupSpec) -> Result<Member> {
    spec.validate()?;
    if !spec.processes() {
        if spec.world > 1 {
            bail!(
                "--world-size {} runs as rank processes here: pass --ranks processes (or --device cuda)",
                spec.world
            );
        }
        return Ok(Member {
            device: spec.device.clone(),
            comm: LocalGroup::ranks(1).remove(0),
            ctx: None,
        });
    }
    let ctx = launch::join(&spec.launch, spec.world, spec.comm())?;
    let device = if spec.device.is_cuda() {
        let gpu = ctx.local_rank % spec.gpus().max(1);
        Device::new_cuda(gpu).map_err(|e| err!("rank {}: cannot open cuda:{gpu}: {e}", ctx.rank))?
    } else {
        Device::Cpu
    };
    let comm = launch::communicator(&ctx, &device)?;
    Ok(Member {
        device,
        comm,
        ctx: Some(ctx),
    })
}

/// A worker process's loop: run each step rank 0 sends; any failure ends the process with an
/// error, which takes the group down (the launcher's liveness check).
fn process_worker(ctx: &RankCtx, runner: &Runner, comm: Arc<dyn Communicator>) -> Result<()> {
    let mut seqs = RankSeqs::default();
    while let Some(msg) = next_message(ctx)? {
        if let Message::Shutdown = msg {
            break;
        }
        process_step(ctx, runner, &comm, &mut seqs, msg)?;
    }
    Ok(())
}

/// The next step from rank 0 (None: it closed the connection).
fn next_message(ctx: &RankCtx) -> Result<Option<Message>> {
    ctx.next_message()
        .map(|b| serde_json::from_slice(&b).context("a malformed step from rank 0"))
        .transpose()
}

/// One step on a worker process; a failure aborts the group with its cause.
fn process_step(
    ctx: &RankCtx,
    runner: &Runner,
    comm: &Arc<dyn Communicator>,
    seqs: &mut RankSeqs,
    msg: Message,
) -> Result<()> {
    let never = AtomicBool::new(false);
    let r = match msg {
        Message::Prefill { id, job } => {
            fault_injection(ctx.rank);
            let prep = prepare(runner.model(), &job).map_err(|e| err!("{e}"))?;
            let mut between = ProcessBetween { ctx, runner, comm };
            runner
                .prefill_seq(seqs, id, &job, &prep, comm.clone(), &never, &mut between)
                .map(drop)
        }
        Message::Decode { rows, lead } => runner
            .decode_rows(seqs, &rows, comm.as_ref(), lead)
            .map(drop),
        Message::SideBySide(items) => {
            fault_injection(ctx.rank);
            let items = items
                .into_iter()
                .map(|(id, job, home)| {
                    let prep = prepare(runner.model(), &job).map_err(|e| err!("{e}"))?;
                    Ok(SideBySide {
                        id,
                        job: Arc::new(job),
                        prep: Arc::new(prep),
                        home,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            runner
                .prefill_side_by_side(seqs, &items, comm.as_ref(), &never)
                .map(drop)
        }
        Message::Free(ids) => {
            ids.iter().for_each(|id| seqs.free(*id));
            Ok(())
        }
        Message::Resume | Message::Shutdown => Err(err!("a resume or shutdown step out of turn")),
    };
    r.inspect_err(|e| comm.abort(&format!("rank {} failed: {e:#}", ctx.rank)))
}

/// A worker process inside a prefill: the steps rank 0 interleaves, until it says resume.
struct ProcessBetween<'a> {
    ctx: &'a RankCtx,
    runner: &'a Runner,
    comm: &'a Arc<dyn Communicator>,
}

impl Between for ProcessBetween<'_> {
    fn run(&mut self, seqs: &mut RankSeqs) -> Result<()> {
        loop {
            match next_message(self.ctx)?.ok_or_else(|| err!("rank 0 is gone"))? {
                Message::Resume => return Ok(()),
                Message::Prefill { .. } | Message::SideBySide(_) | Message::Shutdown => {
                    return Err(err!("a prefill or shutdown step inside a prefill"))
                }
                m => process_step(self.ctx, self.runner, self.comm, seqs, m)?,
            }
        }
    }
}

/// A worker thread's loop. A failure or panic aborts the step's group and ends the thread: the
/// group is then broken and rank 0 reports the cause (its collective fails with it).
fn thread_worker(rank: usize, runner: Runner, steps: mpsc::Receiver<ThreadStep>) {
    let mut seqs = RankSeqs::default();
    while let Ok(step) = steps.recv() {
        if let Err(why) = thread_step(rank, &runner, &steps, &mut seqs, &step) {
            tracing::error!("{why}");
            return;
        }
    }
}

/// One step on worker thread `rank`. A failure or panic aborts the step's communicator (rank
/// 0's collective fails with the cause) and comes back as the cause.
fn thread_step(
    rank: usize,
    runner: &Runner,
    steps: &mpsc::Receiver<ThreadStep>,
    seqs: &mut RankSeqs,
    step: &ThreadStep,
) -> std::result::Result<(), String> {
    let never = AtomicBool::new(false);
    let res = catch_unwind(AssertUnwindSafe(|| match step {
        ThreadStep::Prefill {
            id,
            job,
            prep,
            comm,
        } => {
            fault_injection(rank);
            let mut between = ThreadBetween {
                rank,
                runner,
                steps,
            };
            runner
                .prefill_seq(seqs, *id, job, prep, comm.clone(), &never, &mut between)
                .map(drop)
        }
        ThreadStep::Decode { rows, comm, lead } => runner
            .decode_rows(seqs, rows, comm.as_ref(), *lead)
            .map(drop),
        ThreadStep::SideBySide { items, comm } => {
            fault_injection(rank);
            runner
                .prefill_side_by_side(seqs, items, comm.as_ref(), &never)
                .map(drop)
        }
        ThreadStep::Free(ids) => {
            ids.iter().for_each(|id| seqs.free(*id));
            Ok(())
        }
        ThreadStep::Resume => Err(err!("a resume outside a prefill")),
    }));
    let why = match res {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => format!("rank {rank} failed: {e:#}"),
        Err(panic) => format!("rank {rank} panicked: {}", panic_text(&panic)),
    };
    match step {
        ThreadStep::Prefill { comm, .. }
        | ThreadStep::Decode { comm, .. }
        | ThreadStep::SideBySide { comm, .. } => comm.abort(&why),
        ThreadStep::Free(_) | ThreadStep::Resume => {}
    }
    Err(why)
}

/// A worker thread inside a prefill: the steps rank 0 interleaves, until it says resume.
struct ThreadBetween<'a> {
    rank: usize,
    runner: &'a Runner,
    steps: &'a mpsc::Receiver<ThreadStep>,
}

impl Between for ThreadBetween<'_> {
    fn run(&mut self, seqs: &mut RankSeqs) -> Result<()> {
        loop {
            let step = self.steps.recv().map_err(|_| err!("rank 0 is gone"))?;
            match step {
                ThreadStep::Resume => return Ok(()),
                ThreadStep::Prefill { comm, .. } | ThreadStep::SideBySide { comm, .. } => {
                    // Rank 0 gave up on the prefill this rank is in (it failed): fail the new
                    // one too rather than leave its ranks waiting for this one.
                    let why = format!("rank {}: a prefill inside a prefill", self.rank);
                    comm.abort(&why);
                    return Err(err!("{why}"));
                }
                step => thread_step(self.rank, self.runner, self.steps, seqs, &step)
                    .map_err(|why| err!("{why}"))?,
            }
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Test hook (`APB_FAULT_PANIC_RANK=r`): worker rank `r` dies on its first job, as a crashed
/// rank would. Used by the server's failure tests; only in builds with the `fault-injection`
/// feature, so production binaries read no such variable.
fn fault_injection(_rank: usize) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("APB_FAULT_PANIC_RANK").ok() == Some(_rank.to_string()) {
        panic!("APB_FAULT_PANIC_RANK={_rank}: injected rank failure");
    }
}

impl Group {
    /// `world` ranks as threads of this process sharing `runner`'s weights (CPU ranks, or
    /// several ranks on one device).
    pub fn threads(runner: Runner, world: usize) -> Result<Group> {
        let world = world.max(1);
        let workers = (1..world)
            .map(|h| {
                let (tx, rx) = mpsc::channel::<ThreadStep>();
                let r = runner.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("rank-{h}"))
                    .spawn(move || thread_worker(h, r, rx))
                    .context("cannot start a rank thread")?;
                Ok((tx, handle))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Group::new(
            runner,
            world,
            GroupInfo {
                rank_mode: "threads",
                comm: CommKind::Local.name(),
            },
            Links::Threads {
                workers,
                comms: (1..=world).map(LocalGroup::ranks).collect(),
            },
        ))
    }

    fn new(runner: Runner, world: usize, info: GroupInfo, links: Links) -> Group {
        Group {
            runner,
            world,
            info,
            links,
            seqs: Mutex::new(RankSeqs::default()),
            next_id: AtomicU64::new(0),
            lead: true,
            spread: false,
        }
    }

    /// Ranks of the group.
    pub fn world(&self) -> usize {
        self.world
    }

    /// How the ranks run (threads or processes) and their communicator.
    pub fn info(&self) -> GroupInfo {
        self.info
    }

    /// Rank 0's rank program.
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// A fresh sequence id.
    pub fn new_id(&self) -> SeqId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks and plans `job` for this group: the job as it will run and its plan. Rank
    /// processes share one communicator, so a plan using fewer ranks than the group runs on
    /// rank 0 alone (a note says so).
    pub fn place(&self, job: &Job) -> std::result::Result<(Job, Prepared), RunError> {
        if job.settings.world > self.world {
            return Err(RunError::Input(format!(
                "the request asks for {} ranks but the group has {}",
                job.settings.world, self.world
            )));
        }
        let prep = prepare(self.runner.model(), job)?;
        let ranks = prep.plan.world;
        if matches!(self.links, Links::Processes { .. }) && ranks < self.world {
            let one_rank = Job {
                settings: JobSettings {
                    world: 1,
                    ..job.settings.clone()
                },
                ..job.clone()
            };
            let planned = prep.plan.notes.clone();
            let mut prep = prepare(self.runner.model(), &one_rank)?;
            prep.plan.notes = planned;
            prep.plan.notes.push(if self.spreads() {
                format!(
                    "the plan uses {ranks} of {} rank processes and the communicator spans them all; ran on one rank (short requests spread over the ranks)",
                    self.world
                )
            } else {
                format!(
                    "the plan uses {ranks} of {} rank processes and the communicator spans them all; ran on rank 0 alone",
                    self.world
                )
            });
            return Ok((one_rank, prep));
        }
        Ok((job.clone(), prep))
    }

    /// The communicator of rank 0 for a step over ranks `0..k`, and the worker links it needs.
    fn comm0(&self, k: usize) -> Arc<dyn Communicator> {
        match &self.links {
            Links::Threads { comms, .. } => comms[k - 1][0].clone() as Arc<dyn Communicator>,
            Links::Processes { comm, solo, .. } => {
                if k == 1 {
                    solo.clone()
                } else {
                    comm.clone()
                }
            }
        }
    }

    /// Runs `f` as rank 0's part of a step over ranks `0..k`: a failure or panic aborts the
    /// step's communicator (workers stop, rank processes are killed) and fails the group.
    fn rank0<R>(
        &self,
        k: usize,
        f: impl FnOnce(Arc<dyn Communicator>) -> Result<R>,
    ) -> std::result::Result<R, RunError> {
        let comm = self.comm0(k);
        let r = catch_unwind(AssertUnwindSafe(|| f(comm.clone())))
            .unwrap_or_else(|p| Err(err!("rank 0 panicked: {}", panic_text(&p))));
        r.map_err(|e| {
            let why = format!("{e:#}");
            comm.abort(&format!("rank 0 failed: {why}"));
            if let Links::Processes { ctx, .. } = &self.links {
                // The workers may sit in a collective: stop them, never leave one behind.
                ctx.kill_group();
            }
            // A worker's failure reaches rank 0 as "group aborted: <its cause>".
            RunError::Failed(why.replacen("group aborted: ", "", 1))
        })
    }

    /// Sends a step to the workers among ranks `0..k` (rank processes: all of them, k > 1).
    fn relay(
        &self,
        k: usize,
        thread: impl Fn(Arc<dyn Communicator>) -> ThreadStep,
        msg: impl FnOnce() -> Message,
    ) -> std::result::Result<(), RunError> {
        match &self.links {
            Links::Threads { workers, comms } => {
                for h in 1..k {
                    workers[h - 1]
                        .0
                        .send(thread(comms[k - 1][h].clone()))
                        .map_err(|_| {
                            comms[k - 1][0].abort("a rank thread is gone");
                            RunError::Failed(format!("rank {h} is gone (it failed earlier)"))
                        })?;
                }
                Ok(())
            }
            Links::Processes { ctx, .. } if k > 1 => serde_json::to_vec(&msg())
                .map_err(crate::error::Error::from)
                .and_then(|b| ctx.send_to_workers(&b))
                .map_err(|e| RunError::Failed(format!("{e:#}"))),
            Links::Processes { .. } => Ok(()),
        }
    }

    /// Prefills sequence `id` of a placed job on its plan's ranks. Returns the ranks it spans
    /// and rank 0's hidden state of its last prompt token, or None when `cancel` stopped it.
    /// Between layers `between` may run decode steps of the running sequences (the engine's).
    pub fn prefill(
        &self,
        id: SeqId,
        job: &Job,
        prep: &Prepared,
        cancel: &AtomicBool,
        between: &mut dyn Between,
    ) -> std::result::Result<Option<(usize, Tensor)>, RunError> {
        let k = prep.plan.world;
        let (job_a, prep_a) = (Arc::new(job.clone()), Arc::new(prep.clone()));
        self.relay(
            k,
            |comm| ThreadStep::Prefill {
                id,
                job: job_a.clone(),
                prep: prep_a.clone(),
                comm,
            },
            || Message::Prefill {
                id,
                job: Box::new(job.clone()),
            },
        )?;
        // Rank 0's sequences stay unlocked while it prefills: `between` may run decode steps.
        let hidden = self.rank0(k, |comm| {
            let mut mine = RankSeqs::default();
            let h = self
                .runner
                .prefill_seq(&mut mine, id, job, prep, comm, cancel, between)?;
            self.lock_seqs().absorb(mine);
            Ok(h)
        })?;
        Ok(hidden.map(|h| (k, h)))
    }

    /// Whether one-rank sequences spread over the ranks ([`Group::set_spread`]).
    pub fn spreads(&self) -> bool {
        self.spread && self.world > 1
    }

    /// Spreads one-rank (short) sequences over the ranks, prefilled side by side and kept
    /// where they ran (`apb serve --spread-short-requests`), or keeps them on rank 0. On by
    /// default where every rank process owns its GPU.
    pub fn set_spread(&mut self, on: bool) {
        self.spread = on;
    }

    /// Prefills one-rank sequences side by side, each on its home rank (distinct homes),
    /// in one step. Returns each one's last hidden state (rank 0's copy), or None when
    /// `cancel` stopped the one on rank 0.
    pub fn prefill_side_by_side(
        &self,
        items: Vec<SideBySide>,
        cancel: &AtomicBool,
    ) -> std::result::Result<Vec<Option<Tensor>>, RunError> {
        let k = items.iter().map(|it| it.home + 1).max().unwrap_or(1);
        let plain: Vec<(SeqId, Job, usize)> = items
            .iter()
            .map(|it| (it.id, (*it.job).clone(), it.home))
            .collect();
        let shared = Arc::new(items);
        self.relay(
            k,
            |comm| ThreadStep::SideBySide {
                items: shared.clone(),
                comm,
            },
            || Message::SideBySide(plain),
        )?;
        self.rank0(k, |comm| {
            let mut mine = RankSeqs::default();
            let h = self
                .runner
                .prefill_side_by_side(&mut mine, &shared, comm.as_ref(), cancel)?;
            self.lock_seqs().absorb(mine);
            Ok(h)
        })
    }

    /// Sends the workers of a prefill over ranks `0..k` back to it after interleaved steps.
    pub fn resume(&self, k: usize) -> std::result::Result<(), RunError> {
        self.relay(k, |_| ThreadStep::Resume, || Message::Resume)
    }

    fn lock_seqs(&self) -> std::sync::MutexGuard<'_, RankSeqs> {
        self.seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One decode step: `rows` with the ranks each row's sequence spans (a padding row: 1). Every
    /// rank of the widest sequence runs all rows; returns each sequence row's [`Pick`], in order:
    /// its greedy token where `greedy[i]`, else its next-token logits (f32). `greedy` is indexed
    /// by row, so padding rows come after every sequence row.
    pub fn decode(
        &self,
        rows: &[(Row, usize)],
        greedy: &[bool],
    ) -> std::result::Result<Vec<Pick>, RunError> {
        let k = rows.iter().map(|r| r.1).max().unwrap_or(1);
        let plain: Vec<Row> = rows.iter().map(|r| r.0).collect();
        let shared = Arc::new(plain.clone());
        self.relay(
            k,
            |comm| ThreadStep::Decode {
                rows: shared.clone(),
                comm,
                lead: self.lead,
            },
            || Message::Decode {
                rows: plain.clone(),
                lead: self.lead,
            },
        )?;
        let model = self.runner.model();
        self.rank0(k, |comm| {
            let mut seqs = self.lock_seqs();
            let hidden = span(Bucket::DecodeForward, model.device(), || {
                self.runner
                    .decode_rows(&mut seqs, &plain, comm.as_ref(), self.lead)
            })?
            .ok_or_else(|| err!("rank 0 got no rows from its decode step"))?;
            span(Bucket::DecodePick, model.device(), || {
                let logits = model.row_logits(&hidden)?.squeeze(0)?;
                Ok(pick(&logits, &plain, greedy)?)
            })
        })
    }

    /// Drops finished sequences (id, the ranks that hold its KV) on every rank that holds them.
    pub fn free(&self, done: &[(SeqId, std::ops::Range<usize>)]) {
        {
            let mut seqs = self.seqs.lock().unwrap_or_else(|p| p.into_inner());
            done.iter().for_each(|(id, _)| seqs.free(*id));
        }
        let k = done.iter().map(|d| d.1.end).max().unwrap_or(1);
        let ids: Vec<SeqId> = done.iter().filter(|d| d.1.end > 1).map(|d| d.0).collect();
        if ids.is_empty() {
            return;
        }
        // A worker that is gone fails the next step instead.
        let _ = match &self.links {
            Links::Threads { workers, .. } => {
                for (h, w) in workers.iter().enumerate().take(k - 1) {
                    let mine = done
                        .iter()
                        .filter(|d| d.1.contains(&(h + 1)))
                        .map(|d| d.0)
                        .collect();
                    let _ = w.0.send(ThreadStep::Free(mine));
                }
                Ok(())
            }
            Links::Processes { .. } => {
                self.relay(k, |_| ThreadStep::Free(vec![]), || Message::Free(ids))
            }
        };
    }

    /// Stops the worker ranks (threads joined, processes told to finish and waited for).
    pub fn shutdown(self) -> Result<()> {
        match self.links {
            Links::Threads { workers, .. } => {
                for (tx, handle) in workers {
                    drop(tx);
                    let _ = handle.join();
                }
                Ok(())
            }
            Links::Processes { ctx, comm, .. } => {
                let bytes = serde_json::to_vec(&Message::Shutdown)?;
                ctx.send_to_workers(&bytes)?;
                drop(comm);
                ctx.finish()
            }
        }
    }
}

/// A row's outcome of a decode step: its greedy token (chosen where the logits are: on the GPU
/// one id comes back instead of 128256 logits), or its logits for a sampler.
#[derive(Debug)]
pub enum Pick {
    /// The largest logit's id.
    Token(u32),
    /// The row's logits (f32, the vocabulary).
    Logits(Vec<f32>),
}

/// The picks of a step's real rows (padding dropped) from its `logits` `(rows, vocab)`:
/// `greedy[i]` takes row `i`'s argmax on the device, the others' logits come back.
fn pick(logits: &Tensor, rows: &[Row], greedy: &[bool]) -> candle_core::Result<Vec<Pick>> {
    let real: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].seq.is_some()).collect();
    let is_greedy = |i: usize| greedy.get(i).copied().unwrap_or(false);
    let ids = if real.iter().any(|&i| is_greedy(i)) {
        apb_kernels::argmax_rows(logits)?.to_vec1::<u32>()?
    } else {
        Vec::new()
    };
    let want: Vec<u32> = real
        .iter()
        .filter(|&&i| !is_greedy(i))
        .map(|&i| i as u32)
        .collect();
    let mut sampled = if want.is_empty() {
        Vec::new()
    } else {
        let at = Tensor::new(want.as_slice(), logits.device())?;
        logits.index_select(&at, 0)?.to_vec2::<f32>()?
    }
    .into_iter();
    real.iter()
        .map(|&i| match is_greedy(i) {
            true => Ok(Pick::Token(ids[i])),
            false => sampled
                .next()
                .map(Pick::Logits)
                .ok_or_else(|| candle_core::Error::Msg("a sampled row without logits".into())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greedy rows get their argmax, sampled rows their own logits in order, padding nothing:
    /// in a batch that mixes them (a sampled row between greedy ones, padding last).
    #[test]
    fn picks_of_a_mixed_step() {
        let logits = [
            [0.1f32, 3.0, 2.0],
            [5.0, 1.0, 2.0],
            [0.0, 0.5, 7.0],
            [9.0, 0.0, 0.0],
        ];
        let t = Tensor::new(&logits, &Device::Cpu).unwrap();
        let row = |seq| Row {
            seq,
            token: 0,
            pos: 0,
            kv_rank: 0,
        };
        let rows = [row(Some(1)), row(Some(2)), row(Some(3)), row(None)];
        let picks = pick(&t, &rows, &[true, false, true]).unwrap();
        assert_eq!(picks.len(), 3);
        assert!(matches!(picks[0], Pick::Token(1)), "{picks:?}");
        assert!(
            matches!(&picks[1], Pick::Logits(l) if l == &logits[1]),
            "{picks:?}"
        );
        assert!(matches!(picks[2], Pick::Token(2)), "{picks:?}");
        let all_sampled = pick(&t, &rows[..3], &[false; 3]).unwrap();
        for (p, want) in all_sampled.iter().zip(&logits) {
            assert!(matches!(p, Pick::Logits(l) if l == want), "{all_sampled:?}");
        }
    }
}
