//! What every request handler shares: the queue, the models, the settings clients stored, the
//! images kept for OpenAI's `url` responses, and the API key.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::catalog::Catalog;
use super::error::{ApiError, ErrorKind};
use super::queue::{Queue, Task};
use super::request::{Generation, ImageRequest};

/// How many generated images `url` responses keep serving (the oldest go first).
pub const KEPT_FILES: usize = 256;

pub struct AppState {
    pub queue: Arc<Queue>,
    pub catalog: Arc<Catalog>,
    /// The model requests run on unless they name another (A1111's `sd_model_checkpoint`).
    pub selected: Arc<Mutex<String>>,
    pub api_key: Option<String>,
    /// Options clients set through `POST /sdapi/v1/options`, echoed back by GET.
    pub options: Mutex<Map<String, Value>>,
    pub files: FileStore,
}

impl AppState {
    /// Queues `request` and waits for its images. Dropping the future (the client went away)
    /// tells the worker, which then skips or stops the job.
    pub async fn generate(&self, request: ImageRequest) -> Result<Generation, ApiError> {
        let (reply, result) = oneshot::channel();
        self.queue.submit(Task::Generate {
            request: Box::new(request),
            reply,
        })?;
        result.await.unwrap_or_else(|_| Err(worker_gone()))
    }

    /// Loads `name` (queued behind the requests before it) and selects it.
    pub async fn select_model(&self, name: String) -> Result<(), ApiError> {
        let (reply, result) = oneshot::channel();
        self.queue.submit(Task::SelectModel { name, reply })?;
        result.await.unwrap_or_else(|_| Err(worker_gone()))
    }

    /// `name` if the server has such a model, else an error naming `field`.
    pub fn check_model(&self, field: &str, name: &str) -> Result<String, ApiError> {
        match self.catalog.find(name) {
            Some(folder) => Ok(folder.name.clone()),
            None => Err(ApiError::invalid(
                field,
                format!(
                    "no model {name:?}; this server has: {}",
                    self.catalog.names()
                ),
            )),
        }
    }

    pub fn selected_model(&self) -> String {
        self.selected.lock().expect("selected lock").clone()
    }
}

fn worker_gone() -> ApiError {
    ApiError::new(ErrorKind::Internal, "the generation worker has stopped")
}

/// Generated PNGs kept in memory under unguessable names, for `response_format: "url"`.
#[derive(Default)]
pub struct FileStore {
    files: Mutex<KeptFiles>,
}

/// The PNGs by name, and their names oldest first.
#[derive(Default)]
struct KeptFiles {
    by_name: HashMap<String, Arc<Vec<u8>>>,
    order: VecDeque<String>,
}

impl FileStore {
    /// Keeps `png` and returns its name (`<128 random bits in hex>.png`).
    pub fn keep(&self, png: Vec<u8>) -> String {
        let name = format!("{:032x}.png", rand::random::<u128>());
        let mut files = self.files.lock().expect("file store lock");
        files.by_name.insert(name.clone(), Arc::new(png));
        files.order.push_back(name.clone());
        while files.order.len() > KEPT_FILES {
            if let Some(old) = files.order.pop_front() {
                files.by_name.remove(&old);
            }
        }
        name
    }

    pub fn get(&self, name: &str) -> Option<Arc<Vec<u8>>> {
        self.files
            .lock()
            .expect("file store lock")
            .by_name
            .get(name)
            .cloned()
    }
}
