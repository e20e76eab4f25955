//! `ldm serve`: options only; the server is `crate::serve`.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;

use super::generate_args::ModelArgs;
use crate::serve::ServeConfig;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// A folder of diffusers pipeline folders clients may switch to (A1111's
    /// `sd_model_checkpoint`, OpenAI's `model`), each named by its folder name.
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,

    /// Address to listen on; the default answers this machine only. 0.0.0.0 opens it to the
    /// network (set --api-key then).
    #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
    pub host: IpAddr,

    /// Port to listen on (A1111's default; 0 picks a free one).
    #[arg(long, default_value_t = 7860, value_name = "PORT")]
    pub port: u16,

    /// Require `Authorization: Bearer KEY` on every API request.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,

    /// How many requests may wait behind the running one; more get HTTP 429.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub max_queue: usize,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model.lora.lora_dir.is_none(),
        "ldm serve does not load LoRAs from prompt tags yet: merge them with --lora FILE[:WEIGHT]"
    );
    let (device, dtype) = args.model.device_and_dtype()?;
    let config = ServeConfig {
        model: args.model.model.clone(),
        model_options: args.model.options(),
        models_dir: args.models_dir,
        device,
        dtype,
        quantization: args.model.quantize,
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        max_queue: args.max_queue,
        loras: args.model.lora.loras.clone(),
    };
    crate::serve::run(&config, &mut |line| eprintln!("{line}"))
}
