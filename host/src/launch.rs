//! One process per GPU. `apb ... --world-size N --device cuda` on each node starts that node's
//! other ranks as child processes of itself (same arguments, `APB_RANK` in the environment); all
//! ranks meet at a TCP rendezvous on the master (`--master-addr`/`--master-port`), where global
//! rank 0 hands out the NCCL unique id. The connections stay open as a liveness check: when any
//! rank exits with an error, its launcher (or rank 0) kills the group and exits non-zero, so a
//! dead peer never leaves the others hanging inside a collective; a live peer that stalls is
//! caught by the NCCL watchdog (`--collective-timeout`), which makes its rank exit the same way.

use crate::error::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where the ranks meet.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Number of nodes (machines); each runs `apb` with the same arguments and its --node-rank.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index in [0, nnodes); node 0 hosts global rank 0 and the rendezvous.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, reachable from every node.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// TCP port of the rendezvous on node 0.
    #[arg(long, default_value_t = 29511)]
    pub master_port: u16,
    /// Seconds a collective may stay unfinished once it is the oldest one on a rank's stream (a
    /// stalled or dead peer); then the rank aborts NCCL and the whole group exits with an error.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub collective_timeout: f64,
}

/// This process's place in the group.
pub struct RankCtx {
    /// This rank, `0..world`.
    pub rank: usize,
    /// This rank's GPU on its node.
    pub local_rank: usize,
    /// Ranks in the group.
    pub world: usize,
    /// The NCCL group id from rank 0.
    pub nccl_id: [u8; 128],
    /// A collective that waits longer fails the group.
    pub collective_timeout: Duration,
    group: Arc<Group>,
    /// Messages from rank 0 (worker ranks): job frames read off the rendezvous connection.
    messages: Option<mpsc::Receiver<Vec<u8>>>,
}

struct Group {
    children: Mutex<Vec<Child>>,
    finishing: AtomicBool,
    peers: Mutex<Vec<TcpStream>>,
}

const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// Frame tags on the rendezvous connections: `DONE` (one byte, a rank finished normally) and
/// `MESSAGE` (u64 LE length + bytes, rank 0 to the others: a job).
const DONE: u8 = 1;
const MESSAGE: u8 = 2;

impl RankCtx {
    /// Rank 0: sends `bytes` to every other rank of the group.
    pub fn send_to_workers(&self, bytes: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(bytes.len() + 9);
        frame.push(MESSAGE);
        frame.extend((bytes.len() as u64).to_le_bytes());
        frame.extend(bytes);
        for s in self.group.peers.lock().expect("peers").iter_mut() {
            s.write_all(&frame)
                .context("sending a job to a rank process (has it exited?)")?;
        }
        Ok(())
    }

    /// Rank 0 after a failure of the group: kills this node's other rank processes (never a
    /// normal finish), so none is left holding a GPU; the launcher's watchdog then exits non-zero.
    pub fn kill_group(&self) {
        if let Ok(mut cs) = self.group.children.lock() {
            for c in cs.iter_mut() {
                let _ = c.kill();
            }
        }
    }

    /// Worker ranks: the next message from rank 0 (None once rank 0 finished).
    pub fn next_message(&self) -> Option<Vec<u8>> {
        self.messages.as_ref()?.recv().ok()
    }

    /// Normal end: tells the rendezvous this rank is done, then (launchers) waits for the
    /// node's children and reports the first failure.
    pub fn finish(self) -> Result<()> {
        self.group.finishing.store(true, Ordering::SeqCst);
        for s in self.group.peers.lock().expect("peers").iter_mut() {
            let _ = s.write_all(&[DONE]);
        }
        let mut children = std::mem::take(&mut *self.group.children.lock().expect("children"));
        for c in children.iter_mut() {
            let st = c.wait().context("waiting for a rank process")?;
            if !st.success() {
                bail!("a rank process exited with {st}");
            }
        }
        Ok(())
    }
}

/// Called once when the group fails, before its processes are stopped (the server answers the
/// requests in flight and turns unhealthy); the exit follows after [`FAILURE_GRACE`].
type FailureHook = Box<dyn Fn(&str) + Send + Sync>;
static FAILURE_HOOK: OnceLock<FailureHook> = OnceLock::new();
const FAILURE_GRACE: Duration = Duration::from_secs(2);

/// Registers what this process does when its group fails, before exiting non-zero.
pub fn on_group_failure(hook: impl Fn(&str) + Send + Sync + 'static) {
    let _ = FAILURE_HOOK.set(Box::new(hook));
}

fn kill_all_and_exit(group: &Group, why: &str) -> ! {
    eprintln!("error: {why}; stopping all ranks");
    if let Some(hook) = FAILURE_HOOK.get() {
        hook(why);
        std::thread::sleep(FAILURE_GRACE);
    }
    if let Ok(mut cs) = group.children.try_lock() {
        for c in cs.iter_mut() {
            let _ = c.kill();
        }
    }
    std::process::exit(1);
}

impl LaunchArgs {
    /// Checks the flags against `world` ranks; `processes`: whether ranks will be processes (GPUs).
    pub fn validate(&self, world: usize, processes: bool) -> Result<()> {
        if self.nnodes == 0 || !world.is_multiple_of(self.nnodes) {
            bail!(
                "--world-size {world} must be a multiple of --nnodes {}",
                self.nnodes
            );
        }
        if self.node_rank >= self.nnodes {
            bail!(
                "--node-rank {} must be below --nnodes {}",
                self.node_rank,
                self.nnodes
            );
        }
        if !(self.collective_timeout.is_finite() && self.collective_timeout > 0.0) {
            bail!(
                "--collective-timeout must be a positive number of seconds, got {}",
                self.collective_timeout
            );
        }
        if self.nnodes > 1 && !processes {
            bail!("--nnodes > 1 needs one process per GPU: --device cuda and --world-size > 1");
        }
        Ok(())
    }
}

/// Joins (or, on a node's first process, launches) a group of `world` ranks.
pub fn join(args: &LaunchArgs, world: usize) -> Result<RankCtx> {
    args.validate(world, true)?;
    let per_node = world / args.nnodes;
    let group = Arc::new(Group {
        children: Mutex::new(Vec::new()),
        finishing: AtomicBool::new(false),
        peers: Mutex::new(Vec::new()),
    });
    let master = format!("{}:{}", args.master_addr, args.master_port);
    let (rank, local_rank) = match std::env::var("APB_RANK") {
        Ok(r) => {
            let rank: usize = r.parse().context("APB_RANK")?;
            (rank, rank % per_node)
        }
        Err(_) => (args.node_rank * per_node, 0),
    };
    // Rank 0 listens before anyone is started, so children can connect at once.
    let listener = if rank == 0 {
        Some(TcpListener::bind(&master).with_context(|| {
            format!("cannot listen on {master} for the rank rendezvous (port in use? pass --master-port)")
        })?)
    } else {
        None
    };
    if local_rank == 0 {
        let exe = std::env::current_exe().context("cannot find the apb executable")?;
        let argv: Vec<String> = std::env::args().skip(1).collect();
        for lr in 1..per_node {
            let r = args.node_rank * per_node + lr;
            let mut cmd = Command::new(&exe);
            // Their own process group: a terminal's Ctrl-C reaches the launcher alone, which then
            // shuts the group down in order (a server finishes its requests first).
            #[cfg(unix)]
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            let child = cmd
                .args(&argv)
                .env("APB_RANK", r.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("cannot start rank {r}"))?;
            group.children.lock().expect("children").push(child);
        }
        // Watchdog: any failed child takes the group down.
        let g = group.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let mut failed = None;
            if let Ok(mut cs) = g.children.try_lock() {
                for c in cs.iter_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        if !st.success() {
                            failed = Some(st);
                        }
                    }
                }
            }
            if let Some(st) = failed {
                kill_all_and_exit(&g, &format!("a rank process exited with {st}"));
            }
        });
    }
    let nccl_id = if let Some(listener) = listener {
        let id = new_id()?;
        let deadline = Instant::now() + RENDEZVOUS_TIMEOUT;
        listener.set_nonblocking(true)?;
        let mut joined = vec![false; world];
        joined[0] = true;
        while joined.iter().any(|j| !j) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    let mut b = [0u8; 8];
                    s.read_exact(&mut b)
                        .context("rendezvous: reading a rank number")?;
                    let r = u64::from_le_bytes(b) as usize;
                    if r >= world || joined[r] {
                        bail!("rendezvous: unexpected rank {r} (world {world})");
                    }
                    joined[r] = true;
                    s.write_all(&id)?;
                    group.peers.lock().expect("peers").push(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<usize> = (0..world).filter(|r| !joined[*r]).collect();
                        kill_all_and_exit(
                            &group,
                            &format!(
                                "ranks {missing:?} did not join within {RENDEZVOUS_TIMEOUT:?}"
                            ),
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context("rendezvous accept"),
            }
        }
        id
    } else {
        let deadline = Instant::now() + RENDEZVOUS_TIMEOUT;
        let mut s = loop {
            match TcpStream::connect(&master) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    bail!("rank {rank} cannot reach the rendezvous at {master}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        s.write_all(&(rank as u64).to_le_bytes())?;
        let mut id = [0u8; 128];
        s.read_exact(&mut id)
            .context("rendezvous: reading the NCCL id")?;
        group.peers.lock().expect("peers").push(s.try_clone()?);
        id
    };
    // Liveness: a peer connection that closes without the "done" byte means that side died. On
    // worker ranks the same reader hands rank 0's messages to `next_message`.
    let peers: Vec<TcpStream> = group
        .peers
        .lock()
        .expect("peers")
        .iter()
        .map(|s| s.try_clone())
        .collect::<std::io::Result<_>>()?;
    let (tx, rx) = mpsc::channel();
    for mut s in peers {
        let g = group.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let done = loop {
                let mut tag = [0u8; 1];
                match s.read_exact(&mut tag) {
                    Ok(()) if tag[0] == DONE => break true,
                    Ok(()) if tag[0] == MESSAGE => {
                        let mut len = [0u8; 8];
                        let mut body = Vec::new();
                        let ok = s.read_exact(&mut len).is_ok() && {
                            body.resize(u64::from_le_bytes(len) as usize, 0);
                            s.read_exact(&mut body).is_ok()
                        };
                        if !ok {
                            break false;
                        }
                        let _ = tx.send(body);
                    }
                    _ => break false,
                }
            };
            drop(tx);
            if !done && !g.finishing.load(Ordering::SeqCst) {
                kill_all_and_exit(&g, &format!("rank {rank} lost a peer of the group"));
            }
        });
    }
    drop(tx);
    Ok(RankCtx {
        rank,
        local_rank,
        world,
        nccl_id,
        collective_timeout: Duration::from_secs_f64(args.collective_timeout),
        group,
        messages: (rank != 0).then_some(rx),
    })
}

#[cfg(feature = "cuda")]
fn new_id() -> Result<[u8; 128]> {
    Ok(apb_plugin::nccl::unique_id()?)
}

#[cfg(not(feature = "cuda"))]
fn new_id() -> Result<[u8; 128]> {
    bail!("ranks as processes need GPUs: build with --features cuda")
}

/// The NCCL communicator of this rank on `device`, watched: a collective that stalls past
/// `--collective-timeout` aborts NCCL and stops the group with an error.
#[cfg(feature = "cuda")]
pub fn communicator(
    ctx: &RankCtx,
    device: &candle_core::Device,
) -> Result<Arc<dyn apb_plugin::Communicator>> {
    let group = ctx.group.clone();
    let c = apb_plugin::nccl::NcclComm::new(device, ctx.rank, ctx.world, ctx.nccl_id)
        .map_err(|e| crate::error::err!("rank {}: {e}", ctx.rank))?
        .watch(ctx.collective_timeout, move |why| {
            kill_all_and_exit(&group, &why)
        });
    // Fault injection for the device checks (scripts/device-smoke.sh; builds with the
    // `fault-injection` feature only): this rank stays alive but never reaches a collective, as a
    // hung peer would, or dies as a crashed one would.
    #[cfg(feature = "fault-injection")]
    inject_rank_fault(ctx.rank);
    Ok(Arc::new(c))
}

/// `APB_FAULT_STALL_RANK=r` / `APB_FAULT_EXIT_RANK=r`: rank `r` hangs or exits.
#[cfg(all(feature = "cuda", feature = "fault-injection"))]
fn inject_rank_fault(rank: usize) {
    let me = Some(rank.to_string());
    if std::env::var("APB_FAULT_STALL_RANK").ok() == me {
        eprintln!("rank {rank}: APB_FAULT_STALL_RANK set, stalling");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if std::env::var("APB_FAULT_EXIT_RANK").ok() == me {
        eprintln!("rank {rank}: APB_FAULT_EXIT_RANK set, exiting");
        std::process::exit(3);
    }
}

#[cfg(not(feature = "cuda"))]
/// Without CUDA there are no process ranks: a clear error.
pub fn communicator(
    _ctx: &RankCtx,
    _device: &candle_core::Device,
) -> Result<Arc<dyn apb_plugin::Communicator>> {
    bail!("ranks as processes need GPUs: build with --features cuda")
}
