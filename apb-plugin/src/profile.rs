//! Opt-in time breakdown for benchmarks: when enabled, [`span`] synchronises the device around
//! its closure and adds the wall time to a named bucket. Off (the default) it only calls the
//! closure, so normal runs pay nothing and keep GPU work asynchronous. Spans may nest: buckets
//! are reported as measured, the caller decides what is inside what.

use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static BUCKETS: Mutex<BTreeMap<&'static str, f64>> = Mutex::new(BTreeMap::new());

/// Turns the breakdown on or off and clears it.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
    reset();
}

/// Clears the buckets.
pub fn reset() {
    if let Ok(mut b) = BUCKETS.lock() {
        b.clear();
    }
}

/// Seconds per bucket since the last reset.
pub fn take() -> BTreeMap<&'static str, f64> {
    BUCKETS
        .lock()
        .map(|mut b| std::mem::take(&mut *b))
        .unwrap_or_default()
}

/// Runs `f`, adding its time (device synchronised around it) to bucket `name` while enabled.
pub fn span<T>(name: &'static str, device: &Device, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let _ = device.synchronize();
    let t = Instant::now();
    let out = f();
    let _ = device.synchronize();
    if let Ok(mut b) = BUCKETS.lock() {
        *b.entry(name).or_default() += t.elapsed().as_secs_f64();
    }
    out
}
