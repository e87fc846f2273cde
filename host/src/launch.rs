//! Ranks as processes (`--ranks processes`; the default on CUDA with several ranks). `apb ...
//! --world-size N` on each node starts that node's other ranks as child processes of itself (same
//! arguments, `APB_RANK` in the environment); all ranks meet at a TCP rendezvous on the master
//! (`--master-addr`/`--master-port`), which hands every rank what its communicator needs: the
//! NCCL unique id, or every rank's address for the host communicator ([`HostComm`], TCP). The
//! connections stay open as a liveness check: when any rank exits with an error, its launcher (or
//! rank 0) kills the group and exits non-zero, so a dead peer never leaves the others hanging
//! inside a collective; a live peer that stalls is caught by the communicator's timeout
//! (`--collective-timeout`: NCCL's watchdog, the host communicator's receive deadline), which
//! fails its rank the same way.
//!
//! [`HostComm`]: apb_plugin::HostComm

use crate::error::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How the ranks of a group run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RankMode {
    /// Processes on CUDA with several ranks, threads otherwise.
    Auto,
    /// Every rank a thread of this process, on one device (tensors shared, not copied).
    Threads,
    /// One process per rank (the multi-GPU path; on the CPU: clusters and testing).
    Processes,
}

/// How rank processes exchange tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CommMode {
    /// NCCL when every rank process on a node has its own GPU, else the host communicator.
    Auto,
    /// NCCL: GPU to GPU, one GPU per rank process.
    Nccl,
    /// TCP through host memory: CPU ranks, GPUs shared by several ranks, machines without NCCL.
    Host,
}

/// The communicator a group runs over, as reported (`--json`, the server's `apb` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommKind {
    /// Threads of one process sharing tensors (`LocalGroup`).
    Local,
    /// NCCL between GPU processes.
    Nccl,
    /// TCP between processes, tensors through host memory (`HostComm`).
    Host,
}

impl CommKind {
    /// The name printed and reported.
    pub fn name(self) -> &'static str {
        match self {
            CommKind::Local => "local",
            CommKind::Nccl => "nccl",
            CommKind::Host => "host",
        }
    }
}

/// Where the ranks meet.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// How ranks run: threads (of this process, on one device), processes (one per rank: the
    /// multi-GPU path; on the CPU for clusters and testing), or auto (processes on CUDA with
    /// several ranks, else threads).
    #[arg(long, value_enum, default_value_t = RankMode::Auto)]
    pub ranks: RankMode,
    /// How rank processes exchange tensors: nccl (one GPU per process), host (TCP through host
    /// memory: CPU ranks, GPUs shared by several ranks), or auto (NCCL when every rank process on
    /// a node has its own GPU, else host).
    #[arg(long, value_enum, default_value_t = CommMode::Auto)]
    pub comm: CommMode,
    /// Number of nodes (machines); each runs `apb` with the same arguments and its --node-rank.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index in [0, nnodes); node 0 hosts global rank 0 and the rendezvous.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, reachable from every node.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// TCP port of the rendezvous on node 0 (default: a free port on one node; 29511 with
    /// --nnodes > 1).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds a rank may wait in one collective for a stalled or dead peer (NCCL: once the
    /// collective is the oldest on the rank's stream); then the whole group exits with an error.
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
    /// The NCCL group id from rank 0 (NCCL groups).
    pub nccl_id: [u8; 128],
    /// The communicator the group runs over.
    pub comm: CommKind,
    /// Every rank's host-communicator address, in rank order (host groups).
    pub addrs: Vec<SocketAddr>,
    /// This rank's host-communicator listener, until the communicator takes it.
    mesh: Mutex<Option<TcpListener>>,
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
/// How long a failed group's server keeps answering (the cause, to requests and probes) before
/// its process exits.
pub const FAILURE_GRACE: Duration = Duration::from_secs(2);

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
    /// Whether `world` ranks on `cuda` (or the CPU) run as processes.
    pub fn processes(&self, world: usize, cuda: bool) -> bool {
        world > 1
            && match self.ranks {
                RankMode::Auto => cuda,
                RankMode::Threads => false,
                RankMode::Processes => true,
            }
    }

    /// The communicator of `world` ranks on `cuda` (or the CPU); `gpus`: GPUs on this node.
    pub fn comm_kind(&self, world: usize, cuda: bool, gpus: usize) -> CommKind {
        if !self.processes(world, cuda) {
            return CommKind::Local;
        }
        match self.comm {
            CommMode::Nccl => CommKind::Nccl,
            CommMode::Host => CommKind::Host,
            CommMode::Auto if cuda && world / self.nnodes.max(1) <= gpus => CommKind::Nccl,
            CommMode::Auto => CommKind::Host,
        }
    }

    /// Checks the flags against `world` ranks on `cuda` (or the CPU).
    pub fn validate(&self, world: usize, cuda: bool) -> Result<()> {
        let processes = self.processes(world, cuda);
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
        if self.nnodes > 1 && self.master_port == Some(0) {
            bail!("--master-port 0 picks a free port, which other nodes cannot know: give one with --nnodes > 1");
        }
        if self.nnodes > 1 && !processes {
            bail!("--nnodes > 1 needs rank processes: --world-size > 1 with --ranks processes (or --device cuda)");
        }
        if !processes && world > 1 && self.comm != CommMode::Auto {
            bail!(
                "--comm is for rank processes; --ranks threads share tensors in one process (pass --ranks processes)"
            );
        }
        if self.comm == CommMode::Nccl && !cuda {
            bail!("--comm nccl needs --device cuda (CPU rank processes use --comm host)");
        }
        if self.comm == CommMode::Nccl && !cfg!(feature = "cuda") {
            bail!("--comm nccl needs a CUDA build: rebuild with `cargo build --release --features cuda`");
        }
        Ok(())
    }
}

/// Whether this process is a rank process that another one started, or another node's
/// launcher: it serves rank 0's jobs and has no console of its own (no HTTP server either).
pub fn is_worker(args: &LaunchArgs) -> bool {
    std::env::var_os("APB_RANK").is_some() || args.node_rank > 0
}

/// GPUs on this node (0 without a CUDA build or driver).
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// Rank processes share this node's cores: each gets max(1, cores / ranks on the node) compute
/// threads (candle's and rayon's `RAYON_NUM_THREADS`, which the children inherit) unless the
/// variable is already set. Without it 4 processes on 2 cores each start 2 threads and
/// oversubscribe the cores (bench/results/cpu-rank-processes-2026-12-05.md). Changes the
/// environment: call it before other threads start (the `apb` binary does, first thing).
pub fn limit_threads(per_node: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Set before the model loads and before any compute thread pool starts.
    std::env::set_var("RAYON_NUM_THREADS", (cores / per_node).max(1).to_string());
}

/// Sets `RAYON_NUM_THREADS` to candle's default thread count unless set. Without it candle
/// looks the count up again for every matmul, reading `/proc/cpuinfo` each time: ~12 % of a
/// CPU decode step's time. Changes the environment: call it before other threads start.
pub fn fix_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Kills this node's started rank processes when dropped before [`disarm`](Self::disarm).
struct KillOnError(Option<Arc<Group>>);

impl KillOnError {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnError {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            if let Ok(mut cs) = g.children.lock() {
                for c in cs.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }
}

/// Reads a length-prefixed string off a rendezvous connection.
fn read_str(s: &mut TcpStream) -> std::io::Result<String> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut b = vec![0u8; u16::from_le_bytes(len) as usize];
    s.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn put_str(out: &mut Vec<u8>, v: &str) {
    out.extend((v.len() as u16).to_le_bytes());
    out.extend(v.as_bytes());
}

/// Joins (or, on a node's first process, launches) a group of `world` rank processes, which
/// talk over `comm`.
pub fn join(args: &LaunchArgs, world: usize, comm: CommKind) -> Result<RankCtx> {
    let per_node = world / args.nnodes;
    limit_threads(per_node);
    let group = Arc::new(Group {
        children: Mutex::new(Vec::new()),
        finishing: AtomicBool::new(false),
        peers: Mutex::new(Vec::new()),
    });
    let (rank, local_rank) = match std::env::var("APB_RANK") {
        Ok(r) => {
            let rank: usize = r.parse().context("APB_RANK")?;
            (rank, rank % per_node)
        }
        Err(_) => (args.node_rank * per_node, 0),
    };
    // The launcher on node 0 picks the port unless told (0 or no --master-port on one node);
    // the ranks it starts learn it from it.
    let port = match (std::env::var("APB_MASTER_PORT"), args.master_port) {
        (Ok(p), _) => p.parse().context("APB_MASTER_PORT")?,
        (Err(_), Some(p)) => p,
        (Err(_), None) if args.nnodes == 1 => 0,
        (Err(_), None) => 29511,
    };
    // Rank 0 listens before anyone is started, so children can connect at once.
    let (listener, port) = if rank == 0 {
        let at = format!("{}:{port}", args.master_addr);
        let l = TcpListener::bind(&at).with_context(|| {
            format!(
                "cannot listen on {at} for the rank rendezvous (port in use? pass --master-port)"
            )
        })?;
        let port = l.local_addr()?.port();
        (Some(l), port)
    } else {
        (None, port)
    };
    let master = format!("{}:{port}", args.master_addr);
    // The host communicator's listener, on the address this rank is reached at (rank 0: the
    // master address; the others: the address their rendezvous connection leaves from).
    let bind_mesh = |ip: std::net::IpAddr| -> Result<TcpListener> {
        TcpListener::bind((ip, 0))
            .with_context(|| format!("rank {rank}: cannot listen on {ip} for the other ranks"))
    };
    let mesh0 = if rank == 0 && comm == CommKind::Host {
        let ip = (args.master_addr.as_str(), 0)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .with_context(|| format!("--master-addr {} does not resolve", args.master_addr))?
            .ip();
        Some(bind_mesh(ip)?)
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
                .env("APB_MASTER_PORT", port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("cannot start rank {r}"))?;
            eprintln!("started rank {r} (pid {})", child.id());
            group.children.lock().expect("children").push(child);
        }
        // Watchdog: any failed child takes the group down.
        let g = group.clone();
        let first = args.node_rank * per_node + 1;
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let mut failed = None;
            if let Ok(mut cs) = g.children.try_lock() {
                for (i, c) in cs.iter_mut().enumerate() {
                    if let Ok(Some(st)) = c.try_wait() {
                        if !st.success() {
                            failed = Some(format!(
                                "rank {} (pid {}) exited with {st}",
                                first + i,
                                c.id()
                            ));
                        }
                    }
                }
            }
            if let Some(why) = failed {
                kill_all_and_exit(&g, &why);
            }
        });
    }
    // From here on an error must not leave the started ranks waiting for a rendezvous that
    // will not come.
    let stop_children = KillOnError(Some(group.clone()));
    let (nccl_id, addrs, mesh) = if let Some(listener) = listener {
        let mesh = mesh0;
        let id = if comm == CommKind::Nccl {
            new_id()?
        } else {
            [0u8; 128]
        };
        let mut addrs = vec![String::new(); world];
        if let Some(m) = &mesh {
            addrs[0] = m.local_addr()?.to_string();
        }
        let deadline = Instant::now() + RENDEZVOUS_TIMEOUT;
        listener.set_nonblocking(true)?;
        let mut joined: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut missing = world - 1;
        while missing > 0 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    let mut b = [0u8; 9];
                    s.read_exact(&mut b)
                        .context("rendezvous: reading a rank number")?;
                    let r = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
                    if r >= world || r == 0 || joined[r].is_some() {
                        bail!("rendezvous: unexpected rank {r} (world {world})");
                    }
                    if b[8] != comm as u8 {
                        bail!(
                            "rendezvous: rank {r} wants another communicator than rank 0 ({}); give every node the same --comm",
                            comm.name()
                        );
                    }
                    addrs[r] = read_str(&mut s).context("rendezvous: reading an address")?;
                    s.set_read_timeout(None)?;
                    joined[r] = Some(s);
                    missing -= 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|r| joined[*r].is_none()).collect();
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
        // Everyone has joined: hand out the id and the address table.
        let mut reply = id.to_vec();
        for a in &addrs {
            put_str(&mut reply, a);
        }
        for s in joined.into_iter().flatten() {
            let mut s = s;
            s.write_all(&reply)?;
            group.peers.lock().expect("peers").push(s);
        }
        (id, addrs, mesh)
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
        // Listen where rank 0 reaches this node: the address this connection leaves from.
        let mesh = match comm {
            CommKind::Host => Some(bind_mesh(s.local_addr()?.ip())?),
            _ => None,
        };
        let mut hello = (rank as u64).to_le_bytes().to_vec();
        hello.push(comm as u8);
        let mine = match &mesh {
            Some(m) => m.local_addr()?.to_string(),
            None => String::new(),
        };
        put_str(&mut hello, &mine);
        s.write_all(&hello)?;
        let mut id = [0u8; 128];
        s.read_exact(&mut id)
            .context("rendezvous: reading the group's id (did rank 0 fail?)")?;
        let addrs = (0..world)
            .map(|_| read_str(&mut s))
            .collect::<std::io::Result<Vec<_>>>()
            .context("rendezvous: reading the ranks' addresses")?;
        group.peers.lock().expect("peers").push(s.try_clone()?);
        (id, addrs, mesh)
    };
    let addrs = if comm == CommKind::Host {
        addrs
            .iter()
            .map(|a| a.parse::<SocketAddr>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .context("rendezvous: a rank's address")?
    } else {
        vec![]
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
    for (i, mut s) in peers.into_iter().enumerate() {
        let g = group.clone();
        let tx = tx.clone();
        // Rank 0 holds ranks 1.. in order; the others hold rank 0.
        let peer = if rank == 0 { i + 1 } else { 0 };
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
                kill_all_and_exit(
                    &g,
                    &format!("rank {peer} closed its connection to rank {rank} without finishing: it exited, was killed or its node failed"),
                );
            }
        });
    }
    drop(tx);
    stop_children.disarm();
    Ok(RankCtx {
        rank,
        local_rank,
        world,
        nccl_id,
        comm,
        addrs,
        mesh: Mutex::new(mesh),
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
    bail!("--comm nccl needs a CUDA build: rebuild with `cargo build --release --features cuda`")
}

/// This rank's communicator on `device`, watched: a collective that stalls past
/// `--collective-timeout` fails the group (NCCL: aborts it and stops every rank; host: every
/// rank's collective returns an error, and the ranks exit with it).
pub fn communicator(
    ctx: &RankCtx,
    device: &candle_core::Device,
) -> Result<Arc<dyn apb_plugin::Communicator>> {
    let c: Arc<dyn apb_plugin::Communicator> = match ctx.comm {
        CommKind::Host => {
            let listener =
                ctx.mesh.lock().expect("mesh").take().ok_or_else(|| {
                    crate::error::err!("the host communicator is already connected")
                })?;
            let c = apb_plugin::HostComm::connect(
                ctx.rank,
                &ctx.addrs,
                listener,
                device,
                ctx.collective_timeout,
            )?;
            #[cfg(feature = "fault-injection")]
            if let Some(n) = stall_collective(ctx.rank) {
                c.stall_at_collective(n);
            }
            Arc::new(c)
        }
        CommKind::Nccl => nccl(ctx, device)?,
        CommKind::Local => crate::error::bail!("a rank process needs --comm nccl or host"),
    };
    // Fault injection for the failure tests (builds with the `fault-injection` feature only):
    // this rank stays alive but never reaches a collective, as a hung peer would, or dies as a
    // crashed one would.
    #[cfg(feature = "fault-injection")]
    inject_rank_fault(ctx.rank);
    Ok(c)
}

#[cfg(feature = "cuda")]
fn nccl(ctx: &RankCtx, device: &candle_core::Device) -> Result<Arc<dyn apb_plugin::Communicator>> {
    let group = ctx.group.clone();
    let c = apb_plugin::nccl::NcclComm::new(device, ctx.rank, ctx.world, ctx.nccl_id)
        .map_err(|e| crate::error::err!("rank {}: {e}", ctx.rank))?
        .watch(ctx.collective_timeout, move |why| {
            kill_all_and_exit(&group, &why)
        });
    Ok(Arc::new(c))
}

#[cfg(not(feature = "cuda"))]
fn nccl(
    _ctx: &RankCtx,
    _device: &candle_core::Device,
) -> Result<Arc<dyn apb_plugin::Communicator>> {
    bail!("--comm nccl needs a CUDA build: rebuild with `cargo build --release --features cuda`")
}

/// `APB_FAULT_STALL_COLLECTIVE=r:n`: rank `r` hangs at its n-th collective (host communicator).
#[cfg(feature = "fault-injection")]
fn stall_collective(rank: usize) -> Option<u64> {
    let v = std::env::var("APB_FAULT_STALL_COLLECTIVE").ok()?;
    let (r, n) = v.split_once(':')?;
    (r.parse::<usize>().ok()? == rank).then(|| n.parse().ok())?
}

/// `APB_FAULT_STALL_RANK=r` / `APB_FAULT_EXIT_RANK=r`: rank `r` hangs or exits.
#[cfg(feature = "fault-injection")]
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
