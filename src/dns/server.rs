//! The thin network edge: UDP and TCP listeners on one address that hand every query to
//! [`answer::respond`] with the current zone. Nothing here decides an answer.
//!
//! A listener binds the exact node address the cluster DNS addresses are DNATed to, not
//! 0.0.0.0: a UDP socket bound to the wildcard answers from whatever address routes back to the
//! client (the pod-facing veth's), which conntrack would not recognise as the reply to undo the
//! DNAT of.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::answer::{self, Transport};
use super::zone::Zone;

/// The zone the listeners answer from: `None` until the first sync.
pub type Zones = watch::Receiver<Option<Arc<Zone>>>;

/// TCP connections served at once; more are closed at once.
const MAX_TCP_CONNECTIONS: usize = 128;
/// A TCP connection that sends no complete query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The UDP and TCP tasks of one listening address; dropping it stops them.
pub struct Listener {
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds UDP and TCP on `addr` and serves queries from `zones` until dropped.
pub async fn listen(addr: SocketAddr, zones: Zones) -> io::Result<Listener> {
    let udp = UdpSocket::bind(addr).await?;
    let tcp = TcpListener::bind(addr).await?;
    let addr = udp.local_addr()?;
    let tasks = vec![tokio::spawn(serve_udp(udp, zones.clone())), tokio::spawn(serve_tcp(tcp, zones))];
    Ok(Listener { addr, tasks })
}

fn current(zones: &Zones) -> Option<Arc<Zone>> {
    zones.borrow().clone()
}

async fn serve_udp(socket: UdpSocket, zones: Zones) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "cluster DNS: receiving a datagram failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let zone = current(&zones);
        if let Some(response) = answer::respond(zone.as_deref(), &buf[..n], Transport::Udp)
            && let Err(e) = socket.send_to(&response, peer).await
        {
            tracing::debug!(%peer, error = %e, "cluster DNS: sending an answer failed");
        }
    }
}

async fn serve_tcp(listener: TcpListener, zones: Zones) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let zones = zones.clone();
        tokio::spawn(async move {
            let _ = serve_connection(stream, &zones).await;
            drop(slot);
        });
    }
}

/// Length-prefixed queries (RFC 1035 4.2.2) until the client closes, idles or sends garbage.
async fn serve_connection(mut stream: TcpStream, zones: &Zones) -> io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await??;
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await??;
        let zone = current(zones);
        let Some(response) = answer::respond(zone.as_deref(), &query, Transport::Tcp) else {
            return Ok(());
        };
        let mut framed = (response.len() as u16).to_be_bytes().to_vec();
        framed.extend(response);
        stream.write_all(&framed).await?;
    }
}
