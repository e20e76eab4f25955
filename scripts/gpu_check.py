#!/usr/bin/env python3
"""The GPU build checked on the GPU machine, where no Rust toolchain runs (so `cargo test` cannot):

  parity   the tiny-pipeline runs diffusers recorded (tests/fixtures/cases, the ones
           tests/cli_parity.rs checks on the CPU) through `ldm ... --device DEVICE --dtype f32`:
           final latents within cli_parity.rs's tolerance (2e-4), 8-bit pixels within 1 level;
           then the same runs in f16, whose difference is reported, not judged.
  default  the README's main command on the embedded model, on DEVICE (f16, its default there)
           against the CPU in f32: pixel difference and times.
  train    `ldm train` and `ldm train-vae` for a few steps on DEVICE on a generated captioned
           folder: they finish, losses are finite.

    scripts/gpu_check.py --ldm BIN [--device cuda] [--out DIR]

Needs Python with numpy, safetensors and Pillow (no torch, no diffusers). Writes DIR/gpu-check.md
and DIR/gpu-check.json (DIR: --out, default $OUT when set, else gpu-check-out); exit 1 when a
judged check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
# The tolerances of tests/cli_parity.rs.
LATENT_TOL = 2e-4
PIXEL_TOL = 1
SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler",
            "EulerAncestralDiscreteScheduler": "euler_a"}
SUBCOMMANDS = {"StableDiffusionPipeline": "txt2img", "StableDiffusionImg2ImgPipeline": "img2img",
               "StableDiffusionInpaintPipeline": "inpaint"}
MODELS = {"sd1": "tiny-sd1", "sd2": "tiny-sd2", "9ch": "tiny-inpaint", "4ch": "tiny-sd1"}


def run(cmd: list[str]) -> float:
    """Runs ldm; the wall seconds. Raises with its stderr when it fails."""
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def case_model(case: str) -> str | None:
    kind = case.split("_", 1)[1]
    for prefix, model in MODELS.items():
        if kind.startswith(prefix):
            return model
    return None


def parity_cases() -> list[str]:
    """The recorded pipeline runs whose model folder and sampler are here."""
    cases = []
    for path in sorted((FIXTURES / "cases").glob("*.json")):
        spec = json.loads(path.read_text())
        model = case_model(path.stem) if spec.get("pipeline") in SUBCOMMANDS else None
        if model and (FIXTURES / model).is_dir() and spec["scheduler_class"] in SAMPLERS:
            cases.append(path.stem)
    return cases


def parity_command(ldm: Path, case: str, device: str, dtype: str, out: Path) -> list:
    """The command tests/common/mod.rs's parity_command builds, for the cases above."""
    spec = json.loads((FIXTURES / "cases" / f"{case}.json").read_text())
    call, seeds = spec["call"], spec["seeds"]
    cmd = [ldm, SUBCOMMANDS[spec["pipeline"]], call["prompt"], "--model", FIXTURES / case_model(case),
           "--sampler", SAMPLERS[spec["scheduler_class"]], "--steps", call["num_inference_steps"],
           "--guidance-scale", call["guidance_scale"], "--seed", seeds[0], "--num-images", len(seeds),
           "--batch-size", len(seeds), "--width", call["width"], "--height", call["height"],
           "--device", device, "--dtype", dtype, "--quiet", "--overwrite",
           "--output", out / "image.png", "--save-latents", out / "latents.safetensors"]
    if "negative_prompt" in call:
        cmd += ["--negative-prompt", call["negative_prompt"]]
    for key, flag in [("guidance_rescale", "--guidance-rescale"), ("eta", "--eta"), ("strength", "--strength")]:
        if key in call:
            cmd += [flag, call[key]]
    for key, flag in [("image_path", "--image"), ("mask_path", "--mask")]:
        if key in spec:
            cmd += [flag, FIXTURES / spec[key]]
    return cmd


def pngs(out: Path, count: int) -> list[Path]:
    return [out / "image.png"] if count == 1 else [out / f"image-{i}.png" for i in range(1, count + 1)]


def check_parity(args, case: str, dtype: str, work: Path) -> dict:
    out = work / f"{case}-{dtype}"
    out.mkdir(parents=True, exist_ok=True)
    seconds = run(parity_command(args.ldm, case, args.device, dtype, out))
    expected = load_file(str(FIXTURES / "cases" / f"{case}.safetensors"))
    ours = load_file(str(out / "latents.safetensors"))["latents"].astype(np.float64)
    latent_diff = float(np.abs(ours - expected["latents_final"].astype(np.float64)).max())
    images = expected["image_u8"]
    pixel_diff = max(
        int(np.abs(np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) - images[i].astype(np.int16)).max())
        for i, p in enumerate(pngs(out, images.shape[0]))
    )
    judged = dtype == "f32"
    ok = latent_diff <= LATENT_TOL and pixel_diff <= PIXEL_TOL if judged else math.isfinite(latent_diff)
    return {"check": f"parity {case}", "dtype": dtype, "seconds": seconds, "latent_max_diff": latent_diff,
            "pixel_max_diff": pixel_diff, "ok": ok, "judged": judged}


def check_default(args, work: Path) -> dict:
    results = {}
    half = "f16" if args.device != "cpu" else "f32"
    for device, dtype in [(args.device, half), ("cpu", "f32")]:
        out = work / f"default-{device}-{dtype}.png"
        results[device] = run([args.ldm, "txt2img", "a black cat", "--device", device, "--dtype", dtype,
                               "--seed", "7", "--output", out, "--overwrite", "--quiet"])
        results[f"{device}_png"] = out
    a, b = (np.asarray(Image.open(results[f"{d}_png"]).convert("RGB"), dtype=np.int16) for d in (args.device, "cpu"))
    diff = np.abs(a - b)
    return {"check": "default model txt2img", "dtype": f"{args.device} {half} vs cpu f32",
            "seconds": f"{results[args.device]:.2f} vs {results['cpu']:.2f}",
            "pixel_max_diff": int(diff.max()), "pixel_mean_diff": float(diff.mean()), "ok": True, "judged": False}


def shapes_folder(folder: Path, size: int = 64) -> Path:
    from PIL import ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, colour in enumerate(["red", "green", "blue", "black", "yellow", "purple", "orange", "gray"] * 2):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        shape, name = (draw.ellipse, "circle") if i % 2 else (draw.rectangle, "square")
        shape([8 + i, 8 + i, size - 9 - i // 2, size - 9 - i // 2], fill=colour)
        image.save(folder / f"{i:02}.png")
        lines.append(json.dumps({"file_name": f"{i:02}.png", "text": f"a {colour} {name}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def final_losses(out: Path) -> dict:
    rows = (out / "losses.csv").read_text().split("\n")
    header, last = rows[0].split(","), [r for r in rows if r][-1].split(",")
    return dict(zip(header, map(float, last)))


def check_train(args, work: Path, dtype: str) -> list[dict]:
    data = shapes_folder(work / "data")
    weights = args.weights
    common = ["--data", data, "--max-steps", "20", "--batch-size", "8", "--seed", "0", "--device", args.device,
              "--dtype", dtype, "--quiet", "--save-every", "10", "--sample-every", "20"]
    commands = {
        "train": [args.ldm, "train", "--vae", weights / "vae", "--tokenizer", weights / "tokenizer",
                  "--output", work / f"unet-{dtype}", "--train-text-encoder", "--text-hidden-size", "128",
                  "--text-layers", "2", "--text-heads", "4", "--text-intermediate-size", "512",
                  "--unet-channels", "32,64,128", "--unet-layers-per-block", "1", "--unet-attention-heads",
                  "4", "--unet-norm-groups", "16", "--sample-prompts", "a red circle", "--sample-steps", "4",
                  *common],
        "train-vae": [args.ldm, "train-vae", "--output", work / f"vae-{dtype}", "--block-out-channels", "32,64",
                      "--layers-per-block", "1", "--latent-channels", "4", "--norm-num-groups", "16",
                      "--resolution", "64", *common],
    }
    results = []
    for name, cmd in commands.items():
        seconds = run(cmd)
        losses = final_losses(Path(cmd[cmd.index("--output") + 1]))
        results.append({"check": f"{name} 20 steps", "dtype": dtype, "seconds": seconds, "losses": losses,
                        "ok": all(math.isfinite(v) for v in losses.values()), "judged": True})
    return results


def guarded(results: list, what: str, fn, *fn_args) -> None:
    try:
        found = fn(*fn_args)
        results.extend(found if isinstance(found, list) else [found])
    except Exception as error:  # noqa: BLE001 (a failed check is reported, the others still run)
        results.append({"check": what, "ok": False, "judged": True, "error": str(error)})
    print(json.dumps(results[-1], default=str), file=sys.stderr, flush=True)


def render(results: list[dict], args) -> str:
    lines = [f"GPU check of {args.ldm} on {args.device}", "",
             "| check | dtype | seconds | latents max diff | pixels max diff | result |", "|---|---|---|---|---|---|"]
    for r in results:
        seconds = r.get("seconds", "")
        seconds = f"{seconds:.2f}" if isinstance(seconds, float) else seconds
        latent = f"{r['latent_max_diff']:.2e}" if "latent_max_diff" in r else ""
        if "losses" in r:
            latent = ", ".join(f"{k} {v:.4g}" for k, v in r["losses"].items() if k != "step")
        pixel = r.get("pixel_max_diff", "")
        if "pixel_mean_diff" in r:
            pixel = f"{pixel} (mean {r['pixel_mean_diff']:.2f})"
        verdict = ("ok" if r["ok"] else "FAIL") if r["judged"] else "reported"
        if "error" in r:
            verdict = f"FAIL: {r['error'][-600:]}".replace("\n", " ")
        lines.append(f"| {r['check']} | {r.get('dtype', '')} | {seconds} | {latent} | {pixel} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ldm", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out")
    ap.add_argument("--weights", type=Path, default=REPO / "weights",
                    help="the default model's folder, whose vae/ and tokenizer/ the training checks use")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gpu = args.device != "cpu"
        for case in parity_cases():
            for dtype in ("f32", "f16") if gpu else ("f32",):
                guarded(results, f"parity {case} {dtype}", check_parity, args, case, dtype, work)
        guarded(results, "default model txt2img", check_default, args, work)
        for dtype in ("f32", "bf16") if gpu else ("f32",):
            guarded(results, f"train {dtype}", check_train, args, work / f"train-{dtype}", dtype)
    text = render(results, args)
    print(text)
    (out / "gpu-check.md").write_text(text)
    (out / "gpu-check.json").write_text(json.dumps(results, indent=1, default=str))
    if not all(r["ok"] for r in results if r["judged"]):
        sys.exit("gpu_check: a check failed")


if __name__ == "__main__":
    main()
