#!/usr/bin/env python3
"""Cross-check a VAE trained by `ldm train-vae` with diffusers (run by hand).

Loads OUT/vae with diffusers' AutoencoderKL, decodes the latents our Rust decode used and prints
the largest difference from our output. By default it reads what the test
`a_short_run_learns_and_exports_a_loadable_vae` (tests/train_vae.rs) leaves behind:

    cargo test --release --test train_vae a_short_run
    /work/pyenv/venv/bin/python scripts/check_trained_vae.py

or explicitly:

    python scripts/check_trained_vae.py --vae OUT/vae --check decode_check.safetensors

The check file holds `latents` (unscaled, [1, C, h, w]) and `decoded` (our decode of them).
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "target" / "tmp" / "train_vae_check"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, default=DEFAULT_DIR / "out" / "vae")
    parser.add_argument("--check", type=Path, default=DEFAULT_DIR / "decode_check.safetensors")
    args = parser.parse_args()

    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).eval()
    check = load_file(args.check)
    latents, ours = check["latents"].float(), check["decoded"].float()
    with torch.no_grad():
        theirs = vae.decode(latents).sample
    diff = (theirs - ours).abs().max().item()
    print(f"vae: {args.vae}")
    print(f"scaling_factor in config: {vae.config.scaling_factor:.6f}")
    print(f"latents {tuple(latents.shape)} -> images {tuple(theirs.shape)}")
    print(f"max |diffusers decode - ldm decode| = {diff:.3e}")
    if diff > 1e-4:
        raise SystemExit(f"difference {diff:.3e} exceeds 1e-4")


if __name__ == "__main__":
    main()
