//! Opt-in time breakdown: [`span`] adds its closure's wall time to a [`Bucket`]. Two modes, as
//! a user asks with `APB_PROFILE` ([`Mode::from_env`]):
//! - `synced`: the device is synchronised around each span, so a bucket is the span's whole
//!   cost (host and GPU); the run is slower and GPU work no longer overlaps the host.
//! - `host`: nothing is synchronised; a bucket is the host's time in the span, GPU work queued
//!   in it runs on. With GPU work queued asynchronously, a span that ends by waiting for results
//!   (a copy back) holds the GPU's lag; the others, how long the host took to queue their work.
//!
//! Off (the default) [`span`] only calls the closure. Spans may nest: buckets are reported as
//! measured, the caller decides what is inside what.

use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How spans are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not at all.
    Off,
    /// Device synchronised around each span.
    Synced,
    /// Host time only (no synchronisation).
    Host,
}

impl Mode {
    /// `APB_PROFILE`: `synced` or `host`; unset or `off`: [`Mode::Off`].
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("APB_PROFILE").as_deref() {
            Err(_) | Ok("") | Ok("off") => Ok(Mode::Off),
            Ok("synced") => Ok(Mode::Synced),
            Ok("host") => Ok(Mode::Host),
            Ok(v) => Err(format!("APB_PROFILE={v}: expected synced, host or off")),
        }
    }
}

/// Where a span's time goes: a layer's stages in prefill, then a decode step's (its rows through
/// the layers, and rank 0's step around them). [`Bucket::name`] is the label reports use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bucket {
    /// Prefill: the q|k|v projections with RoPE.
    Qkv,
    /// Prefill: APB's retaining heads scoring the rank's keys.
    RetainingHeads,
    /// Prefill: picking and packing the passing K/V.
    TopK,
    /// Prefill: collectives between ranks.
    Communication,
    /// Prefill: attention kernels.
    Attention,
    /// Prefill: the output projection.
    OProj,
    /// Prefill: the MLP.
    Ffn,
    /// Decode rows: q|k|v with RoPE.
    RowsQkv,
    /// Decode rows: writing the new K/V into the caches.
    RowsWrite,
    /// Decode rows: attention of every row against its own cache.
    RowsAttend,
    /// Decode rows: the all-gather and LSE merge of the ranks' parts.
    RowsMerge,
    /// Decode rows: the output projection.
    RowsOProj,
    /// Decode rows: the MLP.
    RowsFfn,
    /// A decode step's forward on rank 0.
    DecodeForward,
    /// A decode step's lm_head, argmax and ids back.
    DecodePick,
    /// A decode step's sampling and stop rules on rank 0.
    DecodeAccept,
}

impl Bucket {
    /// Prefill's stages, in the order `apb bench prefill --breakdown` reports them.
    pub const PREFILL: [Bucket; 7] = [
        Bucket::Qkv,
        Bucket::RetainingHeads,
        Bucket::TopK,
        Bucket::Communication,
        Bucket::Attention,
        Bucket::OProj,
        Bucket::Ffn,
    ];

    /// The label in reports (`/metrics`' `apb_profile_seconds{span=…}`, bench JSON).
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Qkv => "qkv",
            Bucket::RetainingHeads => "retaining_heads",
            Bucket::TopK => "topk",
            Bucket::Communication => "communication",
            Bucket::Attention => "attention",
            Bucket::OProj => "o_proj",
            Bucket::Ffn => "ffn",
            Bucket::RowsQkv => "rows.qkv",
            Bucket::RowsWrite => "rows.write",
            Bucket::RowsAttend => "rows.attend",
            Bucket::RowsMerge => "rows.merge",
            Bucket::RowsOProj => "rows.o_proj",
            Bucket::RowsFfn => "rows.ffn",
            Bucket::DecodeForward => "decode.forward",
            Bucket::DecodePick => "decode.pick",
            Bucket::DecodeAccept => "decode.accept",
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);
static BUCKETS: Mutex<BTreeMap<Bucket, f64>> = Mutex::new(BTreeMap::new());

/// Sets how spans are timed and clears the buckets.
pub fn set_mode(m: Mode) {
    MODE.store(m as u8, Ordering::SeqCst);
    reset();
}

/// The mode in force.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Synced,
        2 => Mode::Host,
        _ => Mode::Off,
    }
}

/// [`Mode::Synced`] on, or off; clears the buckets.
pub fn enable(on: bool) {
    set_mode(if on { Mode::Synced } else { Mode::Off });
}

/// Clears the buckets.
pub fn reset() {
    if let Ok(mut b) = BUCKETS.lock() {
        b.clear();
    }
}

/// Seconds per bucket since the last reset, clearing them.
pub fn take() -> BTreeMap<Bucket, f64> {
    BUCKETS
        .lock()
        .map(|mut b| std::mem::take(&mut *b))
        .unwrap_or_default()
}

/// Seconds per bucket since the last reset.
pub fn snapshot() -> BTreeMap<Bucket, f64> {
    BUCKETS.lock().map(|b| b.clone()).unwrap_or_default()
}

/// Adds `d` to bucket `name` (a time the caller measured itself) unless profiling is off.
pub fn add(name: Bucket, d: Duration) {
    if mode() == Mode::Off {
        return;
    }
    if let Ok(mut b) = BUCKETS.lock() {
        *b.entry(name).or_default() += d.as_secs_f64();
    }
}

/// Runs `f`, adding its time to bucket `name` as the [`mode`] says.
pub fn span<T>(name: Bucket, device: &Device, f: impl FnOnce() -> T) -> T {
    let m = mode();
    if m == Mode::Off {
        return f();
    }
    if m == Mode::Synced {
        let _ = device.synchronize();
    }
    let t = Instant::now();
    let out = f();
    if m == Mode::Synced {
        let _ = device.synchronize();
    }
    add(name, t.elapsed());
    out
}
