//! The HTTP front end (actix-web, on a thread of its own): the demo's `GET /set?key=&value=` and `GET /get?key=`,
//! a JSON API for get, put, delete and scan, `/status`, and `/metrics` in the Prometheus text format. Routes and
//! answers are listed in `docs/http.md`. Every request goes through the same routing as RESP (`requests.rs`); a
//! bad request gets a 4xx with a message, a failed one a 5xx with the reason.

use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};
use flotilla_raftstore::command::Op;
use flotilla_router::route::RouteError;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};

use super::requests::Requests;
use super::Status;

/// What every handler shares.
pub(super) struct HttpState {
    pub(super) requests: Arc<Requests>,
    pub(super) status: Box<dyn Fn() -> Status + Send + Sync>,
    pub(super) metrics: Option<PrometheusHandle>,
    pub(super) scan_count_max: usize,
}

/// Starts serving on `listener` on a thread of its own; returns the server's handle (to stop it) and the thread.
pub(super) fn start(
    listener: std::net::TcpListener,
    state: Arc<HttpState>,
    body_bytes_max: usize,
) -> std::io::Result<(actix_web::dev::ServerHandle, std::thread::JoinHandle<()>)> {
    let (handle_sender, handle) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name("flotilla-http".into()).spawn(move || {
        let system = actix_web::rt::System::new();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::from(Arc::clone(&state)))
                .app_data(web::PayloadConfig::new(body_bytes_max))
                .route("/get", web::get().to(demo_get))
                .route("/set", web::get().to(demo_set))
                .route("/v1/kv/{key}", web::get().to(kv_get))
                .route("/v1/kv/{key}", web::put().to(kv_put))
                .route("/v1/kv/{key}", web::delete().to(kv_delete))
                .route("/v1/scan", web::get().to(scan))
                .route("/status", web::get().to(status))
                .route("/metrics", web::get().to(metrics))
        })
        .workers(1)
        .disable_signals()
        .listen(listener);
        match server {
            Ok(server) => {
                let server = server.run();
                let _ = handle_sender.send(Ok(server.handle()));
                let _ = system.block_on(server);
            }
            Err(error) => {
                let _ = handle_sender.send(Err(error));
            }
        }
    })?;
    let handle = handle.recv().map_err(|_| std::io::Error::other("the HTTP thread ended"))??;
    Ok((handle, thread))
}

#[derive(Deserialize)]
struct KeyQuery {
    key: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
struct ScanQuery {
    #[serde(default)]
    start: String,
    #[serde(default)]
    end: String,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct Pair {
    key: String,
    value: String,
}

fn failed(error: RouteError) -> HttpResponse {
    match error {
        RouteError::InvalidArgument(_) | RouteError::BatchSpansRanges { .. } => {
            HttpResponse::BadRequest().body(format!("{error:?}\n"))
        }
        RouteError::Timeout => HttpResponse::GatewayTimeout().body("timed out: a write may or may not have happened\n"),
        other => HttpResponse::ServiceUnavailable().body(format!("{other:?}\n")),
    }
}

fn missing(what: &str) -> HttpResponse {
    HttpResponse::BadRequest().body(format!("missing query parameter '{what}'\n"))
}

/// `GET /get?key=K`: the value as the body, or 404.
async fn demo_get(state: web::Data<HttpState>, query: web::Query<KeyQuery>) -> HttpResponse {
    let Some(key) = &query.key else { return missing("key") };
    match state.requests.get(key.as_bytes()).await {
        Ok(Some(value)) => HttpResponse::Ok().body(value),
        Ok(None) => HttpResponse::NotFound().body("not found\n"),
        Err(error) => failed(error),
    }
}

/// `GET /set?key=K&value=V`: `OK` once durable on a majority.
async fn demo_set(state: web::Data<HttpState>, query: web::Query<KeyQuery>) -> HttpResponse {
    let (Some(key), Some(value)) = (&query.key, &query.value) else { return missing("key' and 'value") };
    match state.requests.write(vec![Op::put(key.as_bytes(), value.as_bytes())]).await {
        Ok(_) => HttpResponse::Ok().body("OK\n"),
        Err(error) => failed(error),
    }
}

async fn kv_get(state: web::Data<HttpState>, key: web::Path<String>) -> HttpResponse {
    match state.requests.get(key.as_bytes()).await {
        Ok(Some(value)) => {
            HttpResponse::Ok().json(Pair { key: key.into_inner(), value: String::from_utf8_lossy(&value).into() })
        }
        Ok(None) => HttpResponse::NotFound().json(serde_json::json!({ "error": "not found" })),
        Err(error) => failed(error),
    }
}

async fn kv_put(state: web::Data<HttpState>, key: web::Path<String>, body: web::Bytes) -> HttpResponse {
    match state.requests.write(vec![Op::put(key.as_bytes(), body.to_vec())]).await {
        Ok(_) => HttpResponse::NoContent().finish(),
        Err(error) => failed(error),
    }
}

async fn kv_delete(state: web::Data<HttpState>, key: web::Path<String>) -> HttpResponse {
    match state.requests.write(vec![Op::delete(key.as_bytes())]).await {
        Ok(_) => HttpResponse::NoContent().finish(),
        Err(error) => failed(error),
    }
}

/// `GET /v1/scan?start=&end=&limit=`: pairs in key order (keys and values as UTF-8, lossily).
async fn scan(state: web::Data<HttpState>, query: web::Query<ScanQuery>) -> HttpResponse {
    let limit = query.limit.unwrap_or(100);
    if limit > state.scan_count_max {
        return HttpResponse::BadRequest().body(format!("limit {limit} is over {}\n", state.scan_count_max));
    }
    match state.requests.scan(query.start.as_bytes(), query.end.as_bytes(), limit).await {
        Ok(pairs) => HttpResponse::Ok().json(
            pairs
                .into_iter()
                .map(|(key, value)| Pair {
                    key: String::from_utf8_lossy(&key).into(),
                    value: String::from_utf8_lossy(&value).into(),
                })
                .collect::<Vec<_>>(),
        ),
        Err(error) => failed(error),
    }
}

async fn status(state: web::Data<HttpState>) -> HttpResponse {
    HttpResponse::Ok().json((state.status)())
}

async fn metrics(state: web::Data<HttpState>) -> HttpResponse {
    match &state.metrics {
        Some(handle) => HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(handle.render()),
        None => HttpResponse::NotFound().body("metrics are recorded by another recorder in this process\n"),
    }
}
