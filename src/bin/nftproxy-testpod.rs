//! A tiny pod for the demo and the namespace tests.
//!
//! `serve --name NAME --tcp PORT --udp PORT ...`: answers every TCP connection and every UDP
//! datagram with `NAME PEER-IP\n` (TCP connections then echo what they receive, so a test can
//! hold a long-lived connection open).
//! `probe tcp|udp ADDR:PORT --count N`: makes N fresh connections (or N datagrams from fresh
//! sockets) and prints how many answers came from each pod, and how many failed and why; ADDR
//! may be `NAME:PORT` with `--dns SERVER` to resolve NAME first.
//! `resolve NAME [TYPE] --server IP`: one DNS question, the response as text.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hickory_proto::rr::RecordType;
use nftproxy::dns::client as dns;

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
        /// `IP:PORT` where every UDP datagram is sent back as it came (the benchmark's floor for
        /// DNS). A specific address, so that answers leave from the address the DNAT sent to.
        #[arg(long)]
        udp_echo: Vec<SocketAddr>,
    },
    /// Asks a DNS server one question and prints the response (`status ...`, then one line per
    /// record: `answer|authority|additional NAME TTL TYPE DATA`).
    Resolve {
        name: String,
        #[arg(default_value = "A")]
        qtype: String,
        /// `IP[:PORT]` (port 53 by default).
        #[arg(long)]
        server: String,
        /// Over TCP instead of UDP.
        #[arg(long)]
        tcp: bool,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// DNS load from one socket: COUNT queries for names NAME-PATTERN with `{}` replaced by a
    /// random number below RANGE, one outstanding at a time; prints
    /// `qps=... p50_us=... p99_us=... n=... failed=...`. Any datagram with the query's id counts
    /// as the answer, so a UDP echo server gives the path's floor.
    DnsBench {
        server: SocketAddr,
        #[arg(long)]
        name_pattern: String,
        #[arg(long, default_value_t = 1)]
        range: u32,
        #[arg(long, default_value_t = 10000)]
        count: usize,
    },
    Probe {
        /// tcp or udp
        proto: String,
        /// `IP:PORT`, or `NAME:PORT` resolved through `--dns`.
        addr: String,
        /// The DNS server (`IP[:PORT]`) that resolves a name in ADDR.
        #[arg(long)]
        dns: Option<String>,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// UDP: send datagram i from source port SPORT_BASE + i, so that every datagram is a new
        /// conntrack entry (an ephemeral port may repeat one whose entry is still alive).
        #[arg(long)]
        sport_base: Option<u16>,
        /// Tally whole answers (`NAME PEER-IP`), not just pod names.
        #[arg(long)]
        full: bool,
    },
    /// One UDP socket sending a datagram every interval; prints each answer's pod name (or
    /// `error: ...`) on its own line, as a client that keeps its socket (DNS, QUIC) would see.
    Stream {
        addr: SocketAddr,
        #[arg(long, default_value_t = 20)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// Sends one TCP ACK that belongs to no connection (conntrack marks it INVALID when
    /// nf_conntrack_tcp_loose is 0), from SRC to DST, through a raw socket.
    StrayAck { src: std::net::Ipv4Addr, dst: std::net::SocketAddrV4 },
    /// New-connection latency: N fresh TCP connections, each timed from connect to the first
    /// byte of the answer; prints `p50_us=... p99_us=... n=...`.
    Latency {
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
    /// Two paths measured side by side: connections alternate between A and B (ABBA order),
    /// each from a socket made in its own network namespace, so that the machine's drift falls
    /// on both alike. Each side is `NETNS=IP:PORT` (a name under /run/netns). Prints, per
    /// side, the p50 latency and the median CPU time per connection, and the medians of the
    /// per-pair differences B - A (`diff_cpu_us`, `diff_p50_us`).
    Paired {
        a: String,
        b: String,
        #[arg(long, default_value_t = 2000)]
        count: usize,
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
        Cmd::Serve { name, tcp, udp, udp_echo } => serve(name, tcp, udp, udp_echo),
        Cmd::Resolve { name, qtype, server, tcp, timeout_ms } => {
            resolve(&name, &qtype, &server, tcp, Duration::from_millis(timeout_ms))
        }
        Cmd::DnsBench { server, name_pattern, range, count } => dns_bench(server, &name_pattern, range, count),
        Cmd::Latency { addr, count } => latency(addr, count),
        Cmd::Paired { a, b, count } => paired(&a, &b, count),
        Cmd::Stream { addr, count, interval_ms } => stream(addr, count, Duration::from_millis(interval_ms)),
        Cmd::StrayAck { src, dst } => stray_ack(src, dst),
        Cmd::Hold { addr, seconds, interval_ms } => {
            hold(addr, Duration::from_secs(seconds), Duration::from_millis(interval_ms))
        }
        Cmd::Probe { proto, addr, dns, count, timeout_ms, sport_base, full } => {
            let timeout = Duration::from_millis(timeout_ms);
            match target(&addr, dns.as_deref(), timeout) {
                Ok(addr) => probe(&proto, addr, count, timeout, sport_base, full),
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn greeting(name: &str, peer: SocketAddr) -> String {
    format!("{name} {}\n", peer.ip().to_canonical())
}

/// `IP[:PORT]` with a default port.
fn server_addr(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, default_port)))
        .map_err(|_| format!("{text:?} is not IP or IP:PORT"))
}

/// `IP:PORT`, or `NAME:PORT` with NAME resolved at `dns`.
fn target(addr: &str, dns: Option<&str>, timeout: Duration) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let (name, port) = addr.rsplit_once(':').ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
    let port: u16 = port.parse().map_err(|_| format!("{addr:?}: bad port"))?;
    let server = server_addr(dns.ok_or_else(|| format!("{addr:?} is a name: give --dns SERVER"))?, 53)?;
    let ips = dns::addresses(server, name, timeout)?;
    println!("{name} -> {}", ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(", "));
    Ok(SocketAddr::new(ips[0], port))
}

fn resolve(name: &str, qtype: &str, server: &str, tcp: bool, timeout: Duration) -> ExitCode {
    let result = server_addr(server, 53).and_then(|server| {
        let qtype: RecordType = qtype.to_ascii_uppercase().parse().map_err(|_| format!("unknown type {qtype}"))?;
        dns::ask(server, name, qtype, tcp, timeout)
    });
    match result {
        Ok(msg) => {
            print!("{}", dns::render(&msg));
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dns_bench(server: SocketAddr, pattern: &str, range: u32, count: usize) -> ExitCode {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(bind).expect("bind");
    s.connect(server).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut us = Vec::with_capacity(count);
    let mut failed = 0;
    let mut buf = [0u8; 4096];
    let start = std::time::Instant::now();
    for i in 0..count {
        // xorshift: names spread over the whole range, the same sequence every run.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let name = pattern.replace("{}", &(state % u64::from(range.max(1))).to_string());
        let id = i as u16;
        let Ok(q) = dns::query_bytes(id, &name, RecordType::A, false) else {
            eprintln!("bad name {name}");
            return ExitCode::FAILURE;
        };
        let t = std::time::Instant::now();
        let _ = s.send(&q);
        loop {
            match s.recv(&mut buf) {
                Ok(n) if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id => {
                    us.push(t.elapsed().as_secs_f64() * 1e6);
                    break;
                }
                Ok(_) => continue, // a late answer to an earlier query
                Err(_) => {
                    failed += 1;
                    break;
                }
            }
        }
        if failed >= 10 && us.len() < failed {
            eprintln!("giving up: {failed} queries unanswered");
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    us.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| us.get(((us.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    println!(
        "qps={:.0} p50_us={:.1} p99_us={:.1} n={} failed={failed}",
        us.len() as f64 / secs,
        pct(0.5),
        pct(0.99),
        us.len()
    );
    ExitCode::SUCCESS
}

fn serve(name: String, tcp: Vec<u16>, udp: Vec<u16>, udp_echo: Vec<SocketAddr>) -> ExitCode {
    let mut threads = Vec::new();
    for addr in udp_echo {
        let s = UdpSocket::bind(addr).expect("bind udp");
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], peer);
            }
        }));
    }
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

fn ask_udp(addr: SocketAddr, sport: u16, timeout: Duration) -> Result<String, String> {
    let any: std::net::IpAddr = if addr.is_ipv4() { [0u8; 4].into() } else { [0u16; 8].into() };
    let bind = SocketAddr::new(any, sport);
    let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    s.connect(addr).map_err(|e| e.kind().to_string())?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.send(b"hello").map_err(|e| e.kind().to_string())?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).map_err(|e| e.kind().to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn probe(
    proto: &str,
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
    sport_base: Option<u16>,
    full: bool,
) -> ExitCode {
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..count {
        let sport = sport_base.map_or(0, |b| b.wrapping_add(i as u16));
        let answer = match proto {
            "tcp" => ask_tcp(addr, timeout),
            "udp" => ask_udp(addr, sport, timeout),
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

fn stream(addr: SocketAddr, count: usize, interval: Duration) -> ExitCode {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(bind).expect("bind");
    s.connect(addr).expect("connect");
    s.set_read_timeout(Some(interval.max(Duration::from_millis(50)))).unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..count {
        let started = std::time::Instant::now();
        let line = match s.send(format!("seq {i}").as_bytes()).and_then(|_| s.recv(&mut buf)) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or("?").to_string(),
            Err(e) => format!("error: {}", e.kind()),
        };
        println!("{line}");
        if let Some(rest) = interval.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    ExitCode::SUCCESS
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn stray_ack(src: std::net::Ipv4Addr, dst: std::net::SocketAddrV4) -> ExitCode {
    use socket2::{Domain, Protocol, Socket, Type};
    // TCP header: ports, seq, ack, data offset 5, flags ACK, window.
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).expect("raw socket (needs root)");
    match sock.send_to(&tcp, &SocketAddr::V4(dst).into()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("send: {e}");
            ExitCode::FAILURE
        }
    }
}

/// This thread's time on a CPU so far (`/proc/thread-self/schedstat`, nanoseconds, exact). With
/// no separate IRQ time accounting, the softirq work done in our context (a veth transmit
/// runs the receiving side's netfilter hooks right away) is counted too: the kernel's cost of
/// our connections, whatever else the machine runs.
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

fn latency(addr: SocketAddr, count: usize) -> ExitCode {
    let mut us: Vec<f64> = Vec::with_capacity(count);
    let mut failed = 0;
    let cpu_start = cpu_ns();
    for _ in 0..count {
        let start = std::time::Instant::now();
        let ok = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
        });
        match ok {
            Ok(()) => us.push(start.elapsed().as_secs_f64() * 1e6),
            Err(_) => failed += 1,
        }
    }
    let cpu = cpu_start.zip(cpu_ns()).map(|(a, b)| (b - a) as f64 / 1e3 / count.max(1) as f64);
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| us.get(((us.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    println!(
        "p50_us={:.1} p99_us={:.1} cpu_us={:.2} n={} failed={failed}",
        pct(0.5),
        pct(0.99),
        cpu.unwrap_or(f64::NAN),
        us.len()
    );
    ExitCode::SUCCESS
}

/// One side of `paired`: a network namespace (opened once) and the address to connect to.
struct Side {
    netns: std::fs::File,
    addr: SocketAddr,
}

impl Side {
    fn parse(spec: &str) -> Result<Side, String> {
        let (ns, addr) = spec.split_once('=').ok_or(format!("{spec}: expected NETNS=IP:PORT"))?;
        let netns = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| format!("netns {ns}: {e}"))?;
        let addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        Ok(Side { netns, addr })
    }
}

/// A socket made inside `side`'s namespace (it keeps that namespace). The thread is back in its
/// own namespace when this returns, or the process ends: left in the other one, it would go on
/// measuring the wrong thing.
fn socket_in(side: &Side, home: &std::fs::File) -> Result<socket2::Socket, String> {
    use nix::sched::{CloneFlags, setns};
    setns(&side.netns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns for {}: {e}", side.addr))?;
    let socket = socket2::Socket::new(socket2::Domain::for_address(side.addr), socket2::Type::STREAM, None);
    if let Err(e) = setns(home, CloneFlags::CLONE_NEWNET) {
        eprintln!("cannot return to the own network namespace: {e}");
        std::process::exit(1);
    }
    let socket = socket.map_err(|e| format!("socket for {}: {e}", side.addr))?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    Ok(socket)
}

/// One connection from `side`'s namespace: (latency us, CPU ns of this thread), from just before
/// the connect to just after the close.
fn timed_connection(side: &Side, home: &std::fs::File) -> Result<(f64, u64), String> {
    let socket = socket_in(side, home)?;
    let cpu_start = cpu_ns().ok_or("no schedstat")?;
    let start = std::time::Instant::now();
    socket.connect_timeout(&side.addr.into(), Duration::from_secs(2)).map_err(|e| format!("{}: {e}", side.addr))?;
    let mut stream: TcpStream = socket.into();
    let mut b = [0u8; 1];
    stream.read_exact(&mut b).map_err(|e| format!("{}: no answer: {e}", side.addr))?;
    let us = start.elapsed().as_secs_f64() * 1e6;
    drop(stream);
    Ok((us, cpu_ns().ok_or("no schedstat")?.saturating_sub(cpu_start)))
}

fn paired(a: &str, b: &str, count: usize) -> ExitCode {
    let (a, b) = match (Side::parse(a), Side::parse(b)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let home = match std::fs::File::open("/proc/thread-self/ns/net") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("own netns: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut lat, mut cpu): ([Vec<f64>; 2], [Vec<f64>; 2]) = Default::default();
    let (mut diff_lat, mut diff_cpu) = (Vec::with_capacity(count), Vec::with_capacity(count));
    let mut failed = 0;
    for i in 0..count {
        // ABBA: neither side always goes first (the second of a pair finds warmer caches).
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut got = [None, None];
        for side in order {
            match timed_connection([&a, &b][side], &home) {
                Ok(x) => got[side] = Some(x),
                Err(e) if failed == 0 => eprintln!("first failure: {e}"),
                Err(_) => {}
            }
        }
        match got {
            [Some(x), Some(y)] => {
                for (side, (us, ns)) in [x, y].into_iter().enumerate() {
                    lat[side].push(us);
                    cpu[side].push(ns as f64 / 1e3);
                }
                diff_lat.push(y.0 - x.0);
                diff_cpu.push((y.1 as f64 - x.1 as f64) / 1e3);
            }
            _ => failed += 1,
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let [la, lb] = &mut lat;
    let [ca, cb] = &mut cpu;
    println!(
        "a_p50_us={:.2} b_p50_us={:.2} a_cpu_us={:.3} b_cpu_us={:.3} diff_p50_us={:.3} diff_cpu_us={:.3} n={} failed={failed}",
        median(la),
        median(lb),
        median(ca),
        median(cb),
        median(&mut diff_lat),
        median(&mut diff_cpu),
        diff_cpu.len()
    );
    ExitCode::SUCCESS
}
