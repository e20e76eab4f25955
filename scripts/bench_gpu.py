#!/usr/bin/env python3
"""GPU benchmark: `ldm txt2img --device cuda --dtype f16` against diffusers, eager and with
torch.compile(mode="reduce-overhead"), on the same fp16 weights, settings and seed.

Normally run through scripts/bench_gpu.sh on the GPU machine (see there for what it needs).
`--cpu-smoke` runs the same logic on the CPU with a tiny pipeline (f32, 3 steps, 64x64): the
check that the script works before GPU time is spent on it.

Model: SD 1.5's architecture from its real configs (scripts/bench_cpu.py's SD15_* dicts) with
seeded random weights, saved as fp16 safetensors once (--model-dir, default
~/.cache/ldm-bench/sd15-random-fp16-v1). The smoke test saves tests/fixtures/tiny-sd1 the same
way. DDIM (the folder's scheduler config), --steps 30, guidance 7.5, 512x512, prompt fixed.

Per side and case (1 and 4 images, one batch), each in fresh processes:
  ldm        one untimed warm-up run (fills the driver's PTX cache), then --repeat runs at --steps
             and --repeat at --short-steps, each a process: `ldm txt2img ... -N n --batch-size n
             --save-latents F` on a pseudo-terminal, whose progress bar gives the time of step 1.
  diffusers  a worker process: from_pretrained(fp16).to(device); [compiled: the U-Net wrapped in
             torch.compile(mode="reduce-overhead")]; one warm-up call (the compile, timed
             separately), then --repeat calls at --steps and --repeat at --short-steps; step
             times from CUDA events (no extra synchronisation in the loop).
Reported (fastest repeat):
  it/s         (steps - short_steps) / (T(steps) - T(short_steps)): the denoising rate with load,
               prompt encoding and decoding cancelled out (one step = the CFG batch of 2n).
  s/image      the generation (prompt to PNGs, load excluded) at --steps, divided by n. For ldm
               the time from step 1 to the process's exit plus one step.
  first step   time to the end of step 1 from the start of loading (ldm: from process start, a
               host-side time; diffusers: import excluded, the compile included when compiled).
  peak GPU MiB the process's peak as nvidia-smi reports it (CUDA context included), polled every
               0.1 s (in a container where nvidia-smi lists no processes: the rise of the GPU's
               used memory during the run); diffusers also with torch's max_memory_allocated.
  pixel diff   ldm's PNGs against diffusers eager's (max and mean 8-bit difference).
Ratios are diffusers / ldm for times (above 1: ldm faster) and ldm / diffusers for memory.

Results: a markdown table on stdout and in OUT/results.md, raw numbers in OUT/results.json
(OUT: --out, default $OUT when set, else bench-gpu-out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu  # noqa: E402  (SD 1.5 configs, pty progress runner, step parsing, comparison)

REPO = bench_cpu.REPO


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def build_model(dest: Path, smoke: bool) -> None:
    """The fp16 pipeline folder: SD 1.5's architecture, or for the smoke test the tiny fixture."""
    import torch

    if not smoke:
        bench_cpu.build_sd15_pipeline(dest, dtype=torch.float16)
        return
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(bench_cpu.TINY_SD1), safety_checker=None,
                                                   requires_safety_checker=False)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(dtype=torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(bench_cpu.TINY_SD1 / "tokenizer", tmp / "tokenizer")
    tmp.rename(dest)


def ensure_model(args) -> Path:
    dest = Path(args.model_dir).expanduser()
    if not (dest / "model_index.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {dest} ...", file=sys.stderr)
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", str(dest), "smoke" if args.cpu_smoke else "sd15"],
                       check=True)
        print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return dest


# ----------------------------------------------------------------------------------------------
# Peak GPU memory of a process, polled with nvidia-smi
# ----------------------------------------------------------------------------------------------
class GpuMemoryPoller:
    """Peak used GPU memory (MiB) of a process while running; a no-op without nvidia-smi.
    Per pid where nvidia-smi lists processes; in a container it often cannot (other PID
    namespace), and then the rise of GPU 0's used memory over its level at the start counts
    (the runs are sequential and nothing else uses the GPU)."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self.enabled = shutil.which("nvidia-smi") is not None
        self.baseline = self._device_used() if self.enabled else None
        self.device_peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()

    @staticmethod
    def _query(*args: str) -> str:
        try:
            return subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def _device_used(self) -> int | None:
        lines = self._query("--query-gpu=memory.used", "--id=0").split()
        return int(lines[0]) if lines and lines[0].isdigit() else None

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            for line in self._query("--query-compute-apps=pid,used_memory").splitlines():
                try:
                    pid, mib = (int(x) for x in line.split(","))
                except ValueError:
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0), mib)
            used = self._device_used()
            if used is not None and self.device_peak is not None:
                self.device_peak = max(self.device_peak, used)

    def peak(self, pid: int) -> int | None:
        if not self.enabled:
            return None
        if pid in self.peaks:
            return self.peaks[pid]
        if self.baseline is None or self.device_peak is None:
            return None
        return self.device_peak - self.baseline


# ----------------------------------------------------------------------------------------------
# ldm
# ----------------------------------------------------------------------------------------------
def ldm_run(args, model: Path, n: int, steps: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(args.ldm), "txt2img", args.prompt, "--model", str(model), "--scheduler", "ddim",
        "--steps", str(steps), "--guidance-scale", str(args.guidance), "--seed", str(args.seed),
        "-W", str(args.size), "-H", str(args.size), "--device", args.device, "--dtype", args.dtype,
        "-N", str(n), "--batch-size", str(n), "--save-latents", str(out / "latents.safetensors"),
        "-o", str(out / "ldm.png"), "--overwrite",
    ]
    env = dict(os.environ, TERM=os.environ.get("TERM") or "xterm")
    with GpuMemoryPoller() as poller:
        res = bench_cpu.run_timed(cmd, env, pty_steps=True, time_v=False)
        peak = poller.peak(res["pid"])
    first = res["step_times"].get(1)
    pngs = [out / "ldm.png"] if n == 1 else sorted(out.glob("ldm*.png"))
    return {
        "total": res["wall"], "first_step": first, "peak_mib": peak,
        "pngs": [str(p) for p in pngs], "latents": str(out / "latents.safetensors"),
    }


def bench_ldm(args, model: Path, n: int, work: Path) -> dict:
    ldm_run(args, model, n, args.steps, work / "warmup")
    full = min((ldm_run(args, model, n, args.steps, work / "full") for _ in range(args.repeat)),
               key=lambda r: r["total"])
    short = min((ldm_run(args, model, n, args.short_steps, work / "short") for _ in range(args.repeat)),
                key=lambda r: r["total"])
    step_s = (full["total"] - short["total"]) / (args.steps - args.short_steps)
    generation = full["total"] - full["first_step"] + step_s if full["first_step"] else None
    return {
        "it_s": 1 / step_s if step_s > 0 else None,
        "s_per_image": generation / n if generation else None,
        "first_step": full["first_step"],
        "peak_mib": full["peak_mib"],
        "pngs": full["pngs"],
        "latents": full["latents"],
    }


# ----------------------------------------------------------------------------------------------
# diffusers (a worker process per variant and case)
# ----------------------------------------------------------------------------------------------
def bench_diffusers(args, model: Path, n: int, compiled: bool, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": str(model), "device": args.device, "dtype": args.dtype, "compile": compiled,
        "prompt": args.prompt, "steps": args.steps, "short_steps": args.short_steps,
        "guidance": args.guidance, "seed": args.seed, "n": n, "size": args.size,
        "repeat": args.repeat, "out_dir": str(work),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--diffusers-worker", json.dumps(spec)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false")
    with GpuMemoryPoller() as poller:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = proc.communicate()[0]
        peak = poller.peak(proc.pid)
    if proc.returncode != 0:
        sys.exit(f"diffusers worker failed ({proc.returncode}):\n{output[-4000:]}")
    report = json.loads((work / "report.json").read_text())
    step_s = (report["full_s"] - report["short_s"]) / (args.steps - args.short_steps)
    report.update({
        "it_s": 1 / step_s if step_s > 0 else None,
        "s_per_image": report["full_s"] / n,
        "peak_mib": peak,
    })
    return report


def diffusers_worker(spec: dict) -> None:
    t_start = time.perf_counter()
    import torch
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    cuda = spec["device"].startswith("cuda")
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[spec["dtype"]]
    t_imported = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(spec["device"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if cuda:
        torch.cuda.synchronize()
    t_loaded = time.perf_counter()
    if spec["compile"]:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    n = spec["n"]

    def call(steps: int) -> dict:
        """One pipeline call: wall seconds, and the wall time at which step 1 ended."""
        events: list = []

        def on_step_end(_pipe, _i, _t, kwargs):
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                events.append(event)
            else:
                events.append(time.perf_counter())
            call.latents = kwargs["latents"]
            return kwargs

        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
        t0 = time.perf_counter()
        with torch.inference_mode():
            images = pipe(
                spec["prompt"], num_inference_steps=steps, guidance_scale=spec["guidance"],
                height=spec["size"], width=spec["size"], num_images_per_prompt=n,
                generator=[torch.Generator("cpu").manual_seed(spec["seed"] + i) for i in range(n)],
                callback_on_step_end=on_step_end,
            ).images
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        first = t0 + start.elapsed_time(events[0]) / 1000 if cuda else events[0]
        return {"seconds": t1 - t0, "first_step_at": first, "images": images}

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warm = call(spec["steps"])
    full = min((call(spec["steps"]) for _ in range(spec["repeat"])), key=lambda c: c["seconds"])
    latents = call.latents
    short = min((call(spec["short_steps"]) for _ in range(spec["repeat"])), key=lambda c: c["seconds"])
    out = Path(spec["out_dir"])
    pngs = []
    for i, image in enumerate(full["images"]):
        path = out / f"diffusers-{i + 1}.png"
        image.save(path)
        pngs.append(str(path))
    save_file({"latents": latents.float().contiguous().cpu()}, str(out / "latents.safetensors"))
    report = {
        "import_s": t_imported - t_start,
        "load_s": t_loaded - t_imported,
        "first_step": warm["first_step_at"] - t_imported,
        "warmup_s": warm["seconds"],
        "full_s": full["seconds"],
        "short_s": short["seconds"],
        "torch_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "pngs": pngs,
        "latents": str(out / "latents.safetensors"),
    }
    (out / "report.json").write_text(json.dumps(report))


# ----------------------------------------------------------------------------------------------
# Agreement and report
# ----------------------------------------------------------------------------------------------
def pixel_diff(ldm_pngs: list[str], ref_pngs: list[str]) -> dict:
    import numpy as np
    from PIL import Image

    if len(ldm_pngs) != len(ref_pngs):
        return {"max": None, "mean": None, "why": f"{len(ldm_pngs)} vs {len(ref_pngs)} images"}
    diffs = []
    for p, q in zip(ldm_pngs, ref_pngs):
        x = np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
        y = np.asarray(Image.open(q).convert("RGB"), dtype=np.int16)
        if x.shape != y.shape:
            return {"max": None, "mean": None, "why": f"image shapes {x.shape} vs {y.shape}"}
        diffs.append(np.abs(x - y))
    all_diffs = np.stack(diffs)
    return {"max": int(all_diffs.max()), "mean": float(all_diffs.mean())}


def latent_agreement(ldm_latents: str, ref_latents: str) -> dict:
    """Final latents side by side: where images disagree, which side (if any) left the finite
    range (random fp16 weights can overflow)."""
    import numpy as np
    from safetensors.numpy import load_file

    x, y = (load_file(path)["latents"].astype(np.float64) for path in (ldm_latents, ref_latents))
    report = {f"{side}_nonfinite": int((~np.isfinite(t)).sum()) for side, t in (("ldm", x), ("ref", y))}
    report.update({f"{side}_max_abs": float(np.nanmax(np.abs(np.where(np.isfinite(t), t, np.nan)), initial=0.0))
                   for side, t in (("ldm", x), ("ref", y))})
    report["max_diff"] = float(np.nanmax(np.abs(x - y))) if x.shape == y.shape else None
    return report


def fmt(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def render(results: dict, info: dict, args) -> str:
    lines = [
        f"GPU benchmark ({'CPU smoke test, ' if args.cpu_smoke else ''}{info['device']}): "
        f"{args.size}x{args.size}, DDIM {args.steps} steps (rate from {args.steps} vs {args.short_steps}), "
        f"CFG {args.guidance}, {args.dtype}, seed {args.seed}, fastest of {args.repeat}",
        "",
        "| images | side | it/s | s/image | first step s | peak GPU MiB | pixel diff max/mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, case in results.items():
        for side in ("ldm", "eager", "compiled"):
            r = case.get(side)
            if r is None:
                continue
            diff = case["pixel_diff"] if side == "ldm" else {}
            extra = f" (compile call {r['warmup_s']:.1f} s)" if side == "compiled" else ""
            torch_peak = f" (torch {r['torch_peak_mib']:.0f})" if r.get("torch_peak_mib") else ""
            lines.append(
                f"| {n} | {'ldm' if side == 'ldm' else 'diffusers ' + side} | {fmt(r['it_s'])} | "
                f"{fmt(r['s_per_image'], '.3f')} | {fmt(r['first_step'])}{extra} | "
                f"{fmt(r['peak_mib'], '.0f')}{torch_peak} | "
                f"{fmt(diff.get('max'), 'd') if side == 'ldm' else ''}"
                f"{'/' + fmt(diff.get('mean')) if side == 'ldm' else ''} |"
            )
    for n, case in results.items():
        if "latents" in case:
            a = case["latents"]
            lines.append(f"\n{n} image(s), final latents, ldm vs diffusers eager: max difference "
                         f"{fmt(a['max_diff'], '.3g')}; largest |value| {a['ldm_max_abs']:.3g} vs "
                         f"{a['ref_max_abs']:.3g}; non-finite values {a['ldm_nonfinite']} vs {a['ref_nonfinite']}")
    lines += ["", "| images | vs | it/s ratio (ldm/diffusers) | s/image ratio (diffusers/ldm) | memory ratio (ldm/diffusers) |",
              "|---|---|---|---|---|"]
    for n, case in results.items():
        ours = case["ldm"]
        for side in ("eager", "compiled"):
            r = case.get(side)
            if r is None:
                continue
            lines.append(f"| {n} | diffusers {side} | {fmt(ratio(ours['it_s'], r['it_s']))} | "
                         f"{fmt(ratio(r['s_per_image'], ours['s_per_image']))} | "
                         f"{fmt(ratio(ours['peak_mib'], r['peak_mib']))} |")
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items())]
    return "\n".join(lines) + "\n"


def machine_info(args) -> dict:
    import torch
    import diffusers

    info = {"device": "cpu"}
    if torch.cuda.is_available() and not args.cpu_smoke:
        info["device"] = torch.cuda.get_device_name(0)
        smi = shutil.which("nvidia-smi")
        if smi:
            info["driver"] = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
        info["cuda (torch)"] = torch.version.cuda
    info.update({"torch": torch.__version__, "diffusers": diffusers.__version__,
                 "python": platform.python_version(), "ldm": str(args.ldm)})
    return info


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--diffusers-worker":
        diffusers_worker(json.loads(sys.argv[2]))
        return
    if len(sys.argv) >= 4 and sys.argv[1] == "--build":
        build_model(Path(sys.argv[2]), smoke=sys.argv[3] == "smoke")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ldm", required=True, help="the ldm binary (CUDA build; the CPU build for --cpu-smoke)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="the same logic on the CPU: tiny pipeline, f32, 64x64, 3 vs 2 steps")
    ap.add_argument("--model-dir", help="fp16 pipeline folder, built when missing")
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--short-steps", type=int, default=10, help="the second step count of the it/s measure")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cases", default="1,4", help="comma-separated numbers of images (one batch each)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per measure; the fastest counts")
    ap.add_argument("--no-compile", action="store_true", help="skip diffusers with torch.compile")
    ap.add_argument("--max-pixel-diff", type=int, default=16,
                    help="max 8-bit difference to diffusers eager above which the exit status is 1")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-gpu-out", help="results folder")
    args = ap.parse_args()
    args.ldm = Path(args.ldm).resolve()
    if args.cpu_smoke:
        args.device, args.dtype = "cpu", "f32"
        args.steps, args.short_steps, args.size = min(args.steps, 3), min(args.short_steps, 2), 64
        args.model_dir = args.model_dir or "~/.cache/ldm-bench/tiny-sd1-fp16-v1"
    else:
        args.device, args.dtype = "cuda", "f16"
        args.model_dir = args.model_dir or "~/.cache/ldm-bench/sd15-random-fp16-v1"
    if args.steps <= args.short_steps:
        sys.exit("--steps must exceed --short-steps")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args)
    results: dict = {}
    info = machine_info(args)

    def record() -> None:
        """Writes the results so far: a time limit that cuts the run short keeps them."""
        (out / "results.md").write_text(render(results, info, args))
        (out / "results.json").write_text(json.dumps(
            {"info": info, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))

    ok = True
    for n in (int(c) for c in args.cases.split(",")):
        work = out / f"{n}-images"
        case = results[n] = {"ldm": bench_ldm(args, model, n, work / "ldm")}
        print(f"{n} image(s): ldm done", file=sys.stderr)
        case["eager"] = bench_diffusers(args, model, n, False, work / "eager")
        case["pixel_diff"] = pixel_diff(case["ldm"]["pngs"], case["eager"]["pngs"])
        case["latents"] = latent_agreement(case["ldm"]["latents"], case["eager"]["latents"])
        if case["pixel_diff"]["max"] is None or case["pixel_diff"]["max"] > args.max_pixel_diff:
            ok = False
        record()
        print(f"{n} image(s): diffusers eager done", file=sys.stderr)
        if not args.no_compile:
            case["compiled"] = bench_diffusers(args, model, n, True, work / "compiled")
            record()
            print(f"{n} image(s): diffusers compiled done", file=sys.stderr)
    print((out / "results.md").read_text())
    if not ok:
        sys.exit(f"images disagree with diffusers beyond --max-pixel-diff {args.max_pixel_diff}")


if __name__ == "__main__":
    main()
