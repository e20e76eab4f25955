//! The command-line interface: argument parsing and dispatch only; the library does the work.

mod conditioning;
mod generate;
mod generate_args;
mod lora;
mod serve;
mod train;
mod train_progress;

use clap::{Parser, Subcommand};

/// Latent diffusion in Rust: generate and edit images with Stable Diffusion 1.x/2.x pipelines.
#[derive(Debug, Parser)]
#[command(name = "ldm", version, about, long_about = None, arg_required_else_help = true)]
pub struct Cli {
    /// CPU threads for the computation (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a text prompt.
    Txt2img(generate::Txt2ImgArgs),
    /// Change an image guided by a prompt.
    Img2img(generate::Img2ImgArgs),
    /// Repaint the masked region of an image (white = repaint, black = keep).
    Inpaint(generate::InpaintArgs),
    /// Generate every prompt of a prompt file; re-running resumes where it stopped.
    Batch(generate::BatchCommandArgs),
    /// Train a VAE (AutoencoderKL) on an image folder, on its ELBO.
    TrainVae(train::TrainVaeArgs),
    /// Train a text-conditioned latent U-Net on captioned images; export a diffusers pipeline.
    Train(train::TrainArgs),
    /// Serve the A1111 and OpenAI image APIs and a web page, with the model loaded once.
    Serve(serve::ServeArgs),
}

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    crate::threads::configure(cli.threads)?;
    match cli.command {
        // The server waits on its sockets for its whole life: holding a pool thread would leave
        // one fewer for the requests, which enter the pool one by one.
        Command::Serve(args) => serve::serve(args),
        command => crate::threads::in_pool(|| dispatch(command)),
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Txt2img(args) => generate::txt2img(args),
        Command::Img2img(args) => generate::img2img(args),
        Command::Inpaint(args) => generate::inpaint(args),
        Command::Batch(args) => generate::batch_command(args),
        Command::TrainVae(args) => train::train_vae(args),
        Command::Train(args) => train::train(args),
        Command::Serve(args) => serve::serve(args),
    }
}
