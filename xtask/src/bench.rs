//! `cargo xtask bench`: the direct path and the path through the agent,
//! measured side by side in one run, reported as ratios.
//!
//! A loopback server runs in this process; the client runs as a separate
//! process, once directly and once under `warden run`, and reports what it
//! measured on its own clock, so that the agent's start-up is not counted.
//! First raw TCP (connect-to-first-byte, bulk), then HTTPS and LLM API calls
//! (`bench_http`), each as its own table.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::Instant,
};

use anyhow::{Context, bail};

use crate::{bench_http, target_dir, warden_bin};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Connections for the latency figures.
    #[arg(long, default_value_t = 2000)]
    connections: u32,
    /// MiB sent for the throughput figure.
    #[arg(long, default_value_t = 2048)]
    mib: u64,
    /// Rounds of each measurement; the best round is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// HTTPS: sequential non-streaming chat completions, for latency and requests/s.
    #[arg(long, default_value_t = 2000)]
    http_requests: u32,
    /// HTTPS: sequential 1 MiB uploads, for throughput.
    #[arg(long, default_value_t = 256)]
    http_mib: u32,
    /// HTTPS: sequential streamed chat completions (50 chunks each), for latency.
    #[arg(long, default_value_t = 200)]
    http_streams: u32,
    /// Only the HTTPS benchmark: skip the TCP one.
    #[arg(long)]
    http_only: bool,
    /// Only the direct path, not through the agent (to check the bench
    /// itself without a working `warden`).
    #[arg(long)]
    direct_only: bool,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    connections: u32,
    #[arg(long)]
    mib: u64,
}

const CHUNK: usize = 1 << 20;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !args.http_only {
        tcp(args)?;
    }
    let load = bench_http::HttpLoad {
        requests: args.http_requests,
        mib: args.http_mib,
        streams: args.http_streams,
    };
    bench_http::run(&load, args.rounds, args.direct_only)
}

fn tcp(args: &BenchArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || serve(listener));

    let mut direct = Vec::new();
    let mut agent = Vec::new();
    for round in 0..args.rounds {
        eprintln!("round {} of {}", round + 1, args.rounds);
        direct.push(measure(false, addr, args)?);
        if !args.direct_only {
            agent.push(measure(true, addr, args)?);
        }
    }
    println!(
        "\nloopback, {} connections, {} MiB bulk, best of {} rounds",
        args.connections, args.mib, args.rounds
    );
    println!(
        "{:<34} {:>12} {:>14} {:>8}",
        "figure", "direct", "through agent", "ratio"
    );
    let lowest = |v: &[Figures], f: fn(&Figures) -> f64| v.iter().map(f).fold(f64::MAX, f64::min);
    let highest = |v: &[Figures], f: fn(&Figures) -> f64| v.iter().map(f).fold(0.0, f64::max);
    let figures = [
        (
            "connect-to-first-byte p50 (us)",
            lowest(&direct, |f| f.p50_us),
            lowest(&agent, |f| f.p50_us),
        ),
        (
            "connect-to-first-byte p99 (us)",
            lowest(&direct, |f| f.p99_us),
            lowest(&agent, |f| f.p99_us),
        ),
        (
            "bulk throughput (MiB/s)",
            highest(&direct, |f| f.mib_per_s),
            highest(&agent, |f| f.mib_per_s),
        ),
    ];
    for (name, d, a) in figures {
        if args.direct_only {
            println!("{name:<34} {d:>12.1} {:>14} {:>8}", "-", "-");
        } else {
            println!("{name:<34} {d:>12.1} {a:>14.1} {:>8.2}", a / d);
        }
    }
    println!(
        "(latency ratio: agent/direct, lower is better; throughput ratio: agent/direct, higher is better)"
    );
    Ok(())
}

struct Figures {
    p50_us: f64,
    p99_us: f64,
    mib_per_s: f64,
}

fn measure(through_agent: bool, addr: SocketAddr, args: &BenchArgs) -> anyhow::Result<Figures> {
    let client = target_dir().join("release/xtask");
    let client_args = [
        "bench-client".to_string(),
        format!("--addr={addr}"),
        format!("--connections={}", args.connections),
        format!("--mib={}", args.mib),
    ];
    let mut cmd = if through_agent {
        let audit = std::env::temp_dir().join(format!("warden-bench-audit-{}", std::process::id()));
        let mut c = Command::new(warden_bin());
        c.args(["run", "--audit-dir"])
            .arg(&audit)
            .arg("--")
            .arg(&client);
        c
    } else {
        Command::new(&client)
    };
    let out = cmd
        .args(&client_args)
        .env("WARDEN_LOG", "warden=warn")
        .output()
        .context("starting the bench client")?;
    if !out.status.success() {
        bail!(
            "bench client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> anyhow::Result<f64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .with_context(|| format!("bench client printed no {name}: {text}"))
    };
    Ok(Figures {
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
        mib_per_s: field("mib_per_s")?,
    })
}

/// One byte per connection answers a ping; anything longer is a bulk send,
/// acknowledged with one byte once it has all arrived.
fn serve(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let mut s = stream;
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; CHUNK];
            let mut first = [0u8; 1];
            if s.read_exact(&mut first).is_err() {
                return;
            }
            if first[0] == b'p' {
                let _ = s.write_all(b"P");
                return;
            }
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            let _ = s.write_all(b"A");
        });
    }
}

pub fn client(args: &ClientArgs) -> anyhow::Result<()> {
    let mut samples = Vec::with_capacity(args.connections as usize);
    for _ in 0..args.connections {
        let start = Instant::now();
        let mut s = TcpStream::connect(args.addr)?;
        s.set_nodelay(true)?;
        s.write_all(b"p")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];

    let data = vec![0x5au8; CHUNK];
    let mut s = TcpStream::connect(args.addr)?;
    let start = Instant::now();
    s.write_all(b"b")?;
    for _ in 0..args.mib {
        s.write_all(&data)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "p50_us={:.1} p99_us={:.1} mib_per_s={:.1}",
        pct(0.5),
        pct(0.99),
        args.mib as f64 / secs
    );
    Ok(())
}
