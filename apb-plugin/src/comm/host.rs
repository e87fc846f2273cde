//! Rank processes over TCP (one node or several): every pair of ranks holds one connection, and a
//! reader thread per peer drains it into an inbox keyed by (peer, collective number). Sends never
//! wait for the receiver's compute, and a transfer arrives while this rank computes (the receive
//! half of [`Communicator::ring_pass`] and [`Communicator::all_gather_pending`] is in flight
//! until [`Pending::wait`]). Tensors travel as raw bytes through host memory: CUDA tensors are
//! copied out and back, so GPUs that share a machine (or have no NCCL) still form a group.
//!
//! Failure model, as on NCCL's path: a peer that dies closes its sockets and fails every
//! collective of this rank at once; a peer that stalls fails them after the timeout. Either way
//! this rank [`aborts`](Communicator::abort): it shuts its connections down without a goodbye, so
//! every other rank fails at once too instead of waiting out its own timeout. A rank that is
//! dropped after its last collective says goodbye first: the others keep working with what it
//! sent.

use super::{Communicator, Pending};
use crate::{Error, Result};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One rank of a group of processes connected over TCP.
pub struct HostComm {
    inner: Arc<Inner>,
}

struct Inner {
    rank: usize,
    world: usize,
    /// Where tensors received without a tensor of ours to follow (broadcast, barrier) are put.
    device: Device,
    timeout: Duration,
    /// Connections by peer rank (None: this rank).
    links: Vec<Option<Link>>,
    shared: Arc<Shared>,
    /// Collectives started here; every rank numbers them alike (same calls, same order).
    seq: AtomicU64,
    /// Fault injection: this rank hangs when it reaches this collective (1-based).
    stall_at: AtomicU64,
}

/// One peer's connection.
struct Link {
    /// The write half; one frame at a time.
    out: Mutex<TcpStream>,
    /// A handle to shut it down while a writer may be stuck in it.
    ctl: TcpStream,
}

/// What the reader threads share with the rank.
struct Shared {
    state: Mutex<State>,
    arrived: Condvar,
    closing: AtomicBool,
}

#[derive(Default)]
struct State {
    /// (sender, collective number) → what it sent (None: a frame with no tensor).
    inbox: HashMap<(usize, u64), Option<Blob>>,
    /// Peers that said goodbye (finished normally): receives from them fail once their frames
    /// are used up (they sent all we need from them).
    left: HashMap<usize, String>,
    aborted: Option<String>,
}

/// What a reader thread gets off a connection.
enum Frame {
    /// Collective `seq`'s contribution (None: nothing to send, e.g. a barrier).
    Data(u64, Option<Blob>),
    /// The peer finished normally.
    Bye,
    /// The peer's group failed, for this reason.
    Abort(String),
}

/// A tensor as bytes in host memory.
struct Blob {
    dtype: DType,
    dims: Vec<usize>,
    bytes: Vec<u8>,
}

const MAGIC: &[u8; 4] = b"APB1";
/// Frame tags: no tensor, a tensor, goodbye (the sender finished normally), abort (the group
/// failed; the reason follows as u32 length + UTF-8).
const TAG_EMPTY: u8 = 0;
const TAG_TENSOR: u8 = 1;
const TAG_BYE: u8 = 2;
const TAG_ABORT: u8 = 3;
/// How long ranks wait for each other to connect (they start and load at different speeds).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(300);
const DTYPES: [DType; 9] = [
    DType::U8,
    DType::U32,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::BF16,
    DType::F16,
    DType::F32,
    DType::F64,
];
/// A frame's header says at most this many dimensions (a stray connection cannot make us
/// allocate absurd shapes).
const MAX_DIMS: usize = 8;

fn comm_err(what: impl Into<String>) -> Error {
    Error::Comm(what.into())
}

/// # Safety
/// `T` must be plain old data without padding (candle's CPU element types are).
unsafe fn raw<T>(s: &[T]) -> &[u8] {
    std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s))
}

impl Blob {
    /// `t`'s elements in host memory (copied from the GPU for CUDA tensors).
    fn of(t: &Tensor) -> Result<Self> {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let (st, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*st else {
            return Err(comm_err("a host copy that is not in host memory"));
        };
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| comm_err("a tensor that is not contiguous"))?;
        // SAFETY: every arm is one of candle's element types (integers and floats, no padding).
        let bytes = unsafe {
            match cpu {
                CpuStorage::U8(v) => raw(&v[a..b]),
                CpuStorage::U32(v) => raw(&v[a..b]),
                CpuStorage::I16(v) => raw(&v[a..b]),
                CpuStorage::I32(v) => raw(&v[a..b]),
                CpuStorage::I64(v) => raw(&v[a..b]),
                CpuStorage::BF16(v) => raw(&v[a..b]),
                CpuStorage::F16(v) => raw(&v[a..b]),
                CpuStorage::F32(v) => raw(&v[a..b]),
                CpuStorage::F64(v) => raw(&v[a..b]),
                _ => {
                    return Err(comm_err(format!(
                        "the host communicator does not carry {:?} tensors",
                        t.dtype()
                    )))
                }
            }
        }
        .to_vec();
        Ok(Self {
            dtype: t.dtype(),
            dims: t.dims().to_vec(),
            bytes,
        })
    }

    fn tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_raw_buffer(
            &self.bytes,
            self.dtype,
            &self.dims,
            device,
        )?)
    }

    /// Frame: seq u64, tag u8, dtype u8, ndim u8, then for a tensor dims u64 × ndim, byte count
    /// u64, bytes.
    fn header(seq: u64, blob: Option<&Blob>) -> Vec<u8> {
        let mut h = Vec::with_capacity(64);
        h.extend(seq.to_le_bytes());
        match blob {
            None => h.extend([TAG_EMPTY, 0, 0]),
            Some(b) => {
                let code = DTYPES.iter().position(|d| *d == b.dtype).unwrap_or(0) as u8;
                h.extend([TAG_TENSOR, code, b.dims.len() as u8]);
                for d in &b.dims {
                    h.extend((*d as u64).to_le_bytes());
                }
                h.extend((b.bytes.len() as u64).to_le_bytes());
            }
        }
        h
    }

    /// The next frame: a tensor (or none), a goodbye, or an abort with its reason.
    fn read(r: &mut impl Read) -> std::io::Result<Frame> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut u64b = [0u8; 8];
        r.read_exact(&mut u64b)?;
        let seq = u64::from_le_bytes(u64b);
        let mut tag = [0u8; 3];
        r.read_exact(&mut tag)?;
        match tag[0] {
            TAG_EMPTY => return Ok(Frame::Data(seq, None)),
            TAG_BYE => return Ok(Frame::Bye),
            TAG_ABORT => {
                let mut len = [0u8; 4];
                r.read_exact(&mut len)?;
                let mut why = vec![0u8; (u32::from_le_bytes(len) as usize).min(1 << 16)];
                r.read_exact(&mut why)?;
                return Ok(Frame::Abort(String::from_utf8_lossy(&why).into_owned()));
            }
            TAG_TENSOR => {}
            _ => return Err(bad("unknown frame tag")),
        }
        let dtype = *DTYPES
            .get(tag[1] as usize)
            .ok_or_else(|| bad("unknown dtype in a frame"))?;
        let ndim = tag[2] as usize;
        if ndim > MAX_DIMS {
            return Err(bad("too many dimensions in a frame"));
        }
        let mut dims = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            r.read_exact(&mut u64b)?;
            dims.push(u64::from_le_bytes(u64b) as usize);
        }
        r.read_exact(&mut u64b)?;
        let len = u64::from_le_bytes(u64b) as usize;
        let want = dims
            .iter()
            .try_fold(dtype.size_in_bytes(), |a, d| a.checked_mul(*d));
        if want != Some(len) {
            return Err(bad("a frame's byte count does not match its shape"));
        }
        let mut bytes = vec![0u8; len];
        r.read_exact(&mut bytes)?;
        Ok(Frame::Data(seq, Some(Blob { dtype, dims, bytes })))
    }
}

impl HostComm {
    /// Connects rank `rank` to every other rank of `addrs` (every rank's listening address, in
    /// rank order, as the host's rendezvous published them; `listener` is this rank's). Rank r
    /// dials the lower ranks and accepts the higher ones. Tensors received where no tensor of
    /// this rank's gives the device (broadcast) are put on `device`. A collective that waits
    /// longer than `timeout` for a peer fails the group. Ranks wait up to 5 minutes for each
    /// other to connect.
    pub fn connect(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        device: &Device,
        timeout: Duration,
    ) -> Result<Self> {
        let world = addrs.len();
        if rank >= world {
            return Err(comm_err(format!("rank {rank} of a group of {world}")));
        }
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let hello = |peer: usize| {
            let mut h = MAGIC.to_vec();
            h.extend((peer as u64).to_le_bytes());
            h.extend((world as u64).to_le_bytes());
            h
        };
        for (peer, addr) in addrs.iter().enumerate().take(rank) {
            let mut s = loop {
                match TcpStream::connect_timeout(addr, Duration::from_secs(5)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(comm_err(format!(
                            "rank {rank} cannot reach rank {peer} at {addr}: {e}"
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            s.write_all(&hello(rank))
                .map_err(|e| comm_err(format!("rank {rank} → rank {peer}: {e}")))?;
            streams[peer] = Some(s);
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| comm_err(format!("listener: {e}")))?;
        while streams.iter().skip(rank + 1).any(|s| s.is_none()) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    // A connection that is not one of ours (or breaks off) is dropped.
                    let mut h = [0u8; 20];
                    let ok = s.set_nonblocking(false).is_ok()
                        && s.set_read_timeout(Some(Duration::from_secs(10))).is_ok()
                        && s.read_exact(&mut h).is_ok();
                    if !ok {
                        continue;
                    }
                    let peer = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")) as usize;
                    let their_world = u64::from_le_bytes(h[12..].try_into().expect("8 bytes"));
                    if &h[..4] != MAGIC
                        || their_world != world as u64
                        || peer <= rank
                        || peer >= world
                        || streams[peer].is_some()
                    {
                        // Not one of ours (or a duplicate): drop it and keep waiting.
                        continue;
                    }
                    streams[peer] = Some(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<usize> = (rank + 1..world)
                            .filter(|p| streams[*p].is_none())
                            .collect();
                        return Err(comm_err(format!(
                            "rank {rank}: ranks {missing:?} never connected"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(comm_err(format!("rank {rank}: accept: {e}"))),
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
            closing: AtomicBool::new(false),
        });
        let mut links = Vec::with_capacity(world);
        for (peer, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                links.push(None);
                continue;
            };
            let io = |e: std::io::Error| comm_err(format!("rank {rank} ↔ rank {peer}: {e}"));
            s.set_nodelay(true).map_err(io)?;
            s.set_read_timeout(None).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            let reader = s.try_clone().map_err(io)?;
            let ctl = s.try_clone().map_err(io)?;
            let sh = shared.clone();
            std::thread::Builder::new()
                .name(format!("comm-rx-{peer}"))
                .spawn(move || read_loop(sh, rank, peer, reader))
                .map_err(io)?;
            links.push(Some(Link {
                out: Mutex::new(s),
                ctl,
            }));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                rank,
                world,
                device: device.clone(),
                timeout,
                links,
                shared,
                seq: AtomicU64::new(0),
                stall_at: AtomicU64::new(0),
            }),
        })
    }

    /// Fault injection for the host's failure tests: this rank hangs, alive, when it reaches
    /// its `n`-th collective (1-based; 0: never), as a stuck peer would. Inert unless called: the
    /// host calls it only in builds with its `fault-injection` feature (one flag there, so the
    /// failure tests' build does not recompile this crate).
    #[doc(hidden)]
    pub fn stall_at_collective(&self, n: u64) {
        self.inner.stall_at.store(n, Ordering::SeqCst);
    }
}

/// A reader thread: frames from `peer` into the inbox until the connection ends. A goodbye
/// marks the peer as finished; an end without one (it died, or aborted) fails the group.
fn read_loop(shared: Arc<Shared>, rank: usize, peer: usize, s: TcpStream) {
    let mut r = BufReader::with_capacity(1 << 16, s);
    let why = loop {
        match Blob::read(&mut r) {
            Ok(Frame::Data(seq, blob)) => {
                let Ok(mut st) = shared.state.lock() else {
                    return;
                };
                st.inbox.insert((peer, seq), blob);
                drop(st);
                shared.arrived.notify_all();
            }
            Ok(Frame::Abort(why)) => break why,
            Ok(Frame::Bye) => {
                if let Ok(mut st) = shared.state.lock() {
                    st.left
                        .insert(peer, format!("rank {peer} has left the group"));
                }
                shared.arrived.notify_all();
                return;
            }
            Err(e) => {
                break format!(
                "rank {rank} lost its connection to rank {peer} ({e}): that rank exited or failed"
            )
            }
        }
    };
    if shared.closing.load(Ordering::SeqCst) {
        return;
    }
    if let Ok(mut st) = shared.state.lock() {
        st.aborted.get_or_insert(why);
    }
    shared.arrived.notify_all();
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.shared
            .state
            .lock()
            .map_err(|_| comm_err("communicator state poisoned"))
    }

    /// The next collective's number; fails at once if the group is already aborted.
    fn start(&self) -> Result<u64> {
        if let Some(why) = &self.lock()?.aborted {
            return Err(comm_err(format!("group aborted: {why}")));
        }
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        if self.stall_at.load(Ordering::SeqCst) == seq + 1 {
            eprintln!(
                "rank {}: stalling at collective {} (fault injection)",
                self.rank,
                seq + 1
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Ok(seq)
    }

    fn send(&self, to: usize, seq: u64, blob: Option<&Blob>) -> Result<()> {
        let link = self.links[to]
            .as_ref()
            .ok_or_else(|| comm_err("a rank cannot send to itself"))?;
        let header = Blob::header(seq, blob);
        let res = (|| {
            let mut s = link
                .out
                .lock()
                .map_err(|_| std::io::Error::other("connection poisoned"))?;
            match blob {
                Some(b) if b.bytes.len() <= 1 << 16 => {
                    let mut frame = header;
                    frame.extend_from_slice(&b.bytes);
                    s.write_all(&frame)
                }
                Some(b) => {
                    s.write_all(&header)?;
                    s.write_all(&b.bytes)
                }
                None => s.write_all(&header),
            }
        })();
        res.map_err(|e| {
            let why = format!("rank {} could not send to rank {to}: {e}", self.rank);
            self.abort(&why);
            comm_err(why)
        })
    }

    /// Sends `blob` to every peer (in parallel when it is large: one copy per connection).
    fn send_all(&self, seq: u64, blob: Option<&Blob>) -> Result<()> {
        let peers: Vec<usize> = (0..self.world).filter(|p| *p != self.rank).collect();
        if peers.len() > 1 && blob.is_some_and(|b| b.bytes.len() > 1 << 20) {
            std::thread::scope(|sc| {
                let hs: Vec<_> = peers
                    .iter()
                    .map(|&p| sc.spawn(move || self.send(p, seq, blob)))
                    .collect();
                hs.into_iter().try_for_each(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(comm_err("a send panicked")))
                })
            })
        } else {
            peers.iter().try_for_each(|&p| self.send(p, seq, blob))
        }
    }

    /// What `from` sent in collective `seq`, waiting at most the timeout.
    fn recv(&self, from: usize, seq: u64) -> Result<Option<Blob>> {
        let deadline = Instant::now() + self.timeout;
        let mut st = self.lock()?;
        loop {
            if let Some(b) = st.inbox.remove(&(from, seq)) {
                return Ok(b);
            }
            if let Some(why) = st.aborted.clone() {
                // Fail the others too, at once, rather than at their own timeouts.
                drop(st);
                self.abort(&why);
                return Err(comm_err(format!("group aborted: {why}")));
            }
            if let Some(why) = st.left.get(&from).cloned() {
                drop(st);
                let why = format!("rank {}: {why} before collective #{}", self.rank, seq + 1);
                self.abort(&why);
                return Err(comm_err(why));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                let why = format!(
                    "rank {} waited {}s for rank {from} in collective #{} (a peer stalled or died)",
                    self.rank,
                    self.timeout.as_secs_f64(),
                    seq + 1
                );
                self.abort(&why);
                return Err(comm_err(why));
            }
            st = self
                .shared
                .arrived
                .wait_timeout(st, deadline - now)
                .map_err(|_| comm_err("communicator state poisoned"))?
                .0;
        }
    }

    fn recv_tensor(&self, from: usize, seq: u64, device: &Device) -> Result<Tensor> {
        self.recv(from, seq)?
            .ok_or_else(|| comm_err(format!("rank {from} sent no tensor")))?
            .tensor(device)
    }

    /// Every rank's tensor of collective `seq`, this rank's being `mine`.
    fn gather(&self, seq: u64, mine: &Tensor) -> Result<Vec<Tensor>> {
        (0..self.world)
            .map(|p| {
                if p == self.rank {
                    Ok(mine.clone())
                } else {
                    self.recv_tensor(p, seq, mine.device())
                }
            })
            .collect()
    }

    /// Fails the group: the reason to every peer (so their errors name the root cause, not this
    /// rank), then the connections shut down.
    fn abort(&self, why: &str) {
        let first = match self.shared.state.lock() {
            Ok(mut st) => {
                let first = st.aborted.is_none();
                st.aborted.get_or_insert_with(|| why.to_string());
                first
            }
            Err(_) => false,
        };
        self.shared.arrived.notify_all();
        if first {
            let why = why.as_bytes();
            let mut frame = [0u8; 8].to_vec();
            frame.extend([TAG_ABORT, 0, 0]);
            frame.extend((why.len() as u32).to_le_bytes());
            frame.extend(why);
            for l in self.links.iter().flatten() {
                // A writer stuck mid-frame holds the lock: that peer learns from the shutdown.
                if let Ok(mut s) = l.out.try_lock() {
                    let _ = s.write_all(&frame);
                }
            }
        }
        self.shut_down();
    }

    fn shut_down(&self) {
        for l in self.links.iter().flatten() {
            let _ = l.ctl.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Inner {
    /// A normal end (after the last collective): goodbye to every peer, unless the group failed.
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        let failed = self
            .shared
            .state
            .lock()
            .map_or(true, |st| st.aborted.is_some());
        if !failed {
            let mut bye = [0u8; 11];
            bye[8] = TAG_BYE;
            for l in self.links.iter().flatten() {
                if let Ok(mut s) = l.out.lock() {
                    let _ = s.write_all(&bye);
                }
            }
        }
        self.shut_down();
    }
}

impl Communicator for HostComm {
    fn rank(&self) -> usize {
        self.inner.rank
    }
    fn world_size(&self) -> usize {
        self.inner.world
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let seq = self.inner.start()?;
        self.inner.send_all(seq, Some(&Blob::of(t)?))?;
        self.inner.gather(seq, t)
    }
    fn all_gather_pending(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        let seq = self.inner.start()?;
        self.inner.send_all(seq, Some(&Blob::of(t)?))?;
        let (inner, mine) = (self.inner.clone(), t.clone());
        Ok(Pending::new(move || inner.gather(seq, &mine)))
    }
    fn broadcast(&self, t: Option<&Tensor>, root: usize) -> Result<Tensor> {
        let inner = &self.inner;
        let seq = inner.start()?;
        if inner.rank == root {
            let t = t.ok_or_else(|| comm_err("broadcast root has no tensor"))?;
            inner.send_all(seq, Some(&Blob::of(t)?))?;
            Ok(t.clone())
        } else {
            inner.recv_tensor(root, seq, &inner.device)
        }
    }
    fn barrier(&self) -> Result<()> {
        let seq = self.inner.start()?;
        self.inner.send_all(seq, None)?;
        (0..self.inner.world)
            .filter(|p| *p != self.inner.rank)
            .try_for_each(|p| self.inner.recv(p, seq).map(|_| ()))
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why);
    }
    /// Point to point: one send to the next rank, the receive in flight until waited.
    fn ring_pass(&self, t: &Tensor) -> Result<Pending> {
        let inner = &self.inner;
        let seq = inner.start()?;
        let (next, prev) = (
            (inner.rank + 1) % inner.world,
            (inner.rank + inner.world - 1) % inner.world,
        );
        if inner.world == 1 {
            return Ok(Pending::ready(t.clone()));
        }
        inner.send(next, seq, Some(&Blob::of(t)?))?;
        let (inner, device) = (self.inner.clone(), t.device().clone());
        Ok(Pending::new(move || inner.recv_tensor(prev, seq, &device)))
    }
    /// Point to point: `parts[r]` to rank r only.
    fn all_to_all(&self, parts: &[Tensor]) -> Result<Vec<Tensor>> {
        let inner = &self.inner;
        if parts.len() != inner.world {
            return Err(comm_err(format!(
                "all_to_all needs {} parts, got {}",
                inner.world,
                parts.len()
            )));
        }
        let seq = inner.start()?;
        for (p, part) in parts.iter().enumerate() {
            if p != inner.rank {
                inner.send(p, seq, Some(&Blob::of(part)?))?;
            }
        }
        (0..inner.world)
            .map(|p| {
                if p == inner.rank {
                    Ok(parts[p].clone())
                } else {
                    inner.recv_tensor(p, seq, parts[p].device())
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `world` ranks of one process connected over loopback TCP (each on its own thread).
    fn group(world: usize, timeout: Duration) -> Vec<HostComm> {
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                std::thread::spawn(move || {
                    HostComm::connect(r, &addrs, l, &Device::Cpu, timeout).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Runs `f` on every rank of a fresh group, each on its own thread.
    fn on_ranks<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        f: impl Fn(&HostComm) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let hs: Vec<_> = group(world, timeout)
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(&c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn rank_tensor(rank: usize, dtype: DType) -> Tensor {
        Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .affine(1.0, 100.0 * rank as f64)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.dims() == b.dims()
            && a.dtype() == b.dtype()
            && Blob::of(a).unwrap().bytes == Blob::of(b).unwrap().bytes
    }

    #[test]
    fn collectives_move_exact_bytes_between_ranks() {
        let world = 4;
        let ok = on_ranks(world, Duration::from_secs(30), move |c| {
            let r = c.rank();
            let mut ok = true;
            for dtype in [DType::F32, DType::BF16, DType::F16, DType::U32, DType::F64] {
                let all = c.all_gather(&rank_tensor(r, dtype)).unwrap();
                ok &= (0..world).all(|p| same(&all[p], &rank_tensor(p, dtype)));
            }
            // A strided input travels as its logical contents.
            let t = rank_tensor(r, DType::F32).transpose(1, 2).unwrap();
            let all = c.all_gather_pending(&t).unwrap().wait().unwrap();
            ok &= (0..world).all(|p| {
                same(
                    &all[p],
                    &rank_tensor(p, DType::F32)
                        .transpose(1, 2)
                        .unwrap()
                        .contiguous()
                        .unwrap(),
                )
            });
            let got = c
                .ring_pass(&rank_tensor(r, DType::F32))
                .unwrap()
                .wait()
                .unwrap();
            ok &= same(&got, &rank_tensor((r + world - 1) % world, DType::F32));
            let parts: Vec<Tensor> = (0..world)
                .map(|to| rank_tensor(10 * r + to, DType::F32))
                .collect();
            let got = c.all_to_all(&parts).unwrap();
            ok &= (0..world).all(|from| same(&got[from], &rank_tensor(10 * from + r, DType::F32)));
            let b = c
                .broadcast((r == 2).then(|| rank_tensor(7, DType::F32)).as_ref(), 2)
                .unwrap();
            ok &= same(&b, &rank_tensor(7, DType::F32));
            c.barrier().unwrap();
            ok
        });
        assert_eq!(ok, vec![true; world]);
    }

    #[test]
    fn transfers_in_flight_do_not_mix_with_later_collectives() {
        // Two ring passes and an all-gather started before either pass is waited for.
        let world = 3;
        let ok = on_ranks(world, Duration::from_secs(30), move |c| {
            let r = c.rank();
            let p1 = c.ring_pass(&rank_tensor(r, DType::F32)).unwrap();
            let p2 = c.ring_pass(&rank_tensor(r + 10, DType::F32)).unwrap();
            let all = c.all_gather(&rank_tensor(r + 20, DType::F32)).unwrap();
            let prev = (r + world - 1) % world;
            same(&p2.wait().unwrap(), &rank_tensor(prev + 10, DType::F32))
                && same(&p1.wait().unwrap(), &rank_tensor(prev, DType::F32))
                && (0..world).all(|p| same(&all[p], &rank_tensor(p + 20, DType::F32)))
        });
        assert_eq!(ok, vec![true; world]);
    }

    #[test]
    fn a_peer_that_leaves_fails_the_others_at_once() {
        let mut g = group(3, Duration::from_secs(600));
        drop(g.remove(2));
        let t0 = Instant::now();
        let hs: Vec<_> = g
            .into_iter()
            .map(|c| std::thread::spawn(move || c.all_gather(&rank_tensor(0, DType::F32))))
            .collect();
        let errs: Vec<String> = hs
            .into_iter()
            .map(|h| h.join().unwrap().expect_err("must fail").to_string())
            .collect();
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(errs.iter().all(|e| e.contains("rank 2")), "{errs:?}");
    }

    #[test]
    fn a_peer_that_finished_and_left_does_not_fail_the_others() {
        // Ring pass over 3 ranks: rank 0 gets its block from rank 2 at once and leaves (closing
        // its connections); rank 2 still waits for rank 1, which is late, and must get it.
        let got = on_ranks(3, Duration::from_secs(30), |c| {
            let r = c.rank();
            if r == 1 {
                std::thread::sleep(Duration::from_millis(500));
            }
            let t = c
                .ring_pass(&rank_tensor(r, DType::F32))
                .and_then(|p| p.wait());
            t.map(|t| same(&t, &rank_tensor((r + 2) % 3, DType::F32)))
                .map_err(|e| e.to_string())
        });
        assert_eq!(got, vec![Ok(true); 3]);
    }

    #[test]
    fn a_stalled_peer_fails_every_rank_within_the_timeout() {
        let timeout = Duration::from_secs(2);
        let mut g = group(3, timeout);
        // Rank 2 stays alive and connected but never joins the collective.
        let stalled = g.remove(2);
        let t0 = Instant::now();
        let hs: Vec<_> = g
            .into_iter()
            .map(|c| std::thread::spawn(move || c.barrier()))
            .collect();
        let errs: Vec<String> = hs
            .into_iter()
            .map(|h| h.join().unwrap().expect_err("must fail").to_string())
            .collect();
        let took = t0.elapsed();
        assert!(took >= timeout && took < timeout * 3, "{took:?}");
        assert!(errs.iter().any(|e| e.contains("waited")), "{errs:?}");
        drop(stalled);
    }
}
