//! `ldm serve`: one loaded model behind AUTOMATIC1111's API (`a1111`), OpenAI's Images API
//! (`openai`) and a web page (`web`).
//!
//! Requests are parsed and checked on the async side (axum on tokio) and queued (`queue`) for
//! the one worker thread (`worker`) that owns the model and runs the library pipeline, one job at
//! a time, so health checks and progress polls are answered while it generates.

mod a1111;
mod auth;
mod catalog;
mod error;
mod openai;
mod queue;
mod request;
mod samplers;
mod state;
mod web;
mod worker;

pub use error::{ApiError, ErrorKind};

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::get;
use axum::{Json, Router};
use candle_core::{DType, Device};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use catalog::Catalog;
use queue::Queue;
use state::AppState;
use worker::Worker;

/// The largest request body accepted (base64 images), in bytes.
const MAX_BODY: usize = 64 << 20;

/// How a server is set up.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// As `--model` takes it; `None` is the default model.
    pub model: Option<String>,
    /// How `model` is read (a single file's config folder, the prediction type).
    pub model_options: crate::model_source::ModelOptions,
    /// More pipeline folders clients may switch to.
    pub models_dir: Option<PathBuf>,
    pub device: Device,
    pub dtype: DType,
    /// How the U-Net's and text encoders' linear weights are stored (`--quantize`).
    pub quantization: Option<crate::models::nn::Quantization>,
    pub host: IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// When set, API requests need `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// How many requests may wait behind the running one.
    pub max_queue: usize,
    /// LoRAs merged into every model (`--lora`).
    pub loras: Vec<crate::lora::LoraSpec>,
}

/// A server running on its own threads (tests and embedders); [`run`] is the CLI's.
pub struct Server {
    addr: SocketAddr,
    model: String,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// Loads the model, binds, and serves in the background until [`Server::stop`] or drop.
    pub fn start(config: &ServeConfig) -> anyhow::Result<Self> {
        let (state, listener) = prepare(config)?;
        let addr = listener.local_addr()?;
        let model = state.selected_model();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ldm-serve".into())
            .spawn(move || {
                runtime()?.block_on(serve(listener, state, async {
                    let _ = stopped.await;
                }))
            })?;
        Ok(Self {
            addr,
            model,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The model loaded at start.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Stops accepting requests and waits for the open ones to finish.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> anyhow::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}

/// `ldm serve`: serves until Ctrl-C or SIGTERM. `announce` gets the lines for the operator
/// once the socket is bound (where to connect, and a warning when anyone can).
pub fn run(config: &ServeConfig, announce: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let (state, listener) = prepare(config)?;
    let addr = listener.local_addr()?;
    if !config.host.is_loopback() && state.api_key.is_none() {
        announce(&format!(
            "warning: listening on {} without --api-key: anyone who reaches this port can use it",
            config.host
        ));
    }
    announce(&format!(
        "ldm serve: model {} on http://{addr}/ (A1111 API at /sdapi/v1, OpenAI API at /v1){}",
        state.selected_model(),
        if state.api_key.is_some() {
            "; API key required"
        } else {
            ""
        }
    ));
    // Ctrl-C ends the process at once rather than waiting for queued generations.
    runtime()?.block_on(async move {
        tokio::select! {
            result = serve(listener, state, std::future::pending()) => result,
            _ = stop_signal() => Ok(()),
        }
    })
}

/// Loads the first model, starts the worker and binds the socket.
fn prepare(config: &ServeConfig) -> anyhow::Result<(Arc<AppState>, std::net::TcpListener)> {
    anyhow::ensure!(config.max_queue > 0, "--max-queue must be at least 1");
    let catalog = Arc::new(Catalog::new(
        config.model.as_deref(),
        &config.model_options,
        config.models_dir.as_deref(),
        config.device.clone(),
        config.dtype,
        config.quantization,
        config.loras.clone(),
    )?);
    let (queue, tasks) = Queue::new(config.max_queue);
    let queue = Arc::new(queue);
    let selected = Arc::new(Mutex::new(String::new()));
    Worker::start(catalog.clone(), queue.clone(), selected.clone())?
        .spawn(tasks)
        .context("cannot start the generation worker")?;
    let listener = std::net::TcpListener::bind((config.host, config.port))
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    listener.set_nonblocking(true)?;
    let state = Arc::new(AppState {
        queue,
        catalog,
        selected,
        api_key: config.api_key.clone().filter(|key| !key.is_empty()),
        options: Mutex::default(),
        files: state::FileStore::default(),
    });
    Ok((state, listener))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("the server failed")
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(web::page))
        .route("/health", get(health))
        .merge(a1111::routes())
        .merge(openai::routes())
        .fallback(openai::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Answers at once, whatever the worker is doing.
async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    let progress = state.queue.progress();
    Json(json!({
        "status": "ok",
        "model": state.selected_model(),
        "busy": !progress.job.is_empty(),
        "queued": state.queue.waiting(),
    }))
}

/// Ctrl-C, or SIGTERM on Unix (what container runtimes send).
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return ctrl_c.await,
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
