//! `ldm train-vae` and `ldm train`: flags to options; the loops live in `crate::training`.

use std::path::PathBuf;

use clap::{ArgGroup, Args};

use super::train_progress::ConsoleProgress;
use crate::device::{DeviceSpec, Precision};
use crate::models::nn::Activation;
use crate::models::unet::UNet2DConditionConfig;
use crate::training::optim::AdamWConfig;
use crate::training::unet::{
    self, PredictionTarget, SampleSettings, TextEncoderSetup, TextEncoderSizes, TrainUNetOptions,
    UNetSetup, UNetSizes,
};
use crate::training::vae::{self, ReconLoss, TrainVaeOptions, VaeArchitecture};

// ------------------------------------------------------------------------------- train-vae

/// `ldm train-vae`: train an AutoencoderKL on an image folder (negative ELBO).
#[derive(Debug, Args)]
pub struct TrainVaeArgs {
    /// Training images: an image folder with captions (metadata.jsonl with file_name and text,
    /// or a .txt beside each image). Captions are not used by the VAE but must exist.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,

    /// Output folder: vae/ (diffusers layout), checkpoint/, losses.csv, loss.png, samples/.
    #[arg(long, short, value_name = "OUT")]
    pub output: PathBuf,

    /// A diffusers vae/config.json giving the architecture (instead of the size flags).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"])]
    pub config: Option<PathBuf>,

    /// Start from a trained VAE (a vae/ folder, e.g. an earlier train-vae output, or a pipeline
    /// folder holding one): its config gives the architecture, its weights the initial values.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"])]
    pub pretrained: Option<PathBuf>,

    /// Train only the decoder of --pretrained: its encoder, latent space and scaling factor stay
    /// as they are, so diffusion models trained on its latents work with the new decoder.
    #[arg(long, requires = "pretrained")]
    pub decoder_only: bool,

    /// Channels of each encoder/decoder level; n levels downsample by 2^(n-1).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "C,C,..",
        default_values_t = vae::defaults::BLOCK_OUT_CHANNELS
    )]
    pub block_out_channels: Vec<usize>,

    /// ResNet blocks per encoder level (the decoder has one more).
    #[arg(long, value_name = "N", default_value_t = vae::defaults::LAYERS_PER_BLOCK)]
    pub layers_per_block: usize,

    /// Channels of the latent.
    #[arg(long, value_name = "N", default_value_t = vae::defaults::LATENT_CHANNELS)]
    pub latent_channels: usize,

    /// GroupNorm groups (must divide every block's channels).
    #[arg(long, value_name = "N", default_value_t = vae::defaults::NORM_NUM_GROUPS)]
    pub norm_num_groups: usize,

    /// Training size: images are resized (shorter side) and center-cropped to it.
    #[arg(long, value_name = "PX", default_value_t = vae::defaults::RESOLUTION)]
    pub resolution: usize,

    /// Mirror images horizontally at random (per seed and epoch).
    #[arg(long)]
    pub flip: bool,

    /// Train on random PX×PX windows of the --resolution images: the VAE is convolutional, so
    /// windows teach it full-resolution detail at a fraction of the cost.
    #[arg(long, value_name = "PX")]
    pub crop: Option<usize>,

    /// Reconstruction term: l1 (mean absolute error) or l2 (mean squared error), per pixel.
    #[arg(long, value_enum, default_value_t = ReconLoss::L1)]
    pub recon_loss: ReconLoss,

    /// Weight of KL(q(z|x) ‖ N(0, I)); the KL is summed over each image's latent and averaged
    /// over the batch, the reconstruction averaged over pixels.
    #[arg(long, value_name = "W", default_value_t = vae::defaults::KL_WEIGHT)]
    pub kl_weight: f64,

    /// AdamW learning rate (after warm-up).
    #[arg(long, value_name = "LR", default_value_t = vae::defaults::LR)]
    pub lr: f64,

    /// Updates over which the learning rate rises linearly to --lr.
    #[arg(long, value_name = "N", default_value_t = vae::defaults::WARMUP_STEPS)]
    pub warmup_steps: usize,

    /// AdamW's decoupled weight decay.
    #[arg(long, value_name = "WD", default_value_t = vae::defaults::WEIGHT_DECAY)]
    pub weight_decay: f64,

    /// Clip the global gradient norm to this (0 disables clipping).
    #[arg(long, value_name = "NORM", default_value_t = vae::defaults::MAX_GRAD_NORM)]
    pub max_grad_norm: f64,

    #[arg(long, value_name = "N", default_value_t = vae::defaults::BATCH_SIZE)]
    pub batch_size: usize,

    /// Total optimizer updates (a resumed run continues up to this).
    #[arg(long, value_name = "N", default_value_t = vae::defaults::MAX_STEPS)]
    pub max_steps: usize,

    /// Seed of everything random: initial weights, data order, flips, latent noise.
    #[arg(long, default_value_t = vae::defaults::SEED)]
    pub seed: u64,

    /// Device: cpu, cuda, cuda:N or metal. Default: the first GPU this build supports, else cpu.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,

    /// Compute precision. bf16/f16 train in mixed precision (f32 master weights and losses)
    /// and need a GPU; f16 has no loss scaling, so prefer bf16.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,

    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999) and
    /// export it instead of the raw weights.
    #[arg(long, value_name = "DECAY")]
    pub ema_decay: Option<f64>,

    /// Write a checkpoint every N steps (one is always written at the end and on Ctrl-C).
    #[arg(long, value_name = "N")]
    pub save_every: Option<usize>,

    /// Every N steps (and at the end), write samples/step-N.png: originals above reconstructions.
    #[arg(long, value_name = "N")]
    pub sample_every: Option<usize>,

    /// Continue from OUT/checkpoint with the same flags.
    #[arg(long)]
    pub resume: bool,

    /// No progress bar or messages, only the final summary.
    #[arg(long, short)]
    pub quiet: bool,
}

impl TrainVaeArgs {
    fn options(&self) -> anyhow::Result<TrainVaeOptions> {
        let architecture = match (&self.pretrained, &self.config) {
            (Some(dir), _) => VaeArchitecture::Pretrained(dir.clone()),
            (None, Some(path)) => VaeArchitecture::ConfigFile(path.clone()),
            (None, None) => VaeArchitecture::Sizes {
                block_out_channels: self.block_out_channels.clone(),
                layers_per_block: self.layers_per_block,
                latent_channels: self.latent_channels,
                norm_num_groups: self.norm_num_groups,
            },
        };
        let device = crate::device::open(self.device)?;
        Ok(TrainVaeOptions {
            architecture,
            resolution: self.resolution,
            flip: self.flip,
            crop: self.crop,
            recon_loss: self.recon_loss,
            kl_weight: self.kl_weight,
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            batch_size: self.batch_size,
            max_steps: self.max_steps,
            seed: self.seed,
            device,
            dtype: self.dtype.dtype(),
            ema_decay: self.ema_decay,
            decoder_only: self.decoder_only,
            save_every: self.save_every,
            sample_every: self.sample_every,
            resume: self.resume,
            ..TrainVaeOptions::new(self.data.clone(), self.output.clone())
        })
    }
}

/// Runs `ldm train-vae` and prints a summary on stdout.
pub fn train_vae(args: TrainVaeArgs) -> anyhow::Result<()> {
    let options = args.options()?;
    let mut progress = ConsoleProgress::new(args.quiet)?;
    let summary = vae::train(&options, &mut progress)?;
    drop(progress);
    let losses = summary
        .last_losses
        .map_or(String::new(), |[rec, kl, total]| {
            format!(", last loss {total:.5} (reconstruction {rec:.5}, KL {kl:.3})")
        });
    println!(
        "trained to step {} ({} steps in {:.1} s{losses}); {} images used, {} skipped",
        summary.step, summary.steps_run, summary.seconds, summary.images, summary.skipped_images
    );
    match (&summary.vae_dir, summary.scaling_factor) {
        (Some(dir), Some(factor)) => {
            println!("saved {} (scaling_factor {factor:.5})", dir.display())
        }
        // Not a success: a script chaining stages must not go on with an unfinished VAE.
        _ => anyhow::bail!(
            "interrupted: checkpoint saved in {}; continue with --resume",
            args.output.display()
        ),
    }
    Ok(())
}

// ----------------------------------------------------------------------------------- train

/// `ldm train`: train a text-conditioned latent U-Net (Stable Diffusion's objective) on a
/// captioned image folder, with a frozen VAE, and export it as a diffusers pipeline.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("text").required(true).args(["text_encoder", "train_text_encoder"])))]
pub struct TrainArgs {
    /// Training images with captions: metadata.jsonl (file_name, text) or a .txt beside each
    /// image.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,

    /// The frozen VAE: a `train-vae` output, a diffusers vae/ folder, or a pipeline folder.
    #[arg(long, value_name = "DIR")]
    pub vae: PathBuf,

    /// Output folder: the pipeline (model_index.json, unet/, text_encoder/, vae/, tokenizer/,
    /// scheduler/) with checkpoint/, losses.csv, loss.png and samples/ beside it.
    #[arg(long, short, value_name = "OUT")]
    pub output: PathBuf,

    /// CLIP tokenizer folder (or a pipeline folder with tokenizer/). Default: the tokenizer of
    /// the pipeline given to --text-encoder or --vae.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,

    /// Condition on this pretrained CLIP text encoder, frozen: a text_encoder/ folder or a
    /// pipeline folder.
    #[arg(long, value_name = "DIR")]
    pub text_encoder: Option<PathBuf>,

    /// Train a new CLIP text encoder jointly with the U-Net, sized by the --text-* flags.
    #[arg(long)]
    pub train_text_encoder: bool,

    /// Width of the new text encoder (also the U-Net's cross-attention width).
    #[arg(long, value_name = "N", default_value_t = unet::defaults::TEXT_HIDDEN_SIZE)]
    pub text_hidden_size: usize,

    /// Transformer layers of the new text encoder.
    #[arg(long, value_name = "N", default_value_t = unet::defaults::TEXT_LAYERS)]
    pub text_layers: usize,

    /// Attention heads of the new text encoder (must divide its width).
    #[arg(long, value_name = "N", default_value_t = unet::defaults::TEXT_HEADS)]
    pub text_heads: usize,

    /// MLP width of the new text encoder.
    #[arg(long, value_name = "N", default_value_t = unet::defaults::TEXT_INTERMEDIATE_SIZE)]
    pub text_intermediate_size: usize,

    /// A diffusers unet/config.json giving the U-Net's architecture (instead of the --unet-*
    /// flags); its channels and cross_attention_dim must fit the VAE and text encoder.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["unet_channels", "unet_layers_per_block", "unet_attention_heads", "unet_norm_groups"])]
    pub unet_config: Option<PathBuf>,

    /// Channels of each U-Net level (cross-attention at every level but the first, and in the
    /// mid block).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "C,C,..",
        default_values_t = unet::defaults::UNET_CHANNELS
    )]
    pub unet_channels: Vec<usize>,

    /// ResNet blocks per U-Net down level (the up levels have one more).
    #[arg(long, value_name = "N", default_value_t = unet::defaults::UNET_LAYERS_PER_BLOCK)]
    pub unet_layers_per_block: usize,

    /// Heads of every U-Net attention.
    #[arg(long, value_name = "N", default_value_t = unet::defaults::UNET_ATTENTION_HEADS)]
    pub unet_attention_heads: usize,

    /// GroupNorm groups of the U-Net (must divide every level's channels).
    #[arg(long, value_name = "N", default_value_t = unet::defaults::UNET_NORM_GROUPS)]
    pub unet_norm_groups: usize,

    /// What the U-Net predicts; written into the exported scheduler config.
    #[arg(long, value_enum, default_value_t = PredictionTarget::Epsilon)]
    pub prediction_type: PredictionTarget,

    /// Rescale the noise schedule to zero terminal SNR and sample with "trailing" timesteps
    /// (written into the exported scheduler config; needs --prediction-type v_prediction), so
    /// sampling starts from the pure noise the model was trained on.
    #[arg(long)]
    pub zero_terminal_snr: bool,

    /// Training size (resize the shorter side, center-crop). Default: the VAE's sample_size.
    #[arg(long, value_name = "PX")]
    pub resolution: Option<usize>,

    /// Mirror images horizontally at random (per seed and epoch).
    #[arg(long)]
    pub flip: bool,

    /// Probability of replacing a caption with the empty prompt (for classifier-free guidance).
    #[arg(long, value_name = "P", default_value_t = unet::defaults::UNCOND_PROB)]
    pub uncond_prob: f64,

    /// AdamW learning rate (after warm-up).
    #[arg(long, value_name = "LR", default_value_t = unet::defaults::LR)]
    pub lr: f64,

    /// Updates over which the learning rate rises linearly to --lr.
    #[arg(long, value_name = "N", default_value_t = unet::defaults::WARMUP_STEPS)]
    pub warmup_steps: usize,

    /// AdamW's decoupled weight decay.
    #[arg(long, value_name = "WD", default_value_t = unet::defaults::WEIGHT_DECAY)]
    pub weight_decay: f64,

    /// Clip the global gradient norm to this.
    #[arg(long, value_name = "NORM", default_value_t = unet::defaults::MAX_GRAD_NORM)]
    pub max_grad_norm: f64,

    /// Decay of the weights' exponential moving average, which is what gets exported.
    #[arg(long, value_name = "DECAY", default_value_t = unet::defaults::EMA_DECAY)]
    pub ema_decay: f64,

    #[arg(long, value_name = "N", default_value_t = unet::defaults::BATCH_SIZE)]
    pub batch_size: usize,

    /// Total optimizer updates (a resumed run continues up to this).
    #[arg(long, value_name = "N", default_value_t = unet::defaults::MAX_STEPS)]
    pub max_steps: usize,

    /// Seed of everything random: initial weights, data order, timesteps, caption dropout,
    /// noise; also the sample seeds.
    #[arg(long, default_value_t = unet::defaults::SEED)]
    pub seed: u64,

    /// Checkpoint and export the pipeline every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, value_name = "N", default_value_t = unet::defaults::SAVE_EVERY)]
    pub save_every: usize,

    /// Every N steps (and at the end), export the EMA weights and save
    /// samples/step-NNNNNN.png made with the real pipeline (0: never).
    #[arg(long, value_name = "N", default_value_t = unet::defaults::SAMPLE_EVERY)]
    pub sample_every: usize,

    /// Sample prompts separated by '|'. Default: the first distinct captions.
    #[arg(long, value_name = "A|B|..")]
    pub sample_prompts: Option<String>,

    /// DDIM steps of each sample.
    #[arg(long, value_name = "N", default_value_t = unet::defaults::SAMPLE_STEPS)]
    pub sample_steps: usize,

    /// Classifier-free guidance scale of the samples.
    #[arg(long, value_name = "G", default_value_t = unet::defaults::SAMPLE_GUIDANCE)]
    pub sample_guidance: f64,

    /// Precision of the exported weights: f16 or bf16 halve the size.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub save_dtype: Precision,

    /// Continue from OUT/checkpoint with the same flags.
    #[arg(long)]
    pub resume: bool,

    /// Device: cpu, cuda, cuda:N or metal. Default: the first GPU this build supports, else cpu.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,

    /// Compute precision. bf16/f16 train in mixed precision (f32 master weights and losses)
    /// and need a GPU.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,

    /// No progress bar or messages, only the final summary.
    #[arg(long, short)]
    pub quiet: bool,
}

impl TrainArgs {
    fn options(&self) -> anyhow::Result<TrainUNetOptions> {
        let text_encoder = match &self.text_encoder {
            Some(dir) => TextEncoderSetup::Pretrained(dir.clone()),
            None => TextEncoderSetup::Scratch(TextEncoderSizes {
                hidden_size: self.text_hidden_size,
                num_layers: self.text_layers,
                num_heads: self.text_heads,
                intermediate_size: self.text_intermediate_size,
                activation: Activation::QuickGelu,
            }),
        };
        let unet = match &self.unet_config {
            Some(path) => UNetSetup::Config(Box::new(UNet2DConditionConfig::from_file(path)?)),
            None => UNetSetup::Sizes(UNetSizes {
                channels: self.unet_channels.clone(),
                layers_per_block: self.unet_layers_per_block,
                attention_heads: self.unet_attention_heads,
                norm_num_groups: self.unet_norm_groups,
            }),
        };
        let prompts = self
            .sample_prompts
            .as_deref()
            .map_or_else(Vec::new, |text| {
                text.split('|')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect()
            });
        let device = crate::device::open(self.device)?;
        let defaults = TrainUNetOptions::new(
            self.data.clone(),
            self.output.clone(),
            self.vae.clone(),
            self.tokenizer_dir()?,
        );
        Ok(TrainUNetOptions {
            text_encoder,
            unet,
            prediction: self.prediction_type,
            zero_terminal_snr: self.zero_terminal_snr,
            resolution: self.resolution,
            batch_size: self.batch_size,
            max_steps: self.max_steps,
            optimizer: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                ..defaults.optimizer
            },
            warmup_steps: self.warmup_steps,
            max_grad_norm: self.max_grad_norm,
            ema_decay: self.ema_decay,
            uncond_prob: self.uncond_prob,
            random_flip: self.flip,
            seed: self.seed,
            save_every: self.save_every,
            samples: SampleSettings {
                every: self.sample_every,
                prompts,
                steps: self.sample_steps,
                guidance_scale: self.sample_guidance,
            },
            save_dtype: self.save_dtype.dtype(),
            resume: self.resume,
            device,
            dtype: self.dtype.dtype(),
            ..defaults
        })
    }

    /// --tokenizer, else the tokenizer/ of the pipeline holding the text encoder or the VAE.
    fn tokenizer_dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(dir) = &self.tokenizer {
            return Ok(dir.clone());
        }
        let sources = self.text_encoder.iter().chain([&self.vae]);
        let candidates = sources.flat_map(|path| {
            [Some(path.as_path()), path.parent()]
                .into_iter()
                .flatten()
                .map(|dir| dir.join("tokenizer"))
        });
        for candidate in candidates {
            if candidate.is_dir() {
                return Ok(candidate);
            }
        }
        anyhow::bail!(
            "no tokenizer found beside --vae or --text-encoder: pass --tokenizer DIR (a CLIP tokenizer folder)"
        )
    }
}

/// Runs `ldm train` and prints a summary on stdout.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let options = args.options()?;
    let mut progress = ConsoleProgress::new(args.quiet)?;
    let summary = unet::train(&options, &mut progress)?;
    drop(progress);
    let last = summary
        .losses
        .last()
        .map_or(String::new(), |(_, loss)| format!(", last loss {loss:.5}"));
    println!(
        "trained to step {} ({} steps in {:.1} s{last})",
        summary.step, summary.steps_run, summary.seconds
    );
    if summary.interrupted {
        anyhow::bail!(
            "interrupted: checkpoint and pipeline (EMA weights) saved in {}; continue with --resume",
            args.output.display()
        );
    } else {
        println!(
            "pipeline (EMA weights) in {}: ldm txt2img --model {} \"a prompt\"",
            args.output.display(),
            args.output.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli<T: Args> {
        #[command(flatten)]
        args: T,
    }

    /// Flags left out give exactly the library's defaults.
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let train = Cli::<TrainArgs>::try_parse_from([
            "ldm",
            "--data=d",
            "--vae=v",
            "--output=o",
            "--tokenizer=t",
            "--train-text-encoder",
            "--device=cpu",
        ])
        .unwrap();
        let defaults = TrainUNetOptions::new("d".into(), "o".into(), "v".into(), "t".into());
        assert_eq!(
            format!("{:?}", train.args.options().unwrap()),
            format!("{defaults:?}")
        );
        let train_vae =
            Cli::<TrainVaeArgs>::try_parse_from(["ldm", "--data=d", "--output=o", "--device=cpu"])
                .unwrap();
        let defaults = TrainVaeOptions::new("d".into(), "o".into());
        assert_eq!(
            format!("{:?}", train_vae.args.options().unwrap()),
            format!("{defaults:?}")
        );
    }
}
