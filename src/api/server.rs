//! The actix application: routes, request metrics, and the OpenAI-shaped
//! answers for unknown routes and methods.

use std::time::Instant;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::{web, App, HttpMessage, HttpRequest, HttpResponse, HttpServer};

use super::error::ApiError;
use super::state::AppState;
use super::{adapters, audit, chat, completions, examples, feedback, files, fine_tuning, models, policy, tenants, usage};

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::route_not_found(req.path()))
}

/// Registers every route on an actix app config.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/completions", web::post().to(completions::create))
        .route("/v1/chat/completions", web::post().to(chat::create))
        .route("/v1/models", web::get().to(models::list))
        // An id may hold a slash (a Hugging Face id, org/name).
        .route("/v1/models/{id:.+}", web::get().to(models::retrieve))
        .route("/v1/tenants", web::post().to(tenants::create))
        .route("/v1/tenants", web::get().to(tenants::list))
        .route("/v1/tenants/{name}", web::get().to(tenants::get))
        .route("/v1/tenants/{name}", web::delete().to(tenants::delete))
        .route("/v1/tenants/{name}/rotate_key", web::post().to(tenants::rotate))
        .route("/v1/adapters", web::post().to(adapters::upload))
        .route("/v1/adapters", web::get().to(adapters::list))
        .route("/v1/adapters/{name}", web::get().to(adapters::get))
        .route("/v1/adapters/{name}", web::delete().to(adapters::delete))
        .route("/v1/adapters/{name}/versions", web::get().to(adapters::versions))
        .route("/v1/adapters/{name}/versions/{version}", web::delete().to(adapters::delete_version))
        .route("/v1/adapters/{name}/versions/{version}/promote", web::post().to(adapters::promote))
        .route("/v1/adapters/{name}/versions/{version}/download", web::get().to(adapters::download))
        .route("/v1/adapters/{name}/rollback", web::post().to(adapters::rollback))
        .route("/v1/adapters/{name}/train", web::post().to(fine_tuning::train))
        .route("/v1/adapters/{name}/policy", web::get().to(policy::get))
        .route("/v1/adapters/{name}/policy", web::put().to(policy::put))
        .route("/v1/adapters/{name}/policy", web::delete().to(policy::delete))
        .route("/v1/adapters/{name}/examples", web::post().to(examples::create))
        .route("/v1/files", web::post().to(files::upload))
        .route("/v1/files", web::get().to(files::list))
        .route("/v1/files/{id}", web::get().to(files::get))
        .route("/v1/files/{id}", web::delete().to(files::delete))
        .route("/v1/files/{id}/content", web::get().to(files::content))
        .route("/v1/fine_tuning/jobs", web::post().to(fine_tuning::create))
        .route("/v1/fine_tuning/jobs", web::get().to(fine_tuning::list))
        .route("/v1/fine_tuning/jobs/{id}", web::get().to(fine_tuning::get))
        .route("/v1/fine_tuning/jobs/{id}/events", web::get().to(fine_tuning::events))
        .route("/v1/fine_tuning/jobs/{id}/checkpoints", web::get().to(fine_tuning::checkpoints))
        .route("/v1/fine_tuning/jobs/{id}/cancel", web::post().to(fine_tuning::cancel))
        .route("/v1/feedback", web::post().to(feedback::create))
        .route("/v1/feedback", web::get().to(feedback::list))
        .route("/v1/audit", web::get().to(audit::list))
        .route("/v1/usage", web::get().to(usage::get))
        .route("/health", web::get().to(models::health))
        .route("/metrics", web::get().to(models::metrics));
}

/// A request's id: the client's `x-request-id` when it is a short printable
/// token, else a fresh one.
fn request_id(req: &actix_web::dev::ServiceRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| crate::store::new_id("req"), str::to_string)
}

/// The request's id, for handlers that log on their own (streams end after the response line).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What a handler learned about a request, for its log line.
#[derive(Debug, Clone, Default)]
pub struct RequestLog {
    pub tenant: Option<String>,
    pub adapter: Option<String>,
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
}

/// Records a finished request's token counts for its log line.
pub fn log_tokens(req: &HttpRequest, prompt_tokens: usize, completion_tokens: usize) {
    if let Some(log) = req.extensions_mut().get_mut::<RequestLog>() {
        log.prompt_tokens = Some(prompt_tokens);
        log.completion_tokens = Some(completion_tokens);
    }
}

/// Binds and runs the HTTP server until SIGTERM or SIGINT, then shuts
/// down gracefully: new requests get 503, running ones get
/// `limits.shutdown_grace_secs` to finish, a training job is stopped, and
/// this returns. `on_bound` learns the bound address (port 0 picks a free one).
pub async fn run(
    state: AppState,
    on_bound: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    let host = state.settings.server.host.clone();
    let port = state.settings.server.port;
    let workers = match state.settings.server.workers {
        0 => num_cpus::get().clamp(1, 4),
        n => n,
    };
    let grace = std::time::Duration::from_secs(state.settings.limits.shutdown_grace_secs);
    let client_timeout = std::time::Duration::from_secs(state.settings.limits.client_timeout_secs.max(1));
    let draining = state.draining.clone();
    let (learner, metrics_for_drain) = (state.learner.clone(), state.metrics.clone());
    let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let in_flight_drain = in_flight.clone();
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        let metrics = data.metrics.clone();
        let draining = data.draining.clone();
        let in_flight = in_flight.clone();
        App::new()
            .app_data(data.clone())
            // Bad query strings (`?limit=abc`, unknown keys) answer in the OpenAI error shape too.
            .app_data(web::QueryConfig::default().error_handler(|e, _| ApiError::invalid(format!("invalid query string: {e}"), None).into()))
            .wrap_fn(move |req, srv| {
                let started = Instant::now();
                let metrics = metrics.clone();
                let id = request_id(&req);
                let (method, path) = (req.method().to_string(), req.path().to_string());
                let refuse = draining.load(std::sync::atomic::Ordering::SeqCst);
                let in_flight = in_flight.clone();
                in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                req.extensions_mut().insert(RequestId(id.clone()));
                let fut = if refuse { None } else { Some(srv.call(req)) };
                async move {
                    let _done = scopeguard(in_flight);
                    let mut res: ServiceResponse = match fut {
                        Some(fut) => fut.await?,
                        None => {
                            return Err(ApiError {
                                status: actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                                message: "the server is shutting down; retry on another instance".into(),
                                kind: "server_error",
                                param: None,
                                code: Some("shutting_down"),
                                retry_after: Some(1),
                            }
                            .into())
                        }
                    };
                    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&id) {
                        res.headers_mut().insert(actix_web::http::header::HeaderName::from_static("x-request-id"), v);
                    }
                    let route = res.request().match_pattern().unwrap_or_else(|| "unmatched".into());
                    let status = res.status().as_u16();
                    let secs = started.elapsed().as_secs_f64();
                    metrics.requests.with_label_values(&[route.as_str(), &status.to_string()]).inc();
                    metrics.request_latency.with_label_values(&[route.as_str()]).observe(secs);
                    let log = res.request().extensions().get::<RequestLog>().cloned().unwrap_or_default();
                    tracing::info!(
                        request_id = %id,
                        method = %method,
                        path = %path,
                        status,
                        latency_ms = (secs * 1000.0).round() as u64,
                        tenant = log.tenant.as_deref().unwrap_or(""),
                        adapter = log.adapter.as_deref().unwrap_or(""),
                        prompt_tokens = log.prompt_tokens,
                        completion_tokens = log.completion_tokens,
                        "request"
                    );
                    Ok(res)
                }
            })
            .configure(configure)
            .default_service(web::to(not_found))
    })
    .workers(workers)
    .client_request_timeout(client_timeout)
    // Idle keep-alive connections are closed after the same time.
    .keep_alive(client_timeout)
    .shutdown_timeout(grace.as_secs().max(1))
    .disable_signals()
    .bind((host.as_str(), port))?;
    if let Some(addr) = server.addrs().first() {
        on_bound(*addr);
    }
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        wait_for_signal().await;
        tracing::info!(grace_secs = grace.as_secs(), "shutting down: new requests get 503, running ones may finish");
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let stop_learner = actix_web::rt::task::spawn_blocking(move || learner.shutdown(grace));
        let until = Instant::now() + grace;
        loop {
            // The signal task's own requests are none; the count is HTTP requests in progress.
            let busy = in_flight_drain.load(std::sync::atomic::Ordering::SeqCst) > 0
                || metrics_for_drain.running_sequences.get() + metrics_for_drain.waiting_sequences.get() > 0;
            if !busy || Instant::now() >= until {
                break;
            }
            actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = stop_learner.await;
        handle.stop(true).await;
    });
    server.await
}

/// Decrements a request counter when dropped (also when a client goes away mid-response).
fn scopeguard(counter: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> impl Drop {
    struct Guard(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    Guard(counter)
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
