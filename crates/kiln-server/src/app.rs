//! Assembly of `kiln serve`: the store, the runtime, templates, the manager, and one
//! listener that serves the REST API and sandbox traffic.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::serve::ListenerExt;
use axum::Router;
use kiln_api::API_KEY_HEADER;
use kiln_runtime::Runtime;

use crate::authz::Caller;
use crate::config::ServerConfig;
use crate::endpoint::Access;
use crate::error::{json_error, AppError};
use crate::keys;
use crate::manager::SandboxManager;
use crate::proxy::{self, Target};
use crate::report::chain;
use crate::state::AppState;
use crate::store::{SqliteStore, Store};
use crate::templates::{TemplateDefaults, TemplateInfo, Templates};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot prepare the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another kiln serve is using the data directory {path}; stop it or give --data-dir another directory")]
    DataDirInUse { path: PathBuf },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("cannot set up the {runtime} runtime")]
    Runtime {
        runtime: &'static str,
        #[source]
        source: kiln_runtime::RuntimeError,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditConfigError),
    #[error("cannot open the secrets")]
    Secrets(#[from] crate::secrets::SecretError),
    #[error("reading the egress upstream CA file {path} (--egress-upstream-ca): {reason}")]
    UpstreamCa { path: PathBuf, reason: String },
    #[error("setting up TLS for sandbox hosts (--sandbox-tls-listen)")]
    TlsHosts(#[from] crate::tls_hosts::TlsHostsError),
    #[error("recovering sandboxes from the previous run failed: {0}")]
    Recover(String),
    #[error(
        "KILN_NATS_TEAM names team {0:?}, which does not exist (create it: kiln teams create {0})"
    )]
    NatsTeam(String),
    #[error("building the base template failed")]
    Template(#[source] kiln_template::TemplateError),
    #[error("the server stopped with an error")]
    Serve(#[source] std::io::Error),
}

/// Build the HTTP application. Sandbox traffic is diverted before routing, so envd
/// paths never collide with API paths.
pub fn router(state: Arc<AppState>) -> Router {
    let mut app = Router::new();
    for endpoint in crate::routes::endpoints() {
        let handler = match endpoint.access {
            Access::Public => endpoint.handler,
            Access::Member => endpoint
                .handler
                .route_layer(middleware::from_fn_with_state(state.clone(), authenticate)),
            Access::Admin => endpoint.handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                authenticate_admin,
            )),
        };
        app = app.route(endpoint.path, handler);
    }
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            divert_sandbox_traffic,
        ))
        .with_state(state)
}

async fn not_found(req: Request) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn divert_sandbox_traffic(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    // Where the request came from, for the audit records made while serving it.
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let origin = crate::audit::Origin::from_request(peer, req.headers());
    crate::audit::scoped(origin, async move {
        match proxy::target(req.headers(), state.domain.as_deref()) {
            None => crate::error::with_request_id(req, next).await,
            Some(Target::Invalid(message)) => json_error(StatusCode::BAD_REQUEST, message),
            Some(Target::Sandbox { id, port }) => {
                proxy::forward(state.manager.clone(), id, port, req).await
            }
        }
    })
    .await
}

/// Middleware of `Access::Member` endpoints: a live key, or 401.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let caller = caller_of(&state, &req)?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// Middleware of `Access::Admin` endpoints: a live admin key, 401 without a key,
/// 403 with a member's.
pub async fn authenticate_admin(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let caller = caller_of(&state, &req)?;
    if !caller.admin {
        return Err(AppError::Forbidden(
            "this route is for admin keys only (`kiln keys create --admin`)".into(),
        ));
    }
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

fn caller_of(state: &AppState, req: &Request) -> Result<Caller, AppError> {
    let caller = key_of(state, req);
    if let Err(AppError::Unauthorized(_)) = &caller {
        state
            .manager
            .audit()
            .record(crate::audit::Event::new("auth.failed", false));
    }
    caller
}

fn key_of(state: &AppState, req: &Request) -> Result<Caller, AppError> {
    let key = req
        .headers()
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| AppError::Unauthorized("missing X-API-KEY header".into()))?;
    keys::caller(state.store.as_ref(), key)?
        .ok_or_else(|| AppError::Unauthorized("invalid API key".into()))
}

/// What the start banner says about the API key.
enum KeyNotice {
    /// Generated now: printed this once (and written to the key file).
    Plain(String),
    /// Given by the operator in `KILN_API_KEY`: they have it; never printed (logs of a
    /// service keep every start's banner).
    FromEnv,
    /// Generated on an earlier start: point at the file.
    InFile(PathBuf),
}

fn prepare_keys(store: &dyn Store, config: &ServerConfig) -> Result<KeyNotice, ServeError> {
    let team = keys::default_team(store)?;
    if let Some(key) = &config.api_key {
        keys::register(store, "KILN_API_KEY", key, true, team)?;
        return Ok(KeyNotice::FromEnv);
    }
    let path = config.data_dir.join("api-key");
    if !store.list_keys()?.is_empty() {
        return Ok(KeyNotice::InFile(path));
    }
    let key = keys::generate();
    keys::register(store, "generated at first start", &key, true, team)?;
    write_secret(&path, &key).map_err(|source| ServeError::DataDir {
        path: path.clone(),
        source,
    })?;
    Ok(KeyNotice::Plain(key))
}

fn lock_data_dir(data: &Path) -> Result<std::fs::File, ServeError> {
    let path = data.join("kiln.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ServeError::DataDir {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServeError::DataDirInUse {
            path: data.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(ServeError::DataDir { path, source }),
    }
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{secret}")
}

fn template_info(t: &kiln_template::Template) -> TemplateInfo {
    TemplateInfo {
        name: t.name.clone(),
        rootfs: t.rootfs.clone(),
        meta: TemplateDefaults {
            default_user: Some(t.meta.default_user.clone()),
            default_workdir: Some(t.meta.default_workdir.clone()),
            cpu_count: None,
            memory_mb: None,
            start_cmd: None,
            ready_cmd: None,
            envs: Default::default(),
            runtime: t
                .meta
                .runtime
                .as_deref()
                .and_then(kiln_runtime::RuntimeKind::parse),
            cdp_port: t.meta.cdp_port,
        },
    }
}

/// Give every template an owner before serving: the built-ins (`base` and the
/// configured ones) belong to no team, so every team may use them and only admins
/// change them; a template from before teams existed goes to the default team, whose
/// keys are the ones that could have built it.
fn claim_templates(
    store: &dyn Store,
    templates: &kiln_template::TemplateStore,
    builtins: &[String],
) -> Result<(), ServeError> {
    let default_team = keys::default_team(store)?;
    for name in std::iter::once(kiln_template::BASE).chain(builtins.iter().map(String::as_str)) {
        store.set_template_owner(name, None)?;
    }
    for t in templates.list().map_err(ServeError::Template)? {
        if store.template_owner(&t.name)?.is_none() {
            store.set_template_owner(&t.name, Some(default_team))?;
        }
    }
    Ok(())
}

/// The operator's extra roots for the servers behind header rules: every certificate
/// of a PEM file (none without one).
fn upstream_roots(
    path: Option<&std::path::Path>,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ServeError> {
    use rustls::pki_types::pem::PemObject;
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let err = |reason: String| ServeError::UpstreamCa {
        path: path.to_path_buf(),
        reason,
    };
    let roots = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if roots.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(roots)
}

/// Run `kiln serve` until the process is stopped.
pub async fn serve(config: ServerConfig, runtime: Arc<dyn Runtime>) -> Result<(), ServeError> {
    let data = &config.data_dir;
    std::fs::create_dir_all(data).map_err(|source| ServeError::DataDir {
        path: data.clone(),
        source,
    })?;
    // One server per data directory: a second one would take the first one's pooled
    // sandboxes for leftovers and remove them. Held until the process exits.
    let _lock = lock_data_dir(data)?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&data.join("kiln.db"))?);
    let key_notice = prepare_keys(store.as_ref(), &config)?;

    let audit_sink = crate::audit::AuditSink::from_env(data)?;
    let templates = Arc::new(Templates::default());
    let manager = SandboxManager::new(
        runtime.clone(),
        store.clone(),
        templates.clone(),
        config.limits,
    );
    manager.set_audit(Arc::new(crate::audit::AuditLog::new(audit_sink)));
    manager.set_desktop_token(config.desktop_auth_token.clone());
    let secrets = Arc::new(crate::secrets::Secrets::open(
        store.clone(),
        crate::secrets::key_path(&config.data_dir),
    )?);
    // Before `recover`: re-adopted sandboxes with domain or header rules start the
    // egress proxy.
    manager.set_egress_setup(crate::manager::EgressSetup {
        operator_allow: config.egress_allow.clone(),
        secrets: secrets.clone(),
        upstream_roots: upstream_roots(config.egress_upstream_ca.as_deref())?,
    });
    if let Some(url) = &config.nats_url {
        manager.events().connect_nats(url);
        tracing::info!(%url, "publishing lifecycle events to NATS");
    }
    manager.spawn_sampler();
    let (adopted, cleaned) = manager
        .recover()
        .await
        .map_err(|e| ServeError::Recover(chain(&e)))?;
    if adopted + cleaned > 0 {
        tracing::info!(
            adopted,
            cleaned,
            "recovered sandboxes from the previous run"
        );
    }

    let runner = Arc::new(crate::template_runner::SandboxStepRunner {
        runtime: runtime.clone(),
        manager: manager.clone(),
    });
    let builds = crate::builds::TemplateBuilds::open(
        data,
        runner,
        templates.clone(),
        manager.clone(),
        store.clone(),
        config.builds,
    )
    .map_err(ServeError::Template)?;
    builds.register_all();
    let builds = Arc::new(builds);
    let store_for_owners = store.clone();
    let spells = Arc::new(crate::spells::Spells::new(
        store.clone(),
        config.data_dir.join("spells"),
        config.spells,
    ));
    if let Some(url) = &config.nats_url {
        let team_id = match &config.nats_team {
            Some(name) => {
                store
                    .find_team(name)?
                    .ok_or_else(|| ServeError::NatsTeam(name.clone()))?
                    .id
            }
            None => keys::default_team(store.as_ref())?,
        };
        crate::work::start(
            url.clone(),
            crate::work::Worker {
                manager: manager.clone(),
                spells: spells.clone(),
                team_id,
                domain: config.domain.clone(),
                listen_port: config.listen.port(),
                desktop_resolution: config.desktop_resolution,
            },
        );
    }
    let state = Arc::new(AppState {
        manager: manager.clone(),
        store,
        templates: templates.clone(),
        ready: AtomicBool::new(false),
        domain: config.domain.clone(),
        builds: Some(builds.clone()),
        metrics_token: std::env::var("KILN_METRICS_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty()),
        spells: spells.clone(),
        secrets,
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    let app = router(state.clone());
    // Streamed envd events are small writes; without TCP_NODELAY each one can wait
    // for the peer's delayed ACK (~40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut graceful = stop_rx.clone();
    let mut server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = graceful.wait_for(|stop| *stop).await;
        })
        .await
    });
    let tls_server = match config.sandbox_tls_listen {
        Some(addr) => {
            let domain = config.domain.clone().unwrap_or_else(|| "localhost".into());
            let cert = config
                .tls_cert
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path()));
            let hosts = crate::tls_hosts::load(data, &domain, cert)?;
            let listener = crate::tls_hosts::TlsListener::bind(addr, hosts.acceptor.clone())
                .await
                .map_err(|source| ServeError::Listen { addr, source })?;
            let bound = axum::serve::Listener::local_addr(&listener).map_err(ServeError::Serve)?;
            match &hosts.local_ca {
                Some(ca) => println!(
                    "sandbox hosts: https://{{port}}-{{id}}.{domain} on {bound} (trust {})",
                    ca.display()
                ),
                None => println!("sandbox hosts: https://{{port}}-{{id}}.{domain} on {bound}"),
            }
            // The CDP route hands back `wss://` URLs to clients that came this way.
            let app = router(state.clone()).layer(axum::Extension(crate::cdp::ViaTls));
            let mut graceful = stop_rx.clone();
            Some(tokio::spawn(async move {
                axum::serve(
                    listener.tap_io(|_| {}),
                    app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                )
                .with_graceful_shutdown(async move {
                    let _ = graceful.wait_for(|stop| *stop).await;
                })
                .await
            }))
        }
        None => None,
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let template_store = kiln_template::TemplateStore::open(data).map_err(ServeError::Template)?;
    claim_templates(store_for_owners.as_ref(), &template_store, &config.builtins)?;
    templates.set_building(kiln_template::BASE, true);
    for name in &config.builtins {
        templates.set_building(name, true);
    }
    // A stop during the first (long) template build stops the server; the half-built
    // template is discarded by the next build.
    let mut stop_during_build = stop_rx.clone();
    let base = tokio::select! {
        built = template_store.ensure_base(&config.bin_dir, crate::progress::print_build_event) => {
            built.map_err(ServeError::Template)?
        }
        _ = stop_during_build.wait_for(|stop| *stop) => {
            tracing::info!("stopped while building the base template");
            return Ok(());
        }
    };
    let base = template_info(&base);
    templates.insert(base.clone());
    templates.set_building(kiln_template::BASE, false);
    manager.fill_pool(&base);

    print_banner(addr, &runtime.describe(), &key_notice);
    if !config.builtins.is_empty() {
        println!(
            "Building the built-in templates {} in the background (the first start takes \
             minutes; GET /healthz lists what is still building).\n",
            config.builtins.join(", ")
        );
        tokio::spawn(crate::builtins::build_all(
            config.builtins.clone(),
            data.clone(),
            builds,
            templates.clone(),
            manager.clone(),
        ));
    }
    // Ready only after the banner, so scripts that wait on /healthz can read it.
    state.ready.store(true, Ordering::Release);
    // Open streams (a background command's output, a watch) can last forever: give
    // them a moment after the signal, then stop regardless.
    let mut stopping = stop_rx;
    let served = tokio::select! {
        r = &mut server => match r {
            Ok(r) => r.map_err(ServeError::Serve),
            Err(e) => Err(ServeError::Serve(std::io::Error::other(e))),
        },
        _ = async {
            let _ = stopping.wait_for(|stop| *stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            server.abort();
            Ok(())
        }
    };
    if let Some(tls) = tls_server {
        tls.abort();
    }
    // Running sandboxes stay up and are re-adopted by the next start; idle pooled ones
    // have no owner yet and go.
    manager.drain_pools().await;
    tracing::info!("kiln serve stopped");
    served
}

const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stopping: finishing open requests");
}

fn print_banner(addr: std::net::SocketAddr, runtime: &str, key: &KeyNotice) {
    let host = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let url = format!("http://{host}");
    let key_line = match key {
        KeyNotice::Plain(k) => format!("export E2B_API_KEY={k}"),
        KeyNotice::FromEnv => "export E2B_API_KEY=\"$KILN_API_KEY\"".to_string(),
        KeyNotice::InFile(p) => format!("export E2B_API_KEY=$(cat {})", p.display()),
    };
    println!(
        "\nKiln is ready on {url} (runtime: {runtime}). To use it with the E2B SDKs:\n\n  \
         export E2B_API_URL={url}\n  export E2B_SANDBOX_URL={url}\n  {key_line}\n"
    );
    if runtime == "jail" {
        eprintln!(
            "warning: the jail runtime is a container boundary (namespaces, cgroups, seccomp); \
             run only code you would run in a container"
        );
    }
}
