#!/usr/bin/env python3
"""Training benchmark: one `ldm train` step against the same step in PyTorch, on the default
model's recipe (scripts/train_default.sh: batch 32, 64x64 images -> 16x16x4 latents, U-Net
(32, 64, 128) with 4 heads + a CLIP text encoder (128 wide, 2 layers) trained jointly, AdamW,
gradient clipping, v-prediction).

    scripts/bench_train.py [--steps 12] [--threads N] [--repeat R] [--device cuda] [--record]

ldm: `ldm train` on a synthetic captioned image folder (64 solid-shape PNGs made here; speed does
not depend on content), run for 2 and for 2 + --steps steps with the same seed; the per-step time
is the difference of the two wall times divided by --steps, so loading, the latent cache and the
export cancel out.
PyTorch: diffusers' UNet2DConditionModel and transformers' CLIPTextModel built from the configs
ldm exported (the same architecture), fed random latents and token ids of the same shapes, with
the same loss (v-prediction MSE), AdamW(lr 5e-4), clip_grad_norm_(1.0) and zero_grad; the
per-step time is the mean over --steps steps after 2 warm-up steps (on a GPU, with the device
synchronised before and after; PyTorch's defaults, so cuDNN may use TF32 for convolutions).
With --repeat R the two sides alternate R times and the table gives medians (the ratio column:
the median of the per-run ratios), which tames a shared machine's swings. The median-step
columns compare single steps instead (ldm's read off the times its losses.csv rows appear,
steps 3 onwards; PyTorch's each timed): a burst of another process's load then spoils a few
steps rather than the whole difference of two runs.
Ratio = PyTorch s/step / ldm s/step (above 1: ldm is faster), for wall time and for CPU time
(user + system; the robust measure when other processes share the machine, with --threads 1). --record appends the table to the
"## Training" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = [
    "--train-text-encoder", "--text-hidden-size", "128", "--text-layers", "2", "--text-heads", "4",
    "--text-intermediate-size", "512", "--unet-channels", "32,64,128", "--unet-layers-per-block", "1",
    "--unet-attention-heads", "4", "--unet-norm-groups", "16", "--prediction-type", "v_prediction",
    "--zero-terminal-snr", "--batch-size", "32", "--lr", "5e-4", "--warmup-steps", "0",
    "--uncond-prob", "0.1", "--save-every", "100000", "--sample-every", "100000", "--seed", "0",
]


def make_data(folder: Path, count: int = 64) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    colours = ["red", "green", "blue", "black", "yellow", "purple", "orange", "white"]
    for i in range(count):
        colour = colours[i % len(colours)]
        image = Image.new("RGB", (64, 64), "white" if colour != "white" else "gray")
        draw = ImageDraw.Draw(image)
        inset = 4 + i % 16
        shape = draw.ellipse if i % 2 else draw.rectangle
        shape([inset, inset, 63 - inset, 63 - inset], fill=colour)
        name = f"{i:03}.png"
        image.save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": f"a {colour} {'circle' if i % 2 else 'square'}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def run_ldm(args, data: Path, out: Path, steps: int) -> tuple[float, float, list[float]]:
    """(wall s, CPU s, per-step s) of one `ldm train` run. The per-step times are read off
    losses.csv, which ldm appends to and flushes after every step: the time each new row
    appears (polled every 5 ms) minus the previous one's."""
    shutil.rmtree(out, ignore_errors=True)
    weights = Path(args.weights)
    cmd = [args.ldm, "train", "--data", str(data), "--vae", str(weights / "vae"), "--tokenizer",
           str(weights / "tokenizer"), "--output", str(out), "--max-steps", str(steps), "--device", args.device,
           *RECIPE]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    start, cpu = time.perf_counter(), children_cpu()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    losses, size, rows, finished = out / "losses.csv", -1, 0, []
    while process.poll() is None:
        time.sleep(0.005)
        try:
            now_size = losses.stat().st_size
        except FileNotFoundError:
            continue
        if now_size != size:
            size, now = now_size, time.perf_counter()
            count = max(len(losses.read_text().splitlines()) - 1, 0)
            finished += [now] * (count - rows)
            rows = count
    if process.returncode != 0:
        sys.exit(f"ldm train failed ({process.returncode}): {' '.join(cmd)}")
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    return wall, cpu, [b - a for a, b in zip(finished, finished[1:])]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_torch(pipeline: Path, steps: int, threads: int, device: str) -> tuple[float, float, list[float]]:
    """(wall s, CPU s) per step, and each step's wall time."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((pipeline / "unet" / "config.json").read_text()))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(pipeline / "text_encoder")))
    unet, text = unet.to(device), text.to(device)
    params = list(unet.parameters()) + list(text.parameters())
    optim = torch.optim.AdamW(params, lr=5e-4)
    vocab = text.config.vocab_size
    batch = 32

    def step() -> None:
        latents = torch.randn(batch, 4, 16, 16, device=device)
        noise = torch.randn_like(latents)
        ids = torch.randint(0, vocab, (batch, 77), device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        alpha = torch.rand(batch, 1, 1, 1, device=device)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        context = text(ids).last_hidden_state
        pred = unet(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()

    def synchronise() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    synchronise()
    start, cpu = time.perf_counter(), time.process_time()
    step_times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        synchronise()
        step_times.append(time.perf_counter() - begin)
    wall, cpu = (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps
    return wall, cpu, step_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ldm", default=str(REPO / "target" / "release" / "ldm"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=1, help="interleaved ldm/PyTorch runs; medians reported")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (ldm's --device; PyTorch's device)")
    ap.add_argument("--weights", default=str(REPO / "weights"),
                    help="the default model's folder (its vae/ and tokenizer/ serve the recipe)")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--results", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data")
        # Each repeat runs ldm and then PyTorch, so that both see the machine in the same state;
        # the table reports the median of the per-repeat ratios.
        for _ in range(args.repeat):
            short = run_ldm(args, tmp / "data", tmp / "short", 2)
            long = run_ldm(args, tmp / "data", tmp / "long", 2 + args.steps)
            ldm_wall, ldm_cpu = ((b - a) / args.steps for a, b in zip(short[:2], long[:2]))
            # Steps 3 onwards (the first two also build the latent cache and touch memory).
            ldm_median = statistics.median(long[2][1:])
            torch_wall, torch_cpu, torch_steps = run_torch(tmp / "long", args.steps, args.threads, args.device)
            torch_median = statistics.median(torch_steps)
            runs.append((ldm_wall, torch_wall, ldm_cpu, torch_cpu, ldm_median, torch_median))
            print(f"run {len(runs)}: ldm {ldm_wall:.3f} s/step (CPU {ldm_cpu:.3f}, median step "
                  f"{ldm_median:.3f}), PyTorch {torch_wall:.3f} (CPU {torch_cpu:.3f}, median step "
                  f"{torch_median:.3f}): {torch_wall / ldm_wall:.2f}x, median steps "
                  f"{torch_median / ldm_median:.2f}x", flush=True)
    ldm_wall, torch_wall, ldm_cpu, torch_cpu, ldm_median, torch_median = (
        statistics.median(column) for column in zip(*runs))
    wall_ratio = statistics.median(r[1] / r[0] for r in runs)
    cpu_ratio = statistics.median(r[3] / r[2] for r in runs)
    median_ratio = statistics.median(r[5] / r[4] for r in runs)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    where = f"{args.threads} thread(s)" if args.device == "cpu" else args.device
    table = (
        "| case | ldm s/step | PyTorch s/step | speedup (PyTorch/ldm) | ldm CPU s/step | PyTorch CPU s/step "
        "| CPU-time speedup | ldm median step s | PyTorch median step s | median-step speedup |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        f"| default-model recipe, batch 32, {where} | {ldm_wall:.3f} | {torch_wall:.3f} "
        f"| **{wall_ratio:.2f}x** | {ldm_cpu:.3f} | {torch_cpu:.3f} | {cpu_ratio:.2f}x "
        f"| {ldm_median:.3f} | {torch_median:.3f} | {median_ratio:.2f}x |\n"
    )
    print(table)
    print(f"median of {args.repeat} interleaved run(s); load average {load}")
    if args.record:
        import torch

        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        entry = (f"\n### {stamp}: `scripts/bench_train.py --steps {args.steps} --threads {args.threads} --repeat {args.repeat}`\n\n"
                 f"{table}\nMachine: {os.cpu_count()} cores, load average {load}; torch {torch.__version__}.\n")
        path = Path(args.results)
        content = path.read_text() if path.exists() else "# Benchmarks\n"
        if "## Training" not in content:
            content += "\n## Training\n"
        head, _, tail = content.partition("## Training\n")
        nxt = tail.find("\n## ")
        section, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
        path.write_text(head + "## Training\n" + section.rstrip("\n") + "\n" + entry + rest)


if __name__ == "__main__":
    main()
