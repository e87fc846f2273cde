//! One way to start a group of ranks and feed it requests: [`start`] returns rank 0's [`Group`]
//! (threads over a [`LocalGroup`] on the CPU or one device; or one process per rank, over NCCL or
//! the host communicator: see [`launch`]), and
//! every other rank runs [`Runner::run`] in a worker loop on the jobs rank 0 relays (nano-vllm's
//! `ModelRunner` shape: the same program on every rank). `apb generate` and `apb serve` both stand
//! on it.

use crate::error::{bail, err, Context, Result};
use crate::launch::{self, CommKind, LaunchArgs, RankCtx};
use crate::runner::{prepare, Generation, InputError, Job, Prepared, Runner};
use apb_plugin::{Communicator, LocalGroup};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
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

    /// Rank processes limit their compute threads to their share of the node's cores (before
    /// any other thread starts: it sets `RAYON_NUM_THREADS`).
    pub fn limit_threads(&self) {
        if self.processes() {
            launch::limit_threads(self.world / self.launch.nnodes.max(1));
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

/// What rank 0 relays to the other ranks.
#[derive(Serialize, Deserialize)]
enum Message {
    Job(Box<Job>),
    Shutdown,
}

/// A job handed to a worker thread, with the communicator of this job's ranks.
struct ThreadJob {
    job: Arc<Job>,
    prep: Arc<Prepared>,
    comm: Arc<dyn Communicator>,
    reply: mpsc::Sender<Result<Generation>>,
}

enum Links {
    /// Worker ranks 1.. as threads; each job gets a fresh [`LocalGroup`] of the ranks it uses.
    Threads(Vec<(mpsc::Sender<ThreadJob>, JoinHandle<()>)>),
    /// Worker ranks as processes; this is global rank 0.
    Processes {
        ctx: Box<RankCtx>,
        comm: Arc<dyn Communicator>,
    },
}

/// Rank 0's handle on a started group.
pub struct Group {
    runner: Runner,
    world: usize,
    info: GroupInfo,
    links: Links,
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
        return Ok(Some(Group {
            runner,
            world: spec.world,
            info: spec.info(),
            links: Links::Processes {
                ctx: Box::new(ctx),
                comm,
            },
        }));
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
            comm: LocalGroup::new(1).remove(0),
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

/// A worker process's loop: run each job rank 0 sends; any failure ends the process with an
/// error, which takes the group down (the launcher's liveness check).
fn process_worker(ctx: &RankCtx, runner: &Runner, comm: Arc<dyn Communicator>) -> Result<()> {
    let never = AtomicBool::new(false);
    while let Some(bytes) = ctx.next_message() {
        let job = match serde_json::from_slice(&bytes).context("a malformed job from rank 0")? {
            Message::Job(job) => *job,
            Message::Shutdown => break,
        };
        fault_injection(ctx.rank);
        let prep = prepare(runner.model(), &job).map_err(|e| err!("{e}"))?;
        runner
            .run(&job, &prep, comm.clone(), &never, &mut |_| {})
            .inspect_err(|e| comm.abort(&format!("rank {} failed: {e:#}", ctx.rank)))?;
    }
    Ok(())
}

/// A worker thread's loop. A panic aborts the job's group and ends the thread: the group is
/// then broken and rank 0 reports it.
fn thread_worker(rank: usize, runner: Runner, jobs: mpsc::Receiver<ThreadJob>) {
    let never = AtomicBool::new(false);
    while let Ok(tj) = jobs.recv() {
        let res = catch_unwind(AssertUnwindSafe(|| {
            fault_injection(rank);
            runner.run(&tj.job, &tj.prep, tj.comm.clone(), &never, &mut |_| {})
        }));
        match res {
            Ok(r) => {
                if let Err(e) = &r {
                    tj.comm.abort(&format!("rank {rank} failed: {e:#}"));
                }
                let _ = tj.reply.send(r);
            }
            Err(panic) => {
                let why = format!("rank {rank} panicked: {}", panic_text(&panic));
                tj.comm.abort(&why);
                let _ = tj.reply.send(Err(crate::error::Error::msg(why)));
                return;
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
        let workers = (1..world.max(1))
            .map(|h| {
                let (tx, rx) = mpsc::channel::<ThreadJob>();
                let r = runner.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("rank-{h}"))
                    .spawn(move || thread_worker(h, r, rx))
                    .context("cannot start a rank thread")?;
                Ok((tx, handle))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Group {
            runner,
            world: world.max(1),
            info: GroupInfo {
                rank_mode: "threads",
                comm: CommKind::Local.name(),
            },
            links: Links::Threads(workers),
        })
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

    /// Runs `job` on the group (rank 0 here, the others through their workers). Text streams to
    /// `on_text` as it is decoded; setting `cancel` stops every rank at the next token. The
    /// result carries the last rank's first-token logits where this process holds them.
    pub fn run(
        &self,
        job: &Job,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> std::result::Result<Generation, RunError> {
        if job.world > self.world {
            return Err(RunError::Input(format!(
                "the request asks for {} ranks but the group has {}",
                job.world, self.world
            )));
        }
        let prep = prepare(self.runner.model(), job)?;
        let ranks = prep.plan.world;
        match &self.links {
            Links::Threads(workers) => {
                let comms = LocalGroup::new(ranks);
                let (job, prep) = (Arc::new(job.clone()), Arc::new(prep));
                let mut replies = Vec::new();
                for (h, comm) in comms.iter().enumerate().skip(1) {
                    let (tx, rx) = mpsc::channel();
                    workers[h - 1]
                        .0
                        .send(ThreadJob {
                            job: job.clone(),
                            prep: prep.clone(),
                            comm: comm.clone(),
                            reply: tx,
                        })
                        .map_err(|_| {
                            comms[0].abort("a rank thread is gone");
                            RunError::Failed(format!("rank {h} is gone (it failed earlier)"))
                        })?;
                    replies.push((h, rx));
                }
                let comm0: Arc<dyn Communicator> = comms[0].clone();
                let mine = catch_unwind(AssertUnwindSafe(|| {
                    self.runner.run(&job, &prep, comm0, cancel, on_text)
                }))
                .unwrap_or_else(|p| Err(err!("rank 0 panicked: {}", panic_text(&p))));
                if let Err(e) = &mine {
                    comms[0].abort(&format!("rank 0 failed: {e:#}"));
                }
                let mut results = vec![mine];
                for (h, rx) in replies {
                    results.push(rx.recv().unwrap_or_else(|_| Err(err!("rank {h} died"))));
                }
                combine(results)
            }
            Links::Processes { ctx, comm } => {
                if ranks < self.world {
                    // The communicator spans every process: a prompt too short for all ranks
                    // runs on this one.
                    let one_rank = Job {
                        world: 1,
                        ..job.clone()
                    };
                    let planned = prep.plan.notes.clone();
                    let mut prep = prepare(self.runner.model(), &one_rank)?;
                    prep.plan.notes = planned;
                    prep.plan.notes.push(format!(
                        "the plan uses {ranks} of {} rank processes and the communicator spans them all; ran on rank 0 alone",
                        self.world
                    ));
                    let one: Arc<dyn Communicator> = LocalGroup::new(1).remove(0);
                    return self
                        .runner
                        .run(&one_rank, &prep, one, cancel, on_text)
                        .map_err(|e| RunError::Failed(format!("{e:#}")));
                }
                let run = || -> Result<Generation> {
                    let bytes = serde_json::to_vec(&Message::Job(Box::new(job.clone())))?;
                    ctx.send_to_workers(&bytes)?;
                    self.runner.run(job, &prep, comm.clone(), cancel, on_text)
                };
                catch_unwind(AssertUnwindSafe(run))
                    .unwrap_or_else(|p| Err(err!("rank 0 panicked: {}", panic_text(&p))))
                    .map_err(|e| {
                        // The workers may sit in a collective: stop them, never leave one behind.
                        comm.abort(&format!("rank 0 failed: {e:#}"));
                        ctx.kill_group();
                        RunError::Failed(format!("{e:#}"))
                    })
            }
        }
    }

    /// Stops the worker ranks (threads joined, processes told to finish and waited for).
    pub fn shutdown(self) -> Result<()> {
        match self.links {
            Links::Threads(workers) => {
                for (tx, handle) in workers {
                    drop(tx);
                    let _ = handle.join();
                }
                Ok(())
            }
            Links::Processes { ctx, comm } => {
                let bytes = serde_json::to_vec(&Message::Shutdown)?;
                ctx.send_to_workers(&bytes)?;
                drop(comm);
                ctx.finish()
            }
        }
    }
}

/// Rank 0's generation with the last rank's first-token logits; on failure the root cause, not
/// the "group aborted" echoes of the other ranks.
fn combine(results: Vec<Result<Generation>>) -> std::result::Result<Generation, RunError> {
    let mut errors = Vec::new();
    let mut gens = Vec::new();
    for r in results {
        match r {
            Ok(g) => gens.push(g),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        let pos = errors
            .iter()
            .position(|e| !e.contains("group aborted"))
            .unwrap_or(0);
        return Err(RunError::Failed(errors.swap_remove(pos)));
    }
    let last_logits = gens
        .last()
        .map(|g| g.first_logits.clone())
        .unwrap_or_default();
    let mut g = gens.swap_remove(0);
    g.first_logits = last_logits;
    Ok(g)
}
