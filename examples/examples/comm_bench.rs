//! Collective cost between ranks, side by side in one run: thread ranks sharing tensors
//! (`LocalGroup`), the host communicator between ranks (`HostComm`, TCP loopback; one thread per
//! rank, as separate processes would be), and raw one-way streams over TCP loopback and Unix
//! sockets (the transport choice). Prints one JSON line per case.
//!
//! `cargo run --release -p apb-examples --example comm_bench [-- WORLD]`

use apb_plugin::{Communicator, HostComm, LocalGroup};
use candle_core::{DType, Device, Tensor};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Median seconds per all-gather of `elems` f32 per rank, over `iters` rounds, on every rank.
fn gather_time(comms: Vec<Arc<dyn Communicator>>, elems: usize, iters: usize) -> f64 {
    let hs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let t = Tensor::ones(elems, DType::F32, &Device::Cpu).unwrap();
                let mut times = Vec::with_capacity(iters);
                for _ in 0..iters {
                    let t0 = Instant::now();
                    let all = c.all_gather(&t).unwrap();
                    assert_eq!(all.len(), c.world_size());
                    times.push(t0.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                times[iters / 2]
            })
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().unwrap())
        .fold(0.0, f64::max)
}

fn host_group(world: usize) -> Vec<Arc<dyn Communicator>> {
    let ls: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    let hs: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let c = HostComm::connect(r, &addrs, l, &Device::Cpu, Duration::from_secs(60));
                Arc::new(c.unwrap()) as Arc<dyn Communicator>
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Seconds to stream `bytes` one way through a connected pair (writer on another thread).
fn stream_time<S: Read + Write + Send + 'static>(mut tx: S, mut rx: S, bytes: usize) -> f64 {
    let buf = vec![7u8; bytes];
    let t0 = Instant::now();
    let h = std::thread::spawn(move || {
        tx.write_all(&buf).unwrap();
        tx
    });
    let mut got = vec![0u8; bytes];
    rx.read_exact(&mut got).unwrap();
    let _tx = h.join().unwrap();
    t0.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let world: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(4);
    // Transport: one 64 MiB message, best of 5.
    let bytes = 64 << 20;
    let best = |f: &dyn Fn() -> f64| (0..5).map(|_| f()).fold(f64::MAX, f64::min);
    let tcp = best(&|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let b = l.accept().unwrap().0;
        stream_time(a, b, bytes)
    });
    let dir = std::env::temp_dir().join(format!("apb-comm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let uds = best(&|| {
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let a = UnixStream::connect(&path).unwrap();
        let b = l.accept().unwrap().0;
        stream_time(a, b, bytes)
    });
    std::fs::remove_dir_all(&dir)?;
    println!(
        "{}",
        serde_json::json!({"case": "stream 64 MiB one way", "tcp_loopback_gb_s": bytes as f64 / tcp / 1e9,
            "unix_socket_gb_s": bytes as f64 / uds / 1e9})
    );
    // All-gathers of the sizes the methods move: a decode step's partial output (small), a
    // SmolLM2 block's K/V, a Llama-8B-shaped block's.
    for (elems, iters) in [(576, 200), (64 << 10, 50), (1 << 20, 20), (8 << 20, 5)] {
        let local = gather_time(
            LocalGroup::ranks(world)
                .into_iter()
                .map(|c| c as Arc<dyn Communicator>)
                .collect(),
            elems,
            iters,
        );
        let host = gather_time(host_group(world), elems, iters);
        println!(
            "{}",
            serde_json::json!({"case": "all_gather", "world": world, "bytes_per_rank": elems * 4,
                "threads_local_us": local * 1e6, "host_tcp_us": host * 1e6,
                "host_tcp_gb_s_received_per_rank": (elems * 4 * (world - 1)) as f64 / host / 1e9})
        );
    }
    Ok(())
}
