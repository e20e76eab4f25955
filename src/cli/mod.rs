//! The command-line interface: argument parsing and dispatch only; the library does the work.

mod generate;

use clap::{Parser, Subcommand};

/// Latent diffusion in Rust: generate images with Stable Diffusion 1.x/2.x pipelines.
#[derive(Debug, Parser)]
#[command(name = "ldm", version, about, long_about = None, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a text prompt.
    Txt2img(generate::Txt2ImgArgs),
}

/// Parses the command line and runs it.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Txt2img(args) => generate::txt2img(args),
    }
}
