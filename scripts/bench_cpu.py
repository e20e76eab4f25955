#!/usr/bin/env python3
"""CPU benchmark: ldm (the release CLI) against diffusers on the same weights, settings and seed.

Normally run through scripts/bench_cpu.sh (which builds target/release/ldm first):

    scripts/bench_cpu.sh                      # default model, 10 DDIM steps, 1 and 4 images
    scripts/bench_cpu.sh --model DIR --steps 30 --repeat 3 --record

Model (--model DIR, a diffusers-layout SD pipeline folder). Default: weights/ when it holds a
model_index.json (the embedded default model), else a "small" SD1-like pipeline with seeded random
weights that this script builds with diffusers once and caches (--cache-dir, default
~/.cache/ldm-bench): UNet block_out_channels (64, 128, 256), 2 layers per block, 8 heads,
cross_attention_dim 256 (15.4 GFLOP per CFG step at 256x256); CLIP text encoder hidden 256 x 6
layers; VAE (32, 64, 128, 128) x1 layer, factor 8 (31 GFLOP per decoded image, about 2 U-Net
steps, as in SD 1.5); tokenizer and SD 1.5 DDIM scheduler from tests/fixtures/tiny-sd1. Native
size 256x256 (latents 32x32). `--config tiny` uses tests/fixtures/tiny-sd1 itself (64x64), where
per-op overhead rather than compute dominates.

What runs, per case (1 image, 4 images), --repeat times, ldm and diffusers alternating:
  ldm:       target/release/ldm txt2img PROMPT --model M --steps N --seed S -W W -H H --device cpu
             --dtype f32 -N n -g G --save-latents F -o OUT.png, as a child process under
             /usr/bin/time -v (peak RSS) on a pseudo-terminal: the time at which its progress bar
             first shows step k is when step k finished, which gives the time to the first step
             (process start, model load and prompt encoding included), the steady step rate and
             the decode + save time without any change to ldm.
  diffusers: a fresh Python process (also under /usr/bin/time -v) that imports torch/diffusers,
             sets torch threads to --threads (default: nproc), loads the same folder with
             StableDiffusionPipeline (float32, DDIM from the folder's scheduler config), and calls it
             with the same prompt/steps/guidance/size and
             generator=[torch.Generator("cpu").manual_seed(S + i) for i in range(n)];
             callback_on_step_end timestamps every step and keeps the final latents; the PNGs
             are saved like ldm's.  diffusers' times start at from_pretrained (the Python/torch
             import is reported separately and NOT counted, which favours diffusers).
The fastest repeat (by end-to-end time) of each side is reported.

Correctness: ldm's --save-latents (key "latents") against diffusers' final latents (max abs diff)
and ldm's PNGs against diffusers' PNGs (max 8-bit difference). A case whose images disagree (more
than --max-pixel-diff) is marked INVALID and the script exits with status 1: speed on a wrong
image does not count.

Ratios are diffusers / ldm, so above 1 means ldm is faster. Noise: on a machine that other
processes keep busy (the load average is printed), both thread pools spin-wait for descheduled
threads and wall times can swing by 2-5x between runs; use --repeat, read the CPU s columns, and
compare with a --threads 1 run, which is the contention-robust measure of the work each side does.

Output: a markdown table on stdout (plus per-run details); with --record the same table, the
command line and the machine (nproc, CPU model, load average, versions) are appended to the
"## CPU" section of BENCHMARKS.md (--results FILE).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import pty
import re
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_SD1 = REPO / "tests" / "fixtures" / "tiny-sd1"
SMALL_VERSION = 2  # bump when the small config changes (cache key)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def build_small_pipeline(dest: Path) -> None:
    """A small SD1-like pipeline with seeded random weights, saved in the diffusers layout."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=256,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_SD1 / "tokenizer"))
    scheduler = DDIMScheduler.from_pretrained(str(TINY_SD1 / "scheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    # The fixture's slow-tokenizer files verbatim (vocab.json + merges.txt), as SD 1.x ships them.
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(TINY_SD1 / "tokenizer", tmp / "tokenizer")
    tmp.rename(dest)


# SD 1.5's own component configs (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/vae/text_encoder
# config.json), written out because nothing can be downloaded here.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, mid_block_scale_factor=1,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, act_fn="silu",
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5,
)


def build_sd15_pipeline(dest: Path, dtype=None) -> None:
    """SD 1.5's architecture from its real configs with seeded random weights (PyTorch's default
    initialisation), saved in the diffusers layout: the speed of SD 1.5 without its weights.
    `dtype` (e.g. torch.float16) casts the weights before saving (scripts/bench_gpu.py)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    torch.manual_seed(1)
    vae = AutoencoderKL(**SD15_VAE)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_SD1 / "tokenizer"))
    scheduler = DDIMScheduler.from_pretrained(str(TINY_SD1 / "scheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if dtype is not None:
        pipe.to(dtype=dtype)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(TINY_SD1 / "tokenizer", tmp / "tokenizer")
    tmp.rename(dest)


def resolve_model(args) -> tuple[Path, str]:
    """(folder, description)."""
    if args.model:
        path = Path(args.model).resolve()
        if not (path / "model_index.json").is_file():
            sys.exit(f"--model {path}: no model_index.json (a diffusers pipeline folder is needed)")
        return path, f"--model {path}"
    if args.config == "default":
        default = REPO / "weights"
        if (default / "model_index.json").is_file():
            return default, "the embedded default model (weights/)"
        args.config = "small"
    if args.config == "tiny":
        return TINY_SD1, "tests/fixtures/tiny-sd1 (random weights, UNet (32, 64), 64x64)"
    cache = Path(args.cache_dir).expanduser()
    if args.config == "sd15":
        dest = cache / "sd15-random-v1"
        if not (dest / "model_index.json").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            print(f"building the SD 1.5-architecture random pipeline in {dest} ...", file=sys.stderr)
            subprocess.run([sys.executable, __file__, "--build-sd15", str(dest)], check=True)
        return dest, f"SD 1.5 architecture (real configs, seeded random weights, {dest})"
    dest = cache / f"small-sd1-v{SMALL_VERSION}"
    if not (dest / "model_index.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"building the small random-weight pipeline in {dest} ...", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--build-small", str(dest)], check=True)
    return dest, (
        f"small SD1-like pipeline with seeded random weights ({dest}): UNet (64, 128, 256) x2 layers, "
        "8 heads, cross-attn 256; CLIP 256 x 6 layers; VAE (32, 64, 128, 128) x1 layer"
    )


def native_size(model: Path) -> int:
    unet = json.loads((model / "unet" / "config.json").read_text())
    vae = json.loads((model / "vae" / "config.json").read_text())
    sample = unet.get("sample_size", 64)
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    return sample * 2 ** (len(vae["block_out_channels"]) - 1)


def count_params(model: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for comp in ("unet", "vae", "text_encoder"):
        files = sorted((model / comp).glob("*.safetensors"))
        files = [f for f in files if ".fp16." not in f.name] or files
        n = 0
        for f in files[:1]:
            with safe_open(str(f), "np") as st:
                for k in st.keys():
                    shape = st.get_slice(k).get_shape()
                    size = 1
                    for d in shape:
                        size *= d
                    n += size
        out[comp] = n
    return out


# ----------------------------------------------------------------------------------------------
# Running a child process: wall time, peak RSS (/usr/bin/time -v), optional pty progress events
# ----------------------------------------------------------------------------------------------
STEP_RE = re.compile(rb"(\d+)/(\d+) steps")


def run_timed(cmd: list[str], env: dict, pty_steps: bool, time_v: bool = True) -> dict:
    """Runs cmd under /usr/bin/time -v (without it when not time_v: no RSS or CPU seconds). With
    pty_steps, on a pseudo-terminal, recording when each 'k/N steps' progress position first
    appears (seconds from the start)."""
    fd, time_file = tempfile.mkstemp(prefix="bench-time-")
    os.close(fd)
    full = ["/usr/bin/time", "-v", "-o", time_file, *cmd] if time_v else cmd
    step_times: dict[int, float] = {}
    output = bytearray()
    t0 = time.perf_counter()
    if pty_steps:
        master, slave = pty.openpty()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        while True:
            try:
                ready, _, _ = select.select([master], [], [], 0.5)
            except InterruptedError:
                continue
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child side closed
                    break
                if not chunk:
                    break
                now = time.perf_counter() - t0
                for m in STEP_RE.finditer(chunk):
                    step_times.setdefault(int(m.group(1)), now)
                output += chunk
            elif proc.poll() is not None:
                break
        os.close(master)
        proc.wait()
    else:
        proc = subprocess.run(full, stdin=subprocess.DEVNULL, capture_output=True, env=env)
        output += proc.stdout + proc.stderr
    wall = time.perf_counter() - t0
    report = Path(time_file).read_text(errors="replace")
    os.unlink(time_file)
    text = output.decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{text[-4000:]}\n{report}")
    if not time_v:
        return {"wall": wall, "step_times": step_times, "output": text, "pid": proc.pid}
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", report).group(1))
    sys_t = float(re.search(r"System time \(seconds\): ([\d.]+)", report).group(1))
    return {
        "wall": wall,
        "rss_mb": rss_kb / 1024,
        "cpu_s": user + sys_t,
        "step_times": step_times,
        "output": text,
    }


def step_metrics(step_times: dict[int, float], steps: int, end: float) -> dict:
    """First step / steady step rate / after-the-last-step from 'step k finished at t' events."""
    seen = sorted(step_times.items())
    seen = [(k, t) for k, t in seen if k >= 1]
    if not seen:
        return {"first_step": None, "step_s": None, "tail": None, "steps_seen": 0}
    first_k, first_t = seen[0]
    last_k, last_t = seen[-1]
    step_s = (last_t - first_t) / (last_k - first_k) if last_k > first_k else None
    first = first_t if first_k == 1 else None
    tail = end - last_t if last_k == steps else None
    return {"first_step": first, "step_s": step_s, "tail": tail, "steps_seen": len(seen)}


# ----------------------------------------------------------------------------------------------
# The two sides
# ----------------------------------------------------------------------------------------------
def run_ldm(args, model: Path, n: int, size: tuple[int, int], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    latents = out_dir / "latents.safetensors"
    cmd = [
        str(args.ldm), "txt2img", args.prompt,
        "--model", str(model),
        "--negative-prompt", args.negative_prompt,
        "--steps", str(args.steps),
        "--guidance-scale", str(args.guidance),
        "--seed", str(args.seed),
        "-W", str(size[0]), "-H", str(size[1]),
        "--device", "cpu", "--dtype", args.dtype,
        *(["--quantize", args.quantize] if args.quantize else []),
        "-N", str(n),
        "--save-latents", str(latents),
        "-o", str(out_dir / "ldm.png"),
        "--overwrite",
    ]
    env = dict(os.environ, TERM=os.environ.get("TERM", "xterm") or "xterm",
               RAYON_NUM_THREADS=str(args.threads))
    res = run_timed(cmd, env, pty_steps=True)
    res.update(step_metrics(res["step_times"], args.steps, res["wall"]))
    res["total"] = res["wall"]
    res["cpu_run_s"] = res["cpu_s"]
    res["cmd"] = cmd
    pngs = [out_dir / "ldm.png"] if n == 1 else [out_dir / f"ldm-{i}.png" for i in range(1, n + 1)]
    if not all(p.is_file() for p in pngs):
        # the numbering rule of `-o` for several images: accept what was written
        pngs = sorted(out_dir.glob("ldm*.png"))
    res["pngs"] = [str(p) for p in pngs]
    res["latents"] = str(latents)
    return res


def run_diffusers(args, model: Path, n: int, size: tuple[int, int], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": str(model), "prompt": args.prompt, "negative_prompt": args.negative_prompt,
        "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "n": n,
        "width": size[0], "height": size[1], "threads": args.threads, "out_dir": str(out_dir),
        "dtype": args.dtype,
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--diffusers-worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false")
    res = run_timed(cmd, env, pty_steps=False)
    report = json.loads((out_dir / "report.json").read_text())
    res.update(report)
    res["cmd"] = cmd
    return res


def diffusers_worker(spec: dict) -> None:
    t_start = time.perf_counter()
    import resource

    import torch
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    torch.set_num_threads(spec["threads"])
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t_imported = time.perf_counter()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)

    pipe = StableDiffusionPipeline.from_pretrained(
        spec["model"], torch_dtype={"f32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]],
        safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    t_loaded = time.perf_counter()
    stamps: list[float] = []
    final: dict = {}

    def on_step_end(_pipe, _i, _t, kwargs):
        stamps.append(time.perf_counter())
        final["latents"] = kwargs["latents"]
        return kwargs

    n = spec["n"]
    with torch.inference_mode():
        images = pipe(
            spec["prompt"],
            negative_prompt=spec["negative_prompt"] or None,
            num_inference_steps=spec["steps"],
            guidance_scale=spec["guidance"],
            height=spec["height"],
            width=spec["width"],
            num_images_per_prompt=n,
            generator=[torch.Generator("cpu").manual_seed(spec["seed"] + i) for i in range(n)],
            callback_on_step_end=on_step_end,
        ).images
    out = Path(spec["out_dir"])
    pngs = []
    for i, image in enumerate(images):
        path = out / f"diffusers-{i + 1}.png"
        image.save(path)
        pngs.append(str(path))
    t_done = time.perf_counter()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    save_file({"latents": final["latents"].float().contiguous()}, str(out / "latents.safetensors"))

    steps = spec["steps"]
    report = {
        "import_s": t_imported - t_start,
        "load_s": t_loaded - t_imported,
        # times from the start of from_pretrained (the import is not counted)
        "first_step": stamps[0] - t_imported,
        "step_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None,
        "tail": t_done - stamps[-1],
        "total": t_done - t_imported,
        "total_with_import": t_done - t_start,
        "steps_seen": len(stamps),
        # CPU seconds (all threads) from from_pretrained to the PNGs, import excluded
        "cpu_run_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "pngs": pngs,
        "latents": str(out / "latents.safetensors"),
        "steps": steps,
    }
    (out / "report.json").write_text(json.dumps(report))


# ----------------------------------------------------------------------------------------------
# Agreement
# ----------------------------------------------------------------------------------------------
def compare(ldm: dict, ref: dict) -> dict:
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file  # reads bf16 too, which numpy cannot

    a = load_file(ldm["latents"])["latents"].double().numpy()
    b = load_file(ref["latents"])["latents"].double().numpy()
    if a.shape != b.shape:
        return {"ok": False, "why": f"latent shapes {a.shape} vs {b.shape}"}
    latent_diff = float(np.abs(a - b).max())
    latent_scale = float(np.abs(b).max())
    if len(ldm["pngs"]) != len(ref["pngs"]):
        return {"ok": False, "why": f"{len(ldm['pngs'])} vs {len(ref['pngs'])} images"}
    pixel_diff = 0
    pixel_std = []
    for p, q in zip(ldm["pngs"], ref["pngs"]):
        x = np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
        y = np.asarray(Image.open(q).convert("RGB"), dtype=np.int16)
        if x.shape != y.shape:
            return {"ok": False, "why": f"image shapes {x.shape} vs {y.shape}"}
        pixel_diff = max(pixel_diff, int(np.abs(x - y).max()))
        pixel_std.append(float(y.std()))
    return {
        "latent_diff": latent_diff,
        "latent_scale": latent_scale,
        "pixel_diff": pixel_diff,
        "pixel_std": min(pixel_std),
        "finite": bool(np.isfinite(a).all() and np.isfinite(b).all()),
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def fmt(x, spec=".2f", none="n/a"):
    return none if x is None else format(x, spec)


def ratio(ref, ours):
    if ref is None or ours is None or ours == 0:
        return None
    return ref / ours


def machine_info(args) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        fl = re.search(r"^flags\s*:(.*)$", text, re.M)
        if fl:
            have = set(fl.group(1).split())
            flags = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in have)
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        pass

    def cmd_out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:
            return ""

    versions = cmd_out([sys.executable, "-c",
                        "import torch, diffusers, transformers;"
                        "print(torch.__version__, diffusers.__version__, transformers.__version__)"]).split()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "cpu_flags": flags,
        "memory": mem,
        "kernel": platform.release(),
        "ldm_rev": cmd_out(["git", "describe", "--always", "--dirty"]),
        "ldm_binary": f"{getattr(args, 'ldm_source', args.ldm)} built "
        + dt.datetime.fromtimestamp(args.ldm.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S"),
        "rustc": cmd_out(["rustc", "--version"]),
        "torch": versions[0] if versions else "?",
        "diffusers": versions[1] if len(versions) > 1 else "?",
        "transformers": versions[2] if len(versions) > 2 else "?",
        "python": platform.python_version(),
    }


def render(results, info, args, model_desc, size, loads, params) -> str:
    lines = []
    lines.append(
        f"Model: {model_desc}; params unet {params['unet'] / 1e6:.1f}M, vae {params['vae'] / 1e6:.1f}M, "
        f"text encoder {params['text_encoder'] / 1e6:.1f}M. {size[0]}x{size[1]}, DDIM {args.steps} steps, "
        f"guidance {args.guidance} (batch 2n through the U-Net), seed {args.seed}, {args.dtype}{' (ldm --quantize ' + args.quantize + ')' if args.quantize else ''}, "
        f"{args.threads} threads each (torch.set_num_threads / RAYON_NUM_THREADS); best of {args.repeat}."
    )
    lines.append("")
    lines.append(
        "| case | ldm s/image | diffusers s/image | speedup (diffusers/ldm) | ldm steps/s | diffusers steps/s "
        "| step speedup | ldm first step s | diffusers first step s | ldm decode+save s | diffusers decode+save s "
        "| ldm CPU s | diffusers CPU s | ldm peak RSS MiB | diffusers peak RSS MiB | max latent diff | max pixel diff |"
    )
    lines.append("|" + "---|" * 17)
    for r in results:
        n, l, d, c = r["n"], r["ldm"], r["diffusers"], r["check"]
        valid = c.get("ok", True)
        sp = ratio(d["total"], l["total"])
        stp = ratio(d["step_s"], l["step_s"])
        mark = "" if valid else " INVALID"
        lines.append(
            f"| {n} image{'s' if n > 1 else ''} | {l['total'] / n:.2f} | {d['total'] / n:.2f} | "
            f"**{fmt(sp)}x**{mark} | {fmt(1 / l['step_s'] if l['step_s'] else None)} | "
            f"{fmt(1 / d['step_s'] if d['step_s'] else None)} | {fmt(stp)}x | {fmt(l['first_step'])} | "
            f"{fmt(d['first_step'])} | {fmt(l['tail'])} | {fmt(d['tail'])} | {l['cpu_run_s']:.1f} | "
            f"{d['cpu_run_s']:.1f} | {l['rss_mb']:.0f} | "
            f"{d['rss_mb']:.0f} | {fmt(c.get('latent_diff'), '.2e')} | {c.get('pixel_diff', 'n/a')} |"
        )
    lines.append("")
    lines.append(
        "s/image: end-to-end wall time / images. ldm: the whole `ldm txt2img` process (start, load, "
        "encode, denoise, decode, PNG + latents written). diffusers: from `from_pretrained` to the PNGs "
        "written, Python/torch import excluded "
        f"(import took {statistics.median(r['diffusers']['import_s'] for r in results):.1f} s more). "
        "steps/s: steady denoising rate (one U-Net call on the CFG batch + DDIM step), from the time "
        "step 1 finished to the last step. first step: time until step 1 finished, load and prompt "
        "encoding included. decode+save: after the last step until the images are written. CPU s: "
        "user + system seconds of all threads over the same span (diffusers: import excluded); less "
        "sensitive than wall time to other processes on the machine, but busy-waiting counts. "
        "Peak RSS: /usr/bin/time -v of each process (diffusers' includes the Python interpreter and "
        "torch). Image agreement: max |latent| difference of the final latents "
        "and max 8-bit difference over all PNGs."
    )
    lines.append("")
    lines.append(
        f"Machine: {info['nproc']} cores, {info['cpu']} ({info['cpu_flags']}), {info['memory']}, Linux "
        f"{info['kernel']}; load average before/after: {loads[0]} / {loads[1]}. ldm: work tree {info['ldm_rev']}, "
        f"{info['ldm_binary']} ({info['rustc']}, candle CPU backend); torch {info['torch']}, diffusers {info['diffusers']}, "
        f"transformers {info['transformers']}, Python {info['python']}."
    )
    return "\n".join(lines)


def record(path: Path, text: str, command: str) -> None:
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    entry = f"### {stamp}\n\n```sh\n{command}\n```\n\n{text}\n"
    if path.exists():
        content = path.read_text()
    else:
        content = "# Benchmarks\n\n"
    m = re.search(r"^## CPU[^\n]*\n", content, re.M)
    if not m:
        if not content.endswith("\n\n"):
            content = content.rstrip("\n") + "\n\n"
        content += "## CPU\n\nMade by `scripts/bench_cpu.sh --record` (see scripts/bench_cpu.py).\n\n" + entry
    else:
        nxt = re.search(r"^## (?!#)", content[m.end():], re.M)
        end = m.end() + nxt.start() if nxt else len(content)
        section = content[:end].rstrip("\n") + "\n\n" + entry
        content = section + ("\n" + content[end:] if nxt else "")
    path.write_text(content)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--diffusers-worker":
        diffusers_worker(json.loads(sys.argv[2]))
        return
    if len(sys.argv) >= 3 and sys.argv[1] == "--build-sd15":
        build_sd15_pipeline(Path(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) >= 3 and sys.argv[1] == "--build-small":
        build_small_pipeline(Path(sys.argv[2]))
        return

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="scripts/bench_cpu.sh also takes --no-build (skip `cargo build --release`). "
                                 "What is measured and how: the docstring of scripts/bench_cpu.py.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers pipeline folder (default: weights/ if it has model_index.json, else --config)")
    ap.add_argument("--config", choices=["default", "small", "tiny", "sd15"], default="default",
                    help="without --model: default = weights/ when present, else small")
    ap.add_argument("--cache-dir", default=os.environ.get("LDM_BENCH_CACHE", "~/.cache/ldm-bench"),
                    help="where the small random pipeline is built once")
    ap.add_argument("--ldm", default=str(REPO / "target" / "release" / "ldm"), help="ldm binary")
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="weights and activations on both sides (bf16: both round differently, so "
                         "raise --max-pixel-diff)")
    ap.add_argument("--quantize", choices=["q8_0"],
                    help="ldm's --quantize (diffusers stays unquantized: raise --max-pixel-diff)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--size", type=int, help="width = height in pixels (default: the model's native size)")
    ap.add_argument("--cases", default="1,4", help="comma-separated numbers of images")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side and case; the fastest is reported")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides (default nproc)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-step warm-up of both sides")
    ap.add_argument("--max-pixel-diff", type=int, default=2, help="8-bit difference above which a case is INVALID")
    ap.add_argument("--out-dir", help="keep images/latents here (default: a temporary folder, removed)")
    ap.add_argument("--record", action="store_true", help="append the results to the CPU section of --results")
    ap.add_argument("--results", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--json", help="also write the raw results as JSON here")
    args = ap.parse_args()

    args.ldm = Path(args.ldm).resolve()
    if not args.ldm.is_file():
        sys.exit(f"{args.ldm} not found: build it with `cargo build --release` (or use scripts/bench_cpu.sh)")
    if not Path("/usr/bin/time").is_file():
        sys.exit("/usr/bin/time (GNU time) is needed for peak RSS: apt-get install time")
    model, model_desc = resolve_model(args)
    side = args.size or native_size(model)
    size = (side, side)
    cases = [int(c) for c in args.cases.split(",") if c.strip()]
    params = count_params(model)

    tmp = None
    if args.out_dir:
        out_root = Path(args.out_dir).resolve()
        out_root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ldm-bench-")
        out_root = Path(tmp.name)

    # A private copy, so that a rebuild during the run cannot mix two binaries.
    frozen = out_root / "ldm-under-test"
    shutil.copy2(args.ldm, frozen)
    args.ldm_source, args.ldm = args.ldm, frozen

    loads = [loadavg(), None]
    print(f"model: {model_desc}", file=sys.stderr)
    print(f"size {size[0]}x{size[1]}, {args.steps} steps, cases {cases}, threads {args.threads}, "
          f"load average {loads[0]}", file=sys.stderr)
    if float(loads[0].split()[0]) > 0.5:
        print(f"warning: the machine is not idle (load average {loads[0]}): wall times are noisy and "
              "both sides lose time in spin-waiting thread pools (torch's OpenMP more than ldm's); "
              "compare the CPU s columns, or run with --threads 1 for a contention-robust comparison",
              file=sys.stderr)

    if not args.no_warmup:
        # Page-cache the weights and the Python modules; nothing of this is timed.
        warm = argparse.Namespace(**vars(args))
        warm.steps = 1
        run_ldm(warm, model, 1, size, out_root / "warmup" / "ldm")
        run_diffusers(warm, model, 1, size, out_root / "warmup" / "diffusers")

    results = []
    for n in cases:
        runs = {"ldm": [], "diffusers": []}
        for rep in range(args.repeat):
            for name, fn in (("ldm", run_ldm), ("diffusers", run_diffusers)):
                r = fn(args, model, n, size, out_root / f"n{n}" / f"{name}-{rep}")
                runs[name].append(r)
                print(f"  {n} image(s) {name} run {rep + 1}: total {r['total']:.2f} s, first step "
                      f"{fmt(r['first_step'])} s, {fmt(r['step_s'], '.3f')} s/step, decode+save "
                      f"{fmt(r['tail'])} s, peak RSS {r['rss_mb']:.0f} MiB, CPU {r['cpu_run_s']:.1f} s, "
                      f"load {loadavg()}", file=sys.stderr)
        best = {k: min(v, key=lambda r: r["total"]) for k, v in runs.items()}
        check = compare(best["ldm"], best["diffusers"])
        if "ok" not in check:
            check["ok"] = check["finite"] and check["pixel_diff"] <= args.max_pixel_diff
        results.append({"n": n, "ldm": best["ldm"], "diffusers": best["diffusers"], "check": check,
                        "all_totals": {k: [r["total"] for r in v] for k, v in runs.items()}})
    loads[1] = loadavg()

    info = machine_info(args)
    text = render(results, info, args, model_desc, size, loads, params)
    bad = [r for r in results if not r["check"].get("ok")]
    for r in results:
        c = r["check"]
        if "why" in c:
            text += f"\n\n{r['n']} image(s): images do not agree: {c['why']}."
        elif not c["ok"]:
            text += (f"\n\n{r['n']} image(s): INVALID: images disagree (max 8-bit diff {c['pixel_diff']} > "
                     f"{args.max_pixel_diff}, latent diff {c['latent_diff']:.3g}, finite {c['finite']}).")
    if results and all("pixel_std" in r["check"] for r in results):
        text += ("\n\nImage content check: smallest per-image pixel standard deviation "
                 f"{min(r['check']['pixel_std'] for r in results):.1f} (0 would mean a flat image, "
                 "where agreement means nothing); largest |latent| "
                 f"{max(r['check']['latent_scale'] for r in results):.2f}.")
    print(text)

    command = "scripts/bench_cpu.sh " + shlex.join(sys.argv[1:])
    if args.record:
        record(Path(args.results), text, command)
        print(f"\nrecorded in {args.results}", file=sys.stderr)
    if args.json:
        slim = [{"n": r["n"], "check": r["check"], "all_totals": r["all_totals"],
                 **{k: {kk: vv for kk, vv in r[k].items() if kk not in ("output", "step_times")}
                    for k in ("ldm", "diffusers")}} for r in results]
        Path(args.json).write_text(json.dumps({"results": slim, "machine": info, "loads": loads,
                                               "model": model_desc, "command": command}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
