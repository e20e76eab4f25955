//! The worker: one thread that owns the loaded model and runs the queue's tasks one at a time,
//! through the library pipeline (`StableDiffusion::generate_until`), so a request makes the same
//! PNG bytes as `ldm txt2img` with the same settings.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use image::RgbImage;
use tokio::sync::{mpsc, oneshot};

use super::catalog::Catalog;
use super::error::{ApiError, ErrorKind};
use super::queue::{Queue, Task};
use super::request::{GeneratedImage, Generation, ImageRequest, SourceRequest};
use crate::conditioning::PromptOptions;
use crate::pipelines::{ImageJob, Sampling, SourceImage, StableDiffusion};
use crate::schedulers::SchedulerConfig;

/// The model in memory, with its scheduler config as loaded (requests may switch Karras on).
struct Loaded {
    name: String,
    pipeline: StableDiffusion,
    scheduler_config: SchedulerConfig,
}

pub struct Worker {
    catalog: Arc<Catalog>,
    queue: Arc<Queue>,
    /// The model requests run on unless they name another.
    selected: Arc<Mutex<String>>,
    loaded: Option<Loaded>,
}

impl Worker {
    /// A worker with the catalog's first model loaded (and selected).
    pub fn start(
        catalog: Arc<Catalog>,
        queue: Arc<Queue>,
        selected: Arc<Mutex<String>>,
    ) -> anyhow::Result<Self> {
        let mut worker = Self {
            catalog,
            queue,
            selected,
            loaded: None,
        };
        let name = worker.catalog.initial().name.clone();
        worker
            .ensure_loaded(&name)
            .map_err(|e| anyhow::anyhow!(e.message))?;
        *worker.selected.lock().expect("selected lock") = name;
        Ok(worker)
    }

    /// Runs tasks until every sender is gone.
    pub fn spawn(
        mut self,
        mut tasks: mpsc::UnboundedReceiver<Task>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("ldm-worker".into())
            .spawn(move || {
                while let Some(task) = tasks.blocking_recv() {
                    self.queue.taken();
                    if !task.abandoned() {
                        self.run(task);
                    }
                }
            })
    }

    fn run(&mut self, task: Task) {
        match task {
            Task::Generate { request, reply } => {
                // A panic deep in a model must cost one request, not the server.
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    crate::threads::in_pool(|| self.generate(&request, &reply))
                }))
                .unwrap_or_else(|_| {
                    Err(ApiError::new(
                        ErrorKind::Internal,
                        "the generation failed unexpectedly (see the server log)",
                    ))
                });
                self.queue.end();
                let _ = reply.send(result);
            }
            Task::SelectModel { name, reply } => {
                let result = self.ensure_loaded(&name);
                if result.is_ok() {
                    *self.selected.lock().expect("selected lock") = name;
                }
                let _ = reply.send(result);
            }
        }
    }

    /// Makes `name` the loaded model (the previous one is dropped first, to free its memory).
    fn ensure_loaded(&mut self, name: &str) -> Result<(), ApiError> {
        if self
            .loaded
            .as_ref()
            .is_some_and(|loaded| loaded.name == name)
        {
            return Ok(());
        }
        let folder = self.catalog.find(name).ok_or_else(|| {
            ApiError::invalid(
                "sd_model_checkpoint",
                format!(
                    "no model {name:?}; this server has: {}",
                    self.catalog.names()
                ),
            )
        })?;
        self.loaded = None;
        let pipeline = self
            .catalog
            .load(folder)
            .map_err(|error| ApiError::internal(&error))?;
        self.loaded = Some(Loaded {
            name: name.to_string(),
            scheduler_config: pipeline.scheduler_config.clone(),
            pipeline,
        });
        Ok(())
    }

    fn generate(
        &mut self,
        request: &ImageRequest,
        reply: &oneshot::Sender<Result<Generation, ApiError>>,
    ) -> Result<Generation, ApiError> {
        let name = match &request.model {
            Some(name) => name.clone(),
            None => self.selected.lock().expect("selected lock").clone(),
        };
        self.ensure_loaded(&name)?;
        let loaded = self.loaded.as_mut().expect("loaded above");
        loaded.pipeline.scheduler_config = loaded.scheduler_config.clone();
        if request.karras {
            let settings = &mut loaded.pipeline.scheduler_config.sigma_sampler;
            settings.use_karras_sigmas = true;
        }
        let pipeline = &loaded.pipeline;
        let sampling = sampling(pipeline, request);
        crate::schedulers::build(
            sampling.sampler,
            &pipeline.scheduler_config,
            sampling.steps,
            sampling.eta,
        )
        .map_err(|error| ApiError::invalid("sampler_name", format!("{error:#} (model {name})")))?;
        let options = PromptOptions::default();
        for (field, prompt) in [
            ("prompt", &request.prompt),
            ("negative_prompt", &request.negative_prompt),
        ] {
            crate::lora::prompt_loras(prompt, None)
                .map_err(|error| {
                    ApiError::invalid(
                        field,
                        format!("{error:#}: ldm serve does not load LoRAs per request yet (start it with --lora)"),
                    )
                })?;
            pipeline
                .check_prompt(prompt, &options)
                .map_err(|error| ApiError::invalid(field, format!("{error:#}")))?;
        }
        let sources = source_images(request.source.as_ref(), &sampling)?;
        let seeds = request.seeds();
        let queue = &self.queue;
        queue.begin(request.job, request.batches);
        let mut images = Vec::with_capacity(seeds.len());
        let mut interrupted = false;
        for (batch, batch_seeds) in seeds.chunks(request.batch_size).enumerate() {
            let jobs: Vec<ImageJob> = batch_seeds
                .iter()
                .enumerate()
                .map(|(i, &seed)| ImageJob {
                    prompt: request.prompt.clone(),
                    negative_prompt: request.negative_prompt.clone(),
                    seed,
                    source: (!sources.is_empty()).then(|| sources[i % sources.len()].clone()),
                })
                .collect();
            pipeline
                .validate(&sampling, &jobs)
                .map_err(|error| ApiError::new(ErrorKind::Invalid, format!("{error:#}")))?;
            let generated = pipeline
                .generate_until(&sampling, &options, &jobs, &mut |done, total| {
                    queue.update(|p| {
                        p.sampling_step = done;
                        p.sampling_steps = total;
                    });
                    if queue.interrupted() || reply.is_closed() {
                        interrupted = true;
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })
                .map_err(|error| ApiError::internal(&error))?;
            for ((image, info), &seed) in generated
                .images
                .iter()
                .zip(&generated.infos)
                .zip(batch_seeds)
            {
                images.push(encoded(image, info.to_infotext(), seed)?);
            }
            queue.update(|p| p.job_no = batch + 1);
            if interrupted || queue.interrupted() {
                interrupted = true;
                break;
            }
        }
        Ok(Generation {
            images,
            model: pipeline.model_name.clone(),
            width: sampling.width,
            height: sampling.height,
            interrupted,
        })
    }
}

/// The run's settings: sizes left open are the source image's (rounded down to the VAE
/// factor) or else the model's native ones, as the CLI chooses them.
fn sampling(pipeline: &StableDiffusion, request: &ImageRequest) -> Sampling {
    let (default_width, default_height) = match &request.source {
        Some(source) => {
            crate::image_io::default_size(&source.images[0], pipeline.vae_scale_factor())
        }
        None => pipeline.default_size(),
    };
    Sampling {
        sampler: request.sampler,
        steps: request.steps,
        guidance_scale: request
            .guidance_scale
            .unwrap_or_else(|| pipeline.default_guidance_scale()),
        guidance_rescale: 0.0,
        eta: request.eta,
        width: request.width.unwrap_or(default_width),
        height: request.height.unwrap_or(default_height),
        strength: request.source.as_ref().map_or(1.0, |s| s.strength),
        micro: Default::default(),
    }
}

/// The source images (and mask) as the pipeline takes them, at the run's size.
fn source_images(
    source: Option<&SourceRequest>,
    sampling: &Sampling,
) -> Result<Vec<SourceImage>, ApiError> {
    let Some(source) = source else {
        return Ok(Vec::new());
    };
    let (width, height) = (sampling.width, sampling.height);
    let mask = source
        .mask
        .as_ref()
        .map(|mask| crate::image_io::mask_tensor(mask, width, height))
        .transpose()
        .map_err(|error| ApiError::internal(&error))?;
    source
        .images
        .iter()
        .map(|image| {
            Ok(SourceImage {
                pixels: crate::image_io::source_image_tensor(image, width, height)
                    .map_err(|error| ApiError::internal(&error))?,
                mask: mask.clone(),
            })
        })
        .collect()
}

fn encoded(image: &RgbImage, infotext: String, seed: u64) -> Result<GeneratedImage, ApiError> {
    let png = crate::image_io::encode_png(image, &infotext)
        .map_err(|error| ApiError::internal(&error))?;
    Ok(GeneratedImage {
        png,
        infotext,
        seed,
    })
}
