//! Latency-injecting TCP relay for scripts/bench (fallback when `tc netem` is missing).
//!
//!   bench_delay --listen 127.0.0.1:PORT --target 127.0.0.1:PORT [--delay-us 250]
//!
//! Every byte that crosses the relay, in either direction, is delivered --delay-us after it
//! was read: a fixed one-way propagation delay, so a request/reply round trip gains
//! 2 × delay. It models a wire, not a queue: chunks are time-stamped on arrival and a
//! separate writer thread releases each one at its deadline, so pipelined traffic keeps
//! flowing. Per connection: 2 readers + 2 writers (std threads). Sleeps use nanosleep with
//! the thread's timer slack set to 1 ns (prctl PR_SET_TIMERSLACK) and a short spin at the
//! end; tokio timers (1 ms granularity) would be far too coarse for 250 µs.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

extern "C" {
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
}
const PR_SET_TIMERSLACK: i32 = 29;

fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and only affects this thread.
    unsafe {
        prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0);
    }
}

const SPIN: Duration = Duration::from_micros(15);

fn sleep_until(deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::thread::yield_now();
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        precise_timers();
        while let Ok((deadline, chunk)) = rx.recv() {
            sleep_until(deadline);
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let deadline = Instant::now() + delay;
                if tx.send((deadline, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Read);
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut listen = String::new();
    let mut target = String::new();
    let mut delay_us: u64 = 250;
    let mut i = 0;
    while i + 1 < argv.len() {
        match argv[i].as_str() {
            "--listen" => listen = argv[i + 1].clone(),
            "--target" => target = argv[i + 1].clone(),
            "--delay-us" => delay_us = argv[i + 1].parse().expect("--delay-us"),
            f => {
                eprintln!("unknown flag {f}");
                std::process::exit(2)
            }
        }
        i += 2;
    }
    if listen.is_empty() || target.is_empty() {
        eprintln!("usage: bench_delay --listen ADDR --target ADDR [--delay-us 250]");
        std::process::exit(2);
    }
    let delay = Duration::from_micros(delay_us);
    let l = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("bench_delay: bind {listen}: {e}");
        std::process::exit(1)
    });
    eprintln!("bench_delay: {listen} -> {target}, {delay_us} us each way");
    for conn in l.incoming() {
        let Ok(client) = conn else { continue };
        let target = target.clone();
        std::thread::spawn(move || {
            let Ok(server) = TcpStream::connect(&target) else {
                let _ = client.shutdown(Shutdown::Both);
                return;
            };
            client.set_nodelay(true).ok();
            server.set_nodelay(true).ok();
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let up = std::thread::spawn(move || pipe(client, server, delay));
            pipe(s2, c2, delay);
            let _ = up.join();
        });
    }
}
