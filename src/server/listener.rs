//! Accepting clients: one session task each, at most `max_clients` at a
//! time (a semaphore, as mini-redis limits connections), and on shutdown a
//! drain that lets sessions answer what they were asked, for at most
//! `shutdown_grace`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, info, warn};

use super::{session, Sidecar};
use crate::metrics;

/// A client's place under `max_clients`: given back on drop, also when its
/// session panics.
struct Admitted {
    sidecar: Arc<Sidecar>,
    id: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.sidecar.clients.unregister(self.id);
        metrics::get().client_connections.dec();
    }
}

/// Accepts clients until `shutdown` turns true; returns once every session has
/// finished or `grace` has passed after shutdown.
pub async fn serve(
    listener: TcpListener,
    sidecar: Arc<Sidecar>,
    mut shutdown: watch::Receiver<bool>,
) {
    let m = metrics::get();
    let limit = Arc::new(Semaphore::new(sidecar.config.server.max_clients));
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (mut socket, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        socket.set_nodelay(true).ok();
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            m.client_connections_rejected_total.inc();
            tokio::spawn(async move {
                let _ = socket
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = socket.shutdown().await;
            });
            continue;
        };
        let laddr = socket.local_addr().unwrap_or(peer);
        let info = sidecar.clients.register(peer, laddr);
        m.client_connections.inc();
        m.client_connections_total.inc();
        debug!(client = info.id, %peer, "client connected");
        let admitted = Admitted {
            sidecar: sidecar.clone(),
            id: info.id,
            _permit: permit,
        };
        let done = done_tx.clone();
        let sidecar = sidecar.clone();
        tokio::spawn(async move {
            let id = info.id;
            session::run(sidecar, socket, info).await;
            drop(admitted);
            debug!(client = id, "client disconnected");
            drop(done);
        });
    }
    drop(listener);
    drop(done_tx);
    // Every session spawned was registered first, so each is told.
    for client in sidecar.clients.all() {
        client.drain();
    }
    let grace = sidecar.config.shutdown_grace;
    info!(
        clients = sidecar.clients.count(),
        ?grace,
        "draining clients"
    );
    // Every session holds a clone of done_tx; recv() returns None when all are gone.
    let _ = tokio::time::timeout(grace, done_rx.recv()).await;
}
