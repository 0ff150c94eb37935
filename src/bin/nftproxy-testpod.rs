//! A tiny pod for the demo and the namespace tests.
//!
//! `serve --name NAME --tcp PORT --udp PORT ...`: answers every TCP connection and every UDP
//! datagram with `NAME PEER-IP\n` (TCP connections then echo what they receive, so a test can
//! hold a long-lived connection open).
//! `probe tcp|udp ADDR:PORT --count N`: makes N fresh connections (or N datagrams from fresh
//! sockets) and prints how many answers came from each pod, and how many failed and why.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
    },
    Probe {
        /// tcp or udp
        proto: String,
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Tally whole answers (`NAME PEER-IP`), not just pod names.
        #[arg(long)]
        full: bool,
    },
    /// Holds one TCP connection open, sending a line every interval and expecting it echoed;
    /// prints `NAME held N round trips` or `NAME broken after N round trips: why`.
    Hold {
        addr: SocketAddr,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
}

fn main() -> ExitCode {
    match Args::parse().cmd {
        Cmd::Serve { name, tcp, udp } => serve(name, tcp, udp),
        Cmd::Hold { addr, seconds, interval_ms } => {
            hold(addr, Duration::from_secs(seconds), Duration::from_millis(interval_ms))
        }
        Cmd::Probe { proto, addr, count, timeout_ms, full } => {
            probe(&proto, addr, count, Duration::from_millis(timeout_ms), full)
        }
    }
}

fn greeting(name: &str, peer: SocketAddr) -> String {
    format!("{name} {}\n", peer.ip().to_canonical())
}

fn serve(name: String, tcp: Vec<u16>, udp: Vec<u16>) -> ExitCode {
    let mut threads = Vec::new();
    for port in tcp {
        // [::] also accepts IPv4 (v4-mapped) on Linux by default.
        let l = TcpListener::bind(("::", port)).expect("bind tcp");
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || handle(conn, &name));
            }
        }));
    }
    for port in udp {
        let s = UdpSocket::bind(("::", port)).expect("bind udp");
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(greeting(&name, peer).as_bytes(), peer);
            }
        }));
    }
    eprintln!("{name}: serving");
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn handle(mut conn: TcpStream, name: &str) {
    let Ok(peer) = conn.peer_addr() else { return };
    if conn.write_all(greeting(name, peer).as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn ask_tcp(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.kind().to_string())?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(|e| e.kind().to_string())?;
    Ok(line)
}

fn ask_udp(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    s.connect(addr).map_err(|e| e.kind().to_string())?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.send(b"hello").map_err(|e| e.kind().to_string())?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).map_err(|e| e.kind().to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn probe(proto: &str, addr: SocketAddr, count: usize, timeout: Duration, full: bool) -> ExitCode {
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..count {
        let answer = match proto {
            "tcp" => ask_tcp(addr, timeout),
            "udp" => ask_udp(addr, timeout),
            other => {
                eprintln!("unknown protocol {other}");
                return ExitCode::FAILURE;
            }
        };
        let key = match answer {
            Ok(line) if full => line.trim().to_string(),
            Ok(line) => line.split_whitespace().next().unwrap_or("?").to_string(),
            Err(e) => format!("error: {e}"),
        };
        *tally.entry(key).or_default() += 1;
    }
    for (k, n) in &tally {
        println!("{n:5}  {k}");
    }
    ExitCode::SUCCESS
}

fn hold(addr: SocketAddr, total: Duration, interval: Duration) -> ExitCode {
    let start = std::time::Instant::now();
    let conn = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(c) => c,
        Err(e) => {
            println!("? broken after 0 round trips: connect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut writer = conn;
    let mut hello = String::new();
    let _ = reader.read_line(&mut hello);
    let name = hello.split_whitespace().next().unwrap_or("?").to_string();
    let mut n = 0u64;
    while start.elapsed() < total {
        let line = format!("ping {n}\n");
        let mut back = String::new();
        let result = writer.write_all(line.as_bytes()).map_err(|e| e.to_string()).and_then(|_| {
            reader.read_line(&mut back).map_err(|e| e.to_string()).and_then(|k| {
                if k == 0 {
                    Err("closed".to_string())
                } else if back != line {
                    Err(format!("got {back:?}"))
                } else {
                    Ok(())
                }
            })
        });
        if let Err(why) = result {
            println!("{name} broken after {n} round trips: {why}");
            return ExitCode::FAILURE;
        }
        n += 1;
        std::thread::sleep(interval);
    }
    println!("{name} held {n} round trips");
    ExitCode::SUCCESS
}
