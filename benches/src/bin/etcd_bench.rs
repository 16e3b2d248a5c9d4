//! A load generator for etcd's v3 JSON gateway, at the concurrency `scripts/cluster-bench` gives redis-benchmark
//! (per endpoint: `--clients` × `--pipeline` requests in flight, each on a keep-alive HTTP/1.1 connection of its
//! own, since the gateway does not pipeline): puts of `--value-bytes` values to random keys among `--keys`, then
//! linearizable gets (etcd's default range read). Prints requests/s summed over the endpoints. Used by
//! `scripts/etcd-bench` to compare with Flotilla under the same load (docs/benchmarks.md).

use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
struct Args {
    /// host:port of each member's client URL.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    endpoints: Vec<String>,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    /// Requests per endpoint per test.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
}

/// One keep-alive connection: sends `requests` POSTs built by `body(i)` to `path`; counts the 200s.
async fn connection(endpoint: String, path: &'static str, requests: usize, body: impl Fn(usize) -> String) -> usize {
    let Ok(mut stream) = TcpStream::connect(&endpoint).await else { return 0 };
    let _ = stream.set_nodelay(true);
    let mut ok = 0;
    let mut buffer = Vec::with_capacity(4096);
    for i in 0..requests {
        let body = body(i);
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(request.as_bytes()).await.is_err() {
            return ok;
        }
        // The response: headers, then Content-Length bytes.
        buffer.clear();
        let (header_end, length) = loop {
            let mut chunk = [0u8; 4096];
            let Ok(read) = stream.read(&mut chunk).await else { return ok };
            if read == 0 {
                return ok;
            }
            buffer.extend_from_slice(&chunk[..read]);
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let headers = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                let length = headers
                    .lines()
                    .find_map(|line| {
                        line.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                break (end + 4, length);
            }
        };
        while buffer.len() < header_end + length {
            let mut chunk = [0u8; 4096];
            let Ok(read) = stream.read(&mut chunk).await else { return ok };
            if read == 0 {
                return ok;
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
        ok += usize::from(buffer.starts_with(b"HTTP/1.1 200"));
    }
    ok
}

fn key(i: u64) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("key:{:012}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 100_000_000_000))
}

async fn run(args: &Args, test: &'static str) -> (usize, Duration) {
    let per_connection = args.requests / (args.clients * args.pipeline);
    let value = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; args.value_bytes]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for endpoint in &args.endpoints {
        for c in 0..args.clients * args.pipeline {
            let (endpoint, value, keys) = (endpoint.clone(), value.clone(), args.keys);
            let seed = (c as u64 + 1) * 0x2545_F491_4F6C_DD1D;
            tasks.push(tokio::spawn(async move {
                let pick = move |i: usize| (seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % keys;
                match test {
                    "put" => {
                        connection(endpoint, "/v3/kv/put", per_connection, move |i| {
                            format!("{{\"key\":\"{}\",\"value\":\"{value}\"}}", key(pick(i)))
                        })
                        .await
                    }
                    _ => {
                        connection(endpoint, "/v3/kv/range", per_connection, move |i| {
                            format!("{{\"key\":\"{}\"}}", key(pick(i)))
                        })
                        .await
                    }
                }
            }));
        }
    }
    let mut ok = 0;
    for task in tasks {
        ok += task.await.unwrap_or(0);
    }
    (ok, started.elapsed())
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    println!(
        "etcd-bench: {} endpoints, {} connections each, {} B values, {} requests per endpoint",
        args.endpoints.len(),
        args.clients * args.pipeline,
        args.value_bytes,
        args.requests
    );
    for test in ["put", "get"] {
        let (ok, took) = runtime.block_on(run(&args, test));
        println!("{test}: {:.0} requests/s ({ok} answered 200 in {took:.2?})", ok as f64 / took.as_secs_f64());
    }
}
