//! Building and running the coordinator.
//!
//! Owns the coordinator's lifetime. The HTTP API and the Redis connection live as long as the
//! process; everything that needs RabbitMQ lives in a *broker session* (connection, topology,
//! publishers, the results consumer, the planners), which is rebuilt with backoff whenever the
//! broker goes away. While there is no session the API keeps answering reads and refuses only
//! what needs the broker; jobs created meanwhile are planned when the session comes back.
//!
//! Shutdown: stop accepting jobs, let planners finish their current batch (confirms
//! awaited), stop the results consumer after its current batch is recorded and acked, close
//! the broker connection, then stop the HTTP server.

use shared::redis_conn::RedisConn;
use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use shared::{
    amqp::{self, Publisher},
    config::Settings,
    store::{self, Scripts},
    topology::{self, Names},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::{
    aggregate, api,
    app::{AppState, Broker, spawn_planner},
    planner,
};

/// A coordinator, listening.
#[derive(Debug)]
pub struct Application {
    state: Arc<AppState>,
    listener: TcpListener,
    instance: String,
}

impl Application {
    /// Connects to Redis and binds the HTTP listener.
    ///
    /// # Errors
    /// Redis unreachable or the address in use.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let instance = format!(
            "coordinator-{}-{}",
            std::process::id(),
            &Uuid::new_v4().simple().to_string()[..6]
        );
        let redis = store::connect(
            &settings.redis,
            shared::topology::Names::new(&settings.namespace).key_prefix(),
        )
        .await
        .with_context(|| format!("connecting to Redis at {}", settings.redis.safe_url()))?;
        let listener = TcpListener::bind(&settings.coordinator.listen)
            .await
            .with_context(|| format!("binding the API to {}", settings.coordinator.listen))?;
        let names = Names::new(&settings.namespace);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let notifier = crate::notify::Notifier::start(
            crate::notify::NotifierConfig {
                deployment_urls: settings.coordinator.webhooks.clone(),
                secret: settings.coordinator.webhook_secret.clone(),
                max_attempts: settings.coordinator.webhook_max_attempts.max(1),
                initial_backoff: std::time::Duration::from_secs(1),
                audit_retention_days: settings.coordinator.audit.retention_days,
                outbound: crate::outbound::Policy::from_settings(&settings.coordinator),
            },
            redis.clone(),
            names.clone(),
            metrics.webhooks.clone(),
        );
        let bootstrap_sha256 = bootstrap_token(&settings)?.map(|t| crate::access::tokens::hash(&t));
        check_exposure(&settings)?;
        let outbound = crate::outbound::Policy::from_settings(&settings.coordinator);
        let signer = signer(&settings)?;
        let shutdown = CancellationToken::new();
        let oidc =
            crate::access::oidc::Oidc::start(&settings.coordinator.auth.oidc, shutdown.clone())
                .await?;
        let state = Arc::new(AppState {
            signer,
            oidc,
            outbound: outbound.clone(),
            bootstrap_sha256,
            names,
            settings: Arc::new(settings),
            redis,
            shutdown,
            metrics,
            notifier,
            broker: RwLock::new(None),
        });
        Ok(Self {
            state,
            listener,
            instance,
        })
    }

    /// The address the API listens on.
    ///
    /// # Errors
    /// Only if the socket has no local address.
    pub fn address(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, keeping a broker session up (reconnecting with
    /// backoff), then shuts down in order.
    ///
    /// # Errors
    /// The HTTP server failed.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Application {
            state,
            listener,
            instance,
        } = self;
        tracing::info!(address = %listener.local_addr()?, namespace = %state.names.namespace(), "coordinator listening");

        // The HTTP server stops last: it ends when the broker session is closed.
        let http_stop = CancellationToken::new();
        let http_stop_signal = http_stop.clone();
        let tls = api_tls(&state.settings).await?;
        let mut serving = tokio::spawn(serve(
            listener,
            api::router(state.clone()),
            tls,
            Duration::from_secs(state.settings.coordinator.header_timeout_secs.max(1)),
            http_stop_signal,
        ));
        let sessions =
            shared::supervise::with_reconnect("coordinator", state.shutdown.clone(), |stop| {
                broker_session(state.clone(), instance.clone(), stop)
            });
        tokio::pin!(sessions);
        tokio::pin!(shutdown);

        let result = tokio::select! {
            // SIGTERM or SIGINT: the session loop sees the cancelled token and drains.
            _ = &mut shutdown => {
                tracing::info!("coordinator stopping");
                state.shutdown.cancel();
                sessions.await
            }
            // Only ends once the token is cancelled; listed so a failure cannot go unseen.
            r = &mut sessions => r,
            // The HTTP server ended on its own.
            r = &mut serving => {
                state.shutdown.cancel();
                match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.context("HTTP server failed")),
                    Err(e) => Err(anyhow::Error::from(e).context("HTTP server panicked")),
                }
            }
        };
        http_stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), &mut serving).await;
        tracing::info!("coordinator stopped");
        result
    }
}

/// Serves the API on `listener` (HTTPS with `tls`) until `stop` fires, then lets requests
/// in flight finish for up to 10 s. A client gets `header_timeout` to send a request's
/// headers, the TLS handshake included, so half-sent requests cannot hold connections.
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    header_timeout: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let handle = axum_server::Handle::new();
    let on_stop = handle.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        on_stop.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    let listener = listener.into_std()?;
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    let mut server = axum_server::from_tcp(listener)?
        .handle(handle)
        .first_request_timeout(header_timeout);
    server
        .http_builder()
        .http1()
        .header_read_timeout(header_timeout);
    match tls {
        Some(config) => {
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config)
                .handshake_timeout(header_timeout);
            server.acceptor(acceptor).serve(app).await?;
        }
        None => server.serve(app).await?,
    }
    Ok(())
}

/// The API's TLS configuration, when settings name a certificate and key.
async fn api_tls(
    settings: &Settings,
) -> anyhow::Result<Option<axum_server::tls_rustls::RustlsConfig>> {
    let tls = &settings.coordinator.tls;
    match (&tls.cert_file, &tls.key_file) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| {
                    format!(
                        "coordinator.tls: loading the certificate {} and key {}",
                        cert.display(),
                        key.display()
                    )
                })?;
            Ok(Some(config))
        }
        _ => anyhow::bail!("coordinator.tls: cert_file and key_file go together"),
    }
}

/// One broker session: connect, declare, resume active jobs, aggregate results until the
/// connection fails (an error: the caller reconnects) or `stop` fires (Ok).
async fn broker_session(
    state: Arc<AppState>,
    instance: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let settings = &state.settings;
    let connection = Arc::new(
        amqp::connect(&settings.amqp, &format!("fleetbatch-{instance}"))
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", settings.amqp.safe_url()))?,
    );
    let publisher = Publisher::new(&connection, &settings.amqp).await?;
    topology::declare(publisher.channel(), settings)
        .await
        .context("declaring the broker topology")?;
    // Planners and the aggregator stop with the session, whether it ends by shutdown or by
    // a lost connection.
    let session = stop.child_token();
    let scripts = Scripts::new();
    let planners = Arc::new(planner::Planners {
        settings: settings.clone(),
        names: state.names.clone(),
        redis: state.redis.clone(),
        publisher: Publisher::new(&connection, &settings.amqp).await?,
        scripts: scripts.clone(),
        instance: instance.clone(),
        shutdown: session.clone(),
        running: Default::default(),
        metrics: state.metrics.clone(),
        notifier: state.notifier.clone(),
        outbound: state.outbound.clone(),
        signer: state.signer.clone(),
        tracker: TaskTracker::new(),
    });
    let aggregator = Arc::new(aggregate::Aggregator {
        names: state.names.clone(),
        redis: state.redis.clone(),
        publisher: publisher.clone(),
        scripts,
        prefetch: settings.coordinator.results_prefetch,
        shutdown: session.clone(),
        metrics: state.metrics.clone(),
        notifier: state.notifier.clone(),
        max_device_text_bytes: settings.coordinator.max_device_text_bytes,
    });
    let broker = Broker {
        connection: connection.clone(),
        publisher,
        tracker: planners.tracker.clone(),
        planners,
    };
    state.set_broker(Some(broker.clone()));
    tracing::info!("connected to RabbitMQ");

    // Resume jobs that were running when a coordinator (or this session) last stopped, and
    // keep adopting: a job whose coordinator died is planned on by another once its lease
    // lapses (a planner of this process waits for it).
    let mut redis = state.redis.clone();
    for id in unfinished_jobs(&mut redis, &state.names).await? {
        tracing::info!(job_id = %id, "resuming job");
        spawn_planner(&broker, id);
    }
    {
        let (broker, names, mut redis, session) = (
            broker.clone(),
            state.names.clone(),
            state.redis.clone(),
            session.clone(),
        );
        broker.tracker.clone().spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(ADOPT_EVERY) => {}
                    _ = session.cancelled() => return,
                }
                match unfinished_jobs(&mut redis, &names).await {
                    // A job planned here already returns at once.
                    Ok(ids) => ids.into_iter().for_each(|id| spawn_planner(&broker, id)),
                    Err(e) => tracing::debug!(error.message = %e, "adoption sweep skipped"),
                }
            }
        });
    }

    // Parked tasks come back when they are due.
    broker.tracker.clone().spawn(crate::wake::run(
        state.names.clone(),
        usize::from(settings.amqp.tasks_per_message.max(1)),
        state.redis.clone(),
        Publisher::new(&connection, &settings.amqp).await?,
        state.metrics.clone(),
        session.clone(),
    ));

    // Devices whose task was lost end with the reason, so every job finishes.
    broker
        .tracker
        .clone()
        .spawn(crate::reconcile::run(state.clone(), session.clone()));
    // Planning pauses while Redis is nearly full.
    broker.tracker.clone().spawn(crate::memory::run(
        state.redis.clone(),
        state.metrics.clone(),
        settings.coordinator.redis_memory_high_percent,
        session.clone(),
    ));
    // Finished jobs' data goes after its retention.
    broker
        .tracker
        .clone()
        .spawn(crate::retention::run(state.clone(), session.clone()));
    // Recurring jobs fire their occurrences.
    broker.tracker.clone().spawn(crate::recurring::run(
        state.clone(),
        broker.clone(),
        session.clone(),
    ));

    let results_channel = connection.create_channel().await?;
    // A channel the broker closes alone (a deleted exchange) is recovered with the whole
    // session, like a lost connection; until then the coordinator is not ready.
    let watched = [
        broker.publisher.channel().clone(),
        broker.planners.publisher.channel().clone(),
    ];
    let dead_channel = connection.create_channel().await?;
    let result = tokio::select! {
        r = aggregate::run(
            aggregator,
            results_channel.clone(),
            format!("{instance}-results"),
        ) => r,
        r = crate::deadwatch::run(
            state.clone(),
            dead_channel.clone(),
            format!("{instance}-dead-watch"),
            session.clone(),
        ) => r.context("watching dead letters"),
        () = async {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if watched.iter().any(|c| !c.status().connected()) {
                    return;
                }
            }
        } => Err(anyhow::anyhow!("the broker closed a publishing channel")),
    };

    // Tear the session down: no new planners, running ones stop after their batch.
    state.set_broker(None);
    session.cancel();
    broker.tracker.close();
    let grace = std::time::Duration::from_secs(30);
    let _ = tokio::time::timeout(grace, broker.tracker.wait()).await;
    // Closing a connection the broker dropped can wait forever: bounded, like every broker
    // call on the way out.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = results_channel.close(200, "session ending".into()).await;
        let _ = dead_channel.close(200, "session ending".into()).await;
        let _ = connection.close(200, "session ending".into()).await;
    })
    .await;
    if closed.is_err() {
        tracing::warn!("the broker connection did not close in time; leaving it");
    }
    match result {
        Ok(()) if stop.is_cancelled() => Ok(()),
        Ok(()) => anyhow::bail!("the results consumer stopped"),
        Err(e) => Err(e.context("broker session lost")),
    }
}

/// The bootstrap admin token: from settings, else from the file settings name.
fn bootstrap_token(settings: &Settings) -> anyhow::Result<Option<String>> {
    let auth = &settings.coordinator.auth;
    if let Some(t) = &auth.bootstrap_token {
        return Ok(Some(t.expose().to_owned()));
    }
    let Some(path) = &auth.bootstrap_token_file else {
        if auth.required {
            tracing::warn!(
                "no bootstrap admin token (coordinator.auth.bootstrap_token or bootstrap_token_file): only API tokens created earlier can call the API"
            );
        }
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .with_context(|| {
            format!(
                "reading coordinator.auth.bootstrap_token_file {}",
                path.display()
            )
        })?
        .trim()
        .to_owned();
    anyhow::ensure!(
        token.len() >= 32,
        "coordinator.auth.bootstrap_token_file {}: the token must be at least 32 characters",
        path.display()
    );
    Ok(Some(token))
}

/// Refuses to serve the API beyond this machine without both authentication and TLS, unless
/// settings say `coordinator.auth.insecure` (then warns).
fn check_exposure(settings: &Settings) -> anyhow::Result<()> {
    let auth = &settings.coordinator.auth;
    let listen = &settings.coordinator.listen;
    let loopback = listen
        .parse::<SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or_else(|_| listen.starts_with("localhost:"));
    let mut missing = Vec::new();
    if !auth.required {
        missing.push("authentication (coordinator.auth.required is false)");
    }
    if !settings.coordinator.tls.enabled() {
        missing.push("TLS (no coordinator.tls.cert_file and key_file)");
    }
    if loopback || missing.is_empty() {
        return Ok(());
    }
    let missing = missing.join(" and ");
    anyhow::ensure!(
        auth.insecure,
        "coordinator.listen {listen} is not a loopback address and the API has no {missing}: \
         anyone who reaches it could move the fleet or read its tokens; configure them, or set coordinator.auth.insecure: true"
    );
    tracing::warn!(%listen, missing, "serving the API on a non-loopback address without all of its protections (coordinator.auth.insecure)");
    Ok(())
}

/// How often a coordinator looks for unfinished jobs no planner of its own runs.
const ADOPT_EVERY: Duration = Duration::from_secs(10);

/// Jobs that need a planner: the active ones, and aborted ones whose automatic rollback is
/// not created yet.
async fn unfinished_jobs(
    redis: &mut RedisConn,
    names: &shared::topology::Names,
) -> Result<Vec<Uuid>, redis::RedisError> {
    let (mut ids, pending): (Vec<String>, Vec<String>) = redis::pipe()
        .smembers(names.active_jobs())
        .smembers(names.pending_rollbacks())
        .query_async(redis)
        .await?;
    ids.extend(pending);
    ids.sort();
    ids.dedup();
    Ok(ids.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect())
}

/// The job-document signer the settings describe, if any.
fn signer(settings: &Settings) -> anyhow::Result<Option<shared::signing::Signer25519>> {
    let s = &settings.coordinator.signing;
    let seed = match (&s.key, &s.key_file) {
        (Some(k), _) => k.expose().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading coordinator.signing.key_file {}", path.display()))?,
        (None, None) => {
            tracing::warn!(
                "job documents are not signed (no coordinator.signing.key): devices cannot verify who sent them"
            );
            return Ok(None);
        }
    };
    let signer = shared::signing::Signer25519::from_hex(&seed, &s.key_id)
        .map_err(|e| anyhow::anyhow!("coordinator.signing.key: {e}"))?;
    tracing::info!(key_id = %signer.key_id, public_key = %signer.public_hex(), "signing job documents");
    Ok(Some(signer))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::load_from(None, &env).expect("settings")
    }

    #[test]
    fn a_non_loopback_api_needs_authentication_and_tls_unless_insecure() {
        let open = "0.0.0.0:8080";
        let l = "FLEETBATCH_COORDINATOR__LISTEN";
        // Loopback: anything goes.
        assert!(check_exposure(&settings(&[])).is_ok());
        // Beyond it, without TLS: refused naming TLS.
        let e = check_exposure(&settings(&[(l, open)])).expect_err("refused");
        assert!(e.to_string().contains("coordinator.tls"), "{e}");
        // Without authentication either: both named.
        let e = check_exposure(&settings(&[
            (l, open),
            ("FLEETBATCH_COORDINATOR__AUTH__REQUIRED", "false"),
        ]))
        .expect_err("refused");
        assert!(e.to_string().contains("authentication"), "{e}");
        // With both, or with `insecure`: allowed.
        let tls = [
            (l, open),
            ("FLEETBATCH_COORDINATOR__TLS__CERT_FILE", "/etc/cert.pem"),
            ("FLEETBATCH_COORDINATOR__TLS__KEY_FILE", "/etc/key.pem"),
        ];
        assert!(check_exposure(&settings(&tls)).is_ok());
        assert!(
            check_exposure(&settings(&[
                (l, open),
                ("FLEETBATCH_COORDINATOR__AUTH__INSECURE", "true")
            ]))
            .is_ok()
        );
    }
}
