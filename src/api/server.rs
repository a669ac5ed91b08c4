//! The actix application: routes, request metrics, and the OpenAI-shaped
//! answers for unknown routes and methods.

use std::time::Instant;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

use super::error::ApiError;
use super::state::AppState;
use super::{adapters, audit, chat, completions, examples, feedback, files, fine_tuning, models, policy, tenants};

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::route_not_found(req.path()))
}

/// Registers every route on an actix app config.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/completions", web::post().to(completions::create))
        .route("/v1/chat/completions", web::post().to(chat::create))
        .route("/v1/models", web::get().to(models::list))
        .route("/v1/tenants", web::post().to(tenants::create))
        .route("/v1/tenants", web::get().to(tenants::list))
        .route("/v1/tenants/{name}", web::delete().to(tenants::delete))
        .route("/v1/tenants/{name}/rotate_key", web::post().to(tenants::rotate))
        .route("/v1/adapters", web::post().to(adapters::upload))
        .route("/v1/adapters", web::get().to(adapters::list))
        .route("/v1/adapters/{name}", web::get().to(adapters::get))
        .route("/v1/adapters/{name}", web::delete().to(adapters::delete))
        .route("/v1/adapters/{name}/versions", web::get().to(adapters::versions))
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
        .route("/health", web::get().to(models::health))
        .route("/metrics", web::get().to(models::metrics));
}

/// Binds and runs the HTTP server until it is stopped. `on_bound` learns the
/// bound address (port 0 picks a free one).
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
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        let metrics = data.metrics.clone();
        App::new()
            .app_data(data.clone())
            // Bad query strings (`?limit=abc`, unknown keys) answer in the OpenAI error shape too.
            .app_data(web::QueryConfig::default().error_handler(|e, _| ApiError::invalid(format!("invalid query string: {e}"), None).into()))
            .wrap_fn(move |req, srv| {
                let started = Instant::now();
                let metrics = metrics.clone();
                let fut = srv.call(req);
                async move {
                    let res: ServiceResponse = fut.await?;
                    let route = res
                        .request()
                        .match_pattern()
                        .unwrap_or_else(|| "unmatched".into());
                    let status = res.status().as_u16().to_string();
                    metrics
                        .requests
                        .with_label_values(&[route.as_str(), status.as_str()])
                        .inc();
                    metrics
                        .request_latency
                        .with_label_values(&[route.as_str()])
                        .observe(started.elapsed().as_secs_f64());
                    Ok(res)
                }
            })
            .configure(configure)
            .default_service(web::to(not_found))
    })
    .workers(workers)
    .bind((host.as_str(), port))?;
    if let Some(addr) = server.addrs().first() {
        on_bound(*addr);
    }
    server.run().await
}
