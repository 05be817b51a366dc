//! The `nearcache` binary: parse the configuration, set up logging, run until
//! SIGTERM or SIGINT, drain, exit 0. Everything else lives in the library.
//!
//! Logs go to stderr (text or JSON lines); stdout carries only what a command
//! prints on purpose (`--check-config`, `--version`, `--help`). Exit status: 0
//! after a clean drain or a good `--check-config`, 2 for a configuration
//! error, 1 when starting failed (e.g. the listen address is taken).

use clap::Parser;
use nearcache::config::{Cli, Config, LogFormat, ProcessEnv};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse();
    let config = match Config::resolve(&cli, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nearcache: {e}");
            std::process::exit(2);
        }
    };
    if let Some(td) = &config.tdengine {
        // Route templates and patterns are checked here too, so --check-config catches them.
        if let Err(e) = nearcache::tdengine::Tdengine::new(td.clone()) {
            eprintln!("nearcache: {e}");
            std::process::exit(2);
        }
    }
    if cli.check_config {
        println!(
            "nearcache: configuration OK (listen {}, upstream {}, cache {}, tdengine routes {})",
            config.listen,
            config.upstream.url.redacted(),
            if config.cache.enabled { "on" } else { "off" },
            config.tdengine.as_ref().map_or(0, |t| t.routes.len()),
        );
        return;
    }

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }

    // One worker by default: like Redis's and twemproxy's event loop, it
    // avoids a cross-thread wake-up per request, which measured faster on
    // small (sidecar-sized) CPU budgets; one worker runs on tokio's
    // single-thread scheduler, which does less per task switch.
    let mut builder = if config.server.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if config.server.worker_threads > 0 {
            b.worker_threads(config.server.worker_threads);
        }
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nearcache: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        // Handlers first: a SIGTERM that arrives while binding must drain, not kill.
        let shutdown = shutdown_signal()?;
        let handle = nearcache::start(config).await?;
        let sidecar = handle.sidecar.clone();
        tokio::spawn(reload_on_sighup(sidecar, cli));
        shutdown.await;
        tracing::info!("shutdown requested; draining");
        handle.shutdown();
        handle.wait().await;
        tracing::info!("nearcache stopped");
        anyhow::Ok(())
    });
    if let Err(e) = result {
        eprintln!("nearcache: {e:#}");
        std::process::exit(1);
    }
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes on the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// SIGHUP re-reads the configuration file and applies the key policies.
async fn reload_on_sighup(sidecar: std::sync::Arc<nearcache::server::Sidecar>, cli: Cli) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match Config::resolve(&cli, &ProcessEnv) {
            Ok(c) => {
                sidecar.cache.set_policies(c.cache.policies);
                tracing::info!("configuration reloaded: key policies applied");
            }
            Err(e) => {
                tracing::warn!(error = %e, "configuration reload failed; keeping the old one")
            }
        }
    }
}
