//! nearcache: a Redis-protocol sidecar that serves hot keys from a shared
//! in-process L1, forwards everything else to the upstream Redis, and fills
//! configured misses from TDengine.
//!
//! Layers, outermost first: [`server`] accepts clients and owns their
//! connections; [`protocol`] frames requests and replies; [`command`] decides
//! what a request is; [`cache`] answers from L1 and keeps it consistent;
//! [`upstream`] talks to Redis over [`net`]; [`tdengine`] is the third tier; [`admin`] and
//! [`metrics`] serve operators.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod command;
pub mod config;
pub mod error;
pub mod flight;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod server;
pub mod tdengine;
pub mod upstream;

pub use config::Config;
pub use error::{Error, Result};

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{watch, Notify};

/// A running nearcache, as started by [`start`].
pub struct Handle {
    /// Where clients connect (useful when the configured port was 0).
    pub addr: SocketAddr,
    /// Where the admin HTTP endpoint listens, if enabled.
    pub admin_addr: Option<SocketAddr>,
    pub sidecar: Arc<server::Sidecar>,
    shutdown: watch::Sender<bool>,
    stop_background: Arc<Notify>,
    server: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Starts a graceful shutdown: readiness goes false, no new connections,
    /// requests in flight are answered within `shutdown_grace`.
    pub fn shutdown(&self) {
        self.sidecar.draining.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
    }

    /// Waits for the drain to finish, then stops upstream connections and the feed.
    pub async fn wait(self) {
        let _ = self.server.await;
        self.sidecar.upstream.stop();
        if let Some(c) = &self.sidecar.cluster {
            c.stop();
        }
        self.stop_background.notify_waiters();
    }
}

/// Binds the listeners and starts every task; returns once nearcache accepts clients.
/// An unreachable upstream is not an error: sidecars start in any order.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen: cannot bind {}", config.listen))?;
    let addr = listener.local_addr()?;
    let admin = match config.admin {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("admin: cannot bind {a}"))?,
        ),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;

    let connector = upstream::Connector::new(config.upstream.clone())?;
    let cluster = config.upstream.url.cluster.is_some().then(|| {
        let view = upstream::cluster::view::ClusterView::start(connector.clone());
        Arc::new(upstream::cluster::router::Router::new(
            view,
            connector.clone(),
        ))
    });
    // With a cluster, no shared pools to the first seed: the router's
    // per-node pools carry everything (docs/cluster.md).
    let upstream = Arc::new(match &cluster {
        Some(router) => upstream::Upstream::start_cluster(connector, router.clone()),
        None => upstream::Upstream::start(connector),
    });
    let cache = match &cluster {
        Some(_) => cache::Cache::for_cluster(config.cache.clone()),
        None => cache::Cache::new(config.cache.clone()),
    };
    let stop_background = Arc::new(Notify::new());
    match &cluster {
        // One feed per master (cache/cluster_feed.rs).
        Some(router) => {
            cache::cluster_feed::start(cache.clone(), router.clone(), stop_background.clone())
        }
        None => cache::feed::start(cache.clone(), upstream.clone(), stop_background.clone()),
    }
    let tdengine = match config.tdengine.clone() {
        Some(td) => Some(Arc::new(tdengine::Tdengine::new(td)?)),
        None => None,
    };
    tracing::info!(
        listen = %addr,
        upstream = %config.upstream.url.redacted(),
        cache = config.cache.enabled,
        tdengine = tdengine.is_some(),
        "nearcache started"
    );
    let sidecar = server::Sidecar::new(Arc::new(config), upstream, cache, tdengine, cluster);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(admin) = admin {
        tokio::spawn(admin::serve_http(
            admin,
            sidecar.clone(),
            shutdown_rx.clone(),
        ));
    }
    let server = tokio::spawn(server::serve(listener, sidecar.clone(), shutdown_rx));
    Ok(Handle {
        addr,
        admin_addr,
        sidecar,
        shutdown: shutdown_tx,
        stop_background,
        server,
    })
}

/// Runs nearcache until `shutdown` completes, then drains and returns.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let handle = start(config).await?;
    shutdown.await;
    tracing::info!("shutdown requested; draining");
    handle.shutdown();
    handle.wait().await;
    tracing::info!("nearcache stopped");
    Ok(())
}
