#!/usr/bin/env python3
"""Evaluate a text-to-image model of ldm on the emoji data set (the default model's evaluation).

Usage (Python 3.11+ with numpy, Pillow and scikit-learn; torch + diffusers optional):

    cargo build --release
    python scripts/eval_default.py --data /work/data/emoji32            # model weights/, out weights/eval
    python scripts/eval_default.py --model weights --data DATA --ldm target/release/ldm --out weights/eval

DATA is a folder made by scripts/make_emoji_dataset.py (train/ and heldout/, each with
metadata.jsonl). MODEL must be a local diffusers folder (its configs give the native size).

What it computes (everything through the real `ldm` binary, on the CPU unless --device):
  1. VAE reconstruction PSNR on held-out images (RGB, 0..255, at the data set's resolution):
     `cli_roundtrip`: `ldm batch` with img2img lines at strength 0 = encode, sample the posterior
     with the line's seed, decode, saved as 8-bit PNG (what a user gets).
     `diffusers_mean`: the model's vae/ loaded with diffusers' AutoencoderKL, encode -> posterior
     mean -> decode, rounded to 8 bit (skipped if torch/diffusers are missing or --no-diffusers).
     Reported as the mean of per-image PSNRs (also the median and the PSNR of the pooled MSE).
  2. Category recognisability. A simple classifier (standardised features -> RBF SVM, fixed
     hyper-parameters) is trained on the REAL train-split images, at 32x32, on: 8x8 RGB
     block means, a 4x4x4 joint colour histogram and a 4x4-cell, 8-orientation gradient
     histogram. It predicts `category` (9 classes; also `subcategory`, 96). Reported:
     its accuracy on all real held-out images (the reference), on the real images of the
     evaluated prompts, and the fraction of GENERATED images classified as their prompt's
     category, separately for prompts of training names and of held-out names, with 95%
     Wilson intervals and chance (the majority category's share). Generated images are
     resized to 32x32 with Lanczos, as the data set's 32 px images were made.
  3. Seed diversity: --diversity-prompts training names (the first of the selection), each as
     its styled caption and as its bare name, --diversity-seeds seeds each, at every
     --diversity-guidance scale: the mean absolute pixel difference (0-255 levels) between
     images of one prompt (different seeds) against that between prompts (same seed), and the
     ratio (0: every seed draws the same picture).
  4. A sample grid (grid.png): for every prompt, the real image of that name and style,
     then the generated images.

Prompts: --prompts-per-split names from train/ and from heldout/ each (default 40), stratified
over the categories (largest-remainder allocation proportional to each category's number of
names, at least one per category), picked in a fixed hash order of the emoji code, one style
per name (alternating twemoji/noto). Each prompt is the data set's caption of that name and
style; prompt k gets seeds --seed + k*N .. + N-1 (N = --images-per-prompt, default 2).
Generation: `ldm batch prompts.jsonl --steps 25 --guidance-scale 7.5 --guidance-rescale 0
--scheduler ddim` at the
model's native size, --jobs processes in parallel (default 2), each with RAYON_NUM_THREADS=1
and --batch-size 1, so an image does not depend on how the work is split (and one thread is
the fastest setting on a small CPU model). Same model + binary + data -> same files.

Output (OUT, default MODEL/eval; only these paths are replaced):
  OUT/eval.json     every figure, the settings and sha256 of the model files, binary and data
  OUT/eval.md       a markdown table for the model card (links grid.png relative to MODEL)
  OUT/grid.png      the sample grid
  OUT/prompts.jsonl the ldm prompt file that was run (comments give split/category/name)
  OUT/samples/      the generated PNGs (<split>-<k>-<seed>.png, ldm's metadata chunk kept)
                    and samples.jsonl (per image: prompt, seed, split, category, prediction)
Timings are printed, not written, so the outputs are byte-identical between runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SELECTION_SALT = "ldm-eval-v1"
STYLES = ("twemoji", "noto")
CLF_SIZE = 32  # the classifier works on 32x32 RGB


# ----------------------------------------------------------------------------- helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_key(*parts: str) -> str:
    return hashlib.sha256(":".join((SELECTION_SALT,) + parts).encode()).hexdigest()


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4) + 0.0, round(min(1.0, c + h), 4) + 0.0]


def rate(k: int, n: int) -> dict:
    return {"rate": round(k / n, 4) if n else None, "correct": k, "n": n, "ci95": wilson(k, n)}


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / max(mse, 1e-10)), mse


def psnr_summary(values: list[tuple[float, float]]) -> dict:
    p = np.array([v[0] for v in values])
    m = np.array([v[1] for v in values])
    return {
        "psnr_mean_db": round(float(p.mean()), 3),
        "psnr_median_db": round(float(np.median(p)), 3),
        "psnr_of_pooled_mse_db": round(10 * math.log10(255.0**2 / max(float(m.mean()), 1e-10)), 3),
        "n": len(values),
    }


def read_metadata(data: Path, split: str) -> list[dict]:
    path = data / split / "metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        r["split"] = split
        r["path"] = str(data / split / r["file_name"])
        # "text" may list alternative captions; the first (with the style) is the prompt, the
        # last the bare name (what most users type; the seed-diversity prompts).
        captions = r["text"] if isinstance(r["text"], list) else [r["text"]]
        r["text"], r["bare_text"] = captions[0], captions[-1]
    return rows


def model_sizes(model: Path) -> tuple[int, int, int]:
    """(width, height, vae factor) from the unet and vae configs, like ldm's default size."""
    unet = json.loads((model / "unet" / "config.json").read_text())
    vae = json.loads((model / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    s = unet.get("sample_size") or 64
    h, w = (s, s) if isinstance(s, int) else (s[0], s[1])
    return w * factor, h * factor, factor


def model_files(model: Path) -> dict[str, str]:
    files = {}
    for p in sorted(model.rglob("*")):
        rel = p.relative_to(model)
        if p.is_file() and (rel.parts[0] == "model_index.json" or rel.parts[0] in
                            ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
            files[rel.as_posix()] = sha256_file(p)
    return files


def slug(text: str, n: int = 32) -> str:
    out = "".join(c.lower() if c.isascii() and c.isalnum() else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:n].strip("-") or "image"


# ----------------------------------------------------------------------------- prompts

def select_prompts(rows: list[dict], split: str, count: int) -> list[dict]:
    """`count` (name, style) rows of one split, stratified over categories, deterministic."""
    by_name: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_name[r["unified"]][r["style"]] = r
    by_cat: dict[str, list[str]] = defaultdict(list)
    for unified, styles in by_name.items():
        by_cat[next(iter(styles.values()))["category"]].append(unified)
    cats = sorted(by_cat)
    total = sum(len(v) for v in by_cat.values())
    count = min(count, total)
    # Largest remainder, at least one per category when there is room.
    alloc = {c: 1 if count >= len(cats) else 0 for c in cats}
    rest = count - sum(alloc.values())
    quota = {c: rest * len(by_cat[c]) / total for c in cats}
    for c in cats:
        alloc[c] += int(quota[c])
    left = count - sum(alloc.values())
    for c in sorted(cats, key=lambda c: (-(quota[c] - int(quota[c])), c))[:left]:
        alloc[c] += 1
    for c in cats:  # never more than a category holds; give the excess to the largest
        while alloc[c] > len(by_cat[c]):
            alloc[c] -= 1
            spare = max((x for x in cats if alloc[x] < len(by_cat[x])),
                        key=lambda x: (len(by_cat[x]) - alloc[x], x))
            alloc[spare] += 1
    chosen = []
    for c in cats:
        for unified in sorted(by_cat[c], key=lambda u: hash_key(split, u))[: alloc[c]]:
            styles = by_name[unified]
            want = STYLES[len(chosen) % 2]  # alternate over the whole split
            chosen.append(styles[want] if want in styles else styles[sorted(styles)[0]])
    return chosen


# ----------------------------------------------------------------------------- ldm runs

def run_ldm_batch(ldm: str, shard_files: list[Path], out_dirs: list[Path], common: list[str],
                  threads: int, what: str, total: int, log_dir: Path) -> None:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    procs = []
    for i, (f, d) in enumerate(zip(shard_files, out_dirs)):
        cmd = [ldm, "batch", str(f), "--output-dir", str(d), "--batch-size", "1"] + common
        log = open(log_dir / f"{what}-{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, cmd))
    tty = sys.stderr.isatty()
    last = -1
    while any(p.poll() is None for p, _, _ in procs):
        time.sleep(1)
        done = sum(len(list(d.glob("*.png"))) for d in out_dirs)
        if done != last and tty:
            print(f"\r  {what}: {done}/{total} images", end="", file=sys.stderr, flush=True)
            last = done
    if tty:
        print(file=sys.stderr)
    for p, log, cmd in procs:
        log.close()
        if p.returncode != 0:
            tail = Path(log.name).read_text()[-3000:]
            sys.exit(f"error: {' '.join(cmd)} failed (exit {p.returncode}):\n{tail}")


def read_manifests(out_dirs: list[Path]) -> dict[tuple[str, int], Path]:
    found = {}
    for d in out_dirs:
        for line in (d / "manifest.jsonl").read_text().splitlines():
            if line.strip():
                e = json.loads(line)
                found[(e["prompt"], int(e["seed"]))] = d / e["file"]
    return found


def shard(lines: list[str], jobs: int, work: Path, what: str) -> tuple[list[Path], list[Path]]:
    jobs = max(1, min(jobs, len(lines)))
    files, dirs = [], []
    for i in range(jobs):
        f = work / f"{what}-{i}.jsonl"
        f.write_text("".join(line + "\n" for line in lines[i::jobs]))
        files.append(f)
        dirs.append(work / f"{what}-{i}")
    return files, dirs


def diversity_of(images: np.ndarray) -> dict:
    """images[prompt, seed]: mean pixel distance between seeds of one prompt and between
    prompts of one seed; their ratio says how much a seed changes a picture relative to a
    prompt (near 0: copies of one picture per prompt)."""
    def mean_pair_distance(group: np.ndarray) -> float:
        n = len(group)
        return float(np.mean([np.abs(group[i] - group[j]).mean()
                              for i in range(n) for j in range(i + 1, n)]))
    seeds = float(np.mean([mean_pair_distance(images[p]) for p in range(images.shape[0])]))
    prompts = float(np.mean([mean_pair_distance(images[:, s]) for s in range(images.shape[1])]))
    return {"between_seeds": round(seeds, 2), "between_prompts": round(prompts, 2),
            "ratio": round(seeds / prompts, 3)}


# ----------------------------------------------------------------------------- classifier

def features(images: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] uint8 -> block means, joint colour histogram, gradient-orientation cells."""
    x = images.astype(np.float32) / 255.0
    n = len(x)
    blocks = x.reshape(n, 8, 4, 8, 4, 3).mean((2, 4)).reshape(n, -1)
    bins = 4
    q = np.minimum((x * bins).astype(np.int64), bins - 1)
    idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    hist = np.stack([np.bincount(i.ravel(), minlength=bins**3) for i in idx]).astype(np.float32)
    hist = np.sqrt(hist / (CLF_SIZE * CLF_SIZE))
    g = x.mean(-1)
    gx = np.zeros_like(g)
    gy = np.zeros_like(g)
    gx[:, :, 1:-1] = g[:, :, 2:] - g[:, :, :-2]
    gy[:, 1:-1] = g[:, 2:] - g[:, :-2]
    mag = np.hypot(gx, gy)
    ori = np.minimum(((np.arctan2(gy, gx) % np.pi) / np.pi * 8).astype(np.int64), 7)
    cells, cs = 4, CLF_SIZE // 4
    hog = np.zeros((n, cells, cells, 8), np.float32)
    for cy in range(cells):
        for cx in range(cells):
            m = mag[:, cy * cs:(cy + 1) * cs, cx * cs:(cx + 1) * cs].reshape(n, -1)
            o = ori[:, cy * cs:(cy + 1) * cs, cx * cs:(cx + 1) * cs].reshape(n, -1)
            for b in range(8):
                hog[:, cy, cx, b] = (m * (o == b)).sum(1)
    hog = hog.reshape(n, -1)
    hog = np.sqrt(hog / (hog.sum(1, keepdims=True) + 1e-6))
    return np.concatenate([blocks, hist, hog], 1)


def to_clf_size(img: np.ndarray) -> np.ndarray:
    if img.shape[:2] == (CLF_SIZE, CLF_SIZE):
        return img
    return np.asarray(Image.fromarray(img).resize((CLF_SIZE, CLF_SIZE), Image.LANCZOS))


def make_classifier():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    return make_pipeline(StandardScaler(), SVC(C=10.0, kernel="rbf", gamma="scale"))


# ----------------------------------------------------------------------------- grid

def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: int, max_lines: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = (cur + " " + w).strip()
        if draw.textlength(trial, font=fnt) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and draw.textlength(lines[-1] + "...", font=fnt) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def make_grid(sections: list[tuple[str, list[dict]]], tile: int, columns: int, path: Path,
              title: str) -> None:
    pad, gap, text_lines = 6, 2, 3
    fnt, bold = font(11), font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=fnt)[3]) + 2
    n_img = 1 + max(len(p["samples"]) for _, ps in sections for p in ps)
    cell_w = n_img * tile + (n_img - 1) * gap
    cell_h = tile + 6 + text_lines * line_h
    head_h = 24
    width = pad + columns * (cell_w + pad)
    height = pad + head_h
    for _, ps in sections:
        rows = math.ceil(len(ps) / columns)
        height += head_h + rows * (cell_h + pad)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, pad), title, fill="black", font=bold)
    y = pad + head_h
    for heading, ps in sections:
        d.text((pad, y + 4), heading, fill="black", font=bold)
        y += head_h
        for i, p in enumerate(ps):
            cx = pad + (i % columns) * (cell_w + pad)
            cy = y + (i // columns) * (cell_h + pad)
            tiles = [p["real"]] + [s["image"] for s in p["samples"]]
            for j, t in enumerate(tiles):
                im = Image.fromarray(t)
                if im.size != (tile, tile):
                    up = im.size[0] < tile
                    im = im.resize((tile, tile), Image.NEAREST if up else Image.LANCZOS)
                x0 = cx + j * (tile + gap)
                img.paste(im, (x0, cy))
                if j == 0:  # frame the real image
                    d.rectangle([x0 - 1, cy - 1, x0 + tile, cy + tile], outline=(160, 160, 160))
                else:  # bar: the classifier's category is right (green) or wrong (red)
                    ok = p["samples"][j - 1]["category_ok"]
                    d.rectangle([x0, cy + tile + 1, x0 + tile - 1, cy + tile + 3],
                                fill=(40, 170, 60) if ok else (220, 50, 40))
            for k, line in enumerate(wrap(d, p["caption"], fnt, cell_w, text_lines)):
                d.text((cx, cy + tile + 5 + k * line_h), line, fill="black", font=fnt)
        y += math.ceil(len(ps) / columns) * (cell_h + pad)
    img.save(path, optimize=True)


# ----------------------------------------------------------------------------- main

def main() -> None:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # no "(default: None/False)"
            if action.default in (None, False):
                return action.help
            return super()._get_help_string(action)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Formatter,
                                 epilog="What is computed: see the docstring at the top of "
                                        "scripts/eval_default.py.")
    ap.add_argument("--model", default="weights", help="local diffusers folder")
    ap.add_argument("--data", required=True, help="emoji data set folder (train/, heldout/)")
    ap.add_argument("--ldm", default="target/release/ldm", help="ldm binary")
    ap.add_argument("--out", help="output folder (default: MODEL/eval)")
    ap.add_argument("--prompts-per-split", type=int, default=40, help="prompts from train and from heldout each")
    ap.add_argument("--images-per-prompt", type=int, default=2, help="seeds per prompt")
    ap.add_argument("--seed", type=int, default=1000, help="seed of the first prompt's first image")
    ap.add_argument("--steps", type=int, default=25, help="denoising steps")
    ap.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale")
    ap.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi")
    ap.add_argument("--scheduler", default="ddim", help="ldm sampler")
    ap.add_argument("--size", type=int, nargs=2, metavar=("W", "H"),
                    help="generation size (default: the model's native size)")
    ap.add_argument("--vae-images", type=int, default=50,
                    help="held-out images for the VAE PSNR (0: all)")
    ap.add_argument("--no-diffusers", action="store_true",
                    help="skip the diffusers (posterior mean) VAE PSNR")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="ldm processes in parallel")
    ap.add_argument("--threads", type=int, default=1, help="RAYON_NUM_THREADS per ldm process")
    ap.add_argument("--device", help="passed to ldm (default: ldm's)")
    ap.add_argument("--dtype", help="passed to ldm (default: ldm's)")
    ap.add_argument("--diversity-prompts", type=int, default=6,
                    help="training-name prompts of the seed-diversity measurement (0: skip it)")
    ap.add_argument("--diversity-seeds", type=int, default=4, help="seeds per diversity prompt")
    ap.add_argument("--diversity-guidance", default="3,5,7.5",
                    help="comma-separated CFG scales the diversity is measured at")
    ap.add_argument("--grid-columns", type=int, default=5, help="prompts per grid row")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT/.work (ldm's raw outputs)")
    args = ap.parse_args()
    t_start = time.monotonic()
    timings = {}

    model = Path(args.model)
    data = Path(args.data)
    out = Path(args.out) if args.out else model / "eval"
    ldm = shutil.which(args.ldm) or args.ldm
    if not (model / "model_index.json").is_file():
        sys.exit(f"error: {model} is not a local diffusers folder (no model_index.json)")
    if not Path(ldm).is_file():
        sys.exit(f"error: ldm binary {args.ldm} not found (cargo build --release)")
    for split in ("train", "heldout"):
        if not (data / split / "metadata.jsonl").is_file():
            sys.exit(f"error: {data / split / 'metadata.jsonl'} not found")
    if out.resolve() == model.resolve():
        sys.exit("error: --out must not be the model folder itself")

    gen_w, gen_h, factor = model_sizes(model)
    if args.size:
        gen_w, gen_h = args.size
    train_rows = read_metadata(data, "train")
    held_rows = read_metadata(data, "heldout")
    with Image.open(train_rows[0]["path"]) as im:
        data_w, data_h = im.size
    if data_w % factor or data_h % factor:
        sys.exit(f"error: data images are {data_w}x{data_h}, not a multiple of the VAE factor {factor}")

    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    for stale in (work, out / "samples"):
        if stale.exists():
            shutil.rmtree(stale)
    work.mkdir()
    (out / "samples").mkdir()
    version = subprocess.run([ldm, "--version"], capture_output=True, text=True).stdout.strip()
    device_args = (["--device", args.device] if args.device else []) + \
                  (["--dtype", args.dtype] if args.dtype else [])

    # ---- prompts and generation
    prompts = []
    for split, rows in (("train", train_rows), ("heldout", held_rows)):
        for r in select_prompts(rows, split, args.prompts_per_split):
            k = len(prompts)
            prompts.append({"k": k, "split": split, "row": r, "caption": r["text"],
                            "seeds": [args.seed + k * args.images_per_prompt + i
                                      for i in range(args.images_per_prompt)]})
    lines, texts = [], []
    for p in prompts:
        r = p["row"]
        texts.append(f"# {p['split']} | {r['category']} | {r['subcategory']} | {r['name']} | "
                     f"{r['style']} | {r['file_name']}")
        line = json.dumps({"prompt": p["caption"], "seed": p["seeds"][0],
                           "num_images": args.images_per_prompt}, ensure_ascii=False)
        texts.append(line)
        lines.append(line)
    gen_common = ["--model", str(model), "--steps", str(args.steps), "--seed", str(args.seed),
                  "--width", str(gen_w), "--height", str(gen_h),
                  "--guidance-scale", str(args.guidance_scale),
                  "--guidance-rescale", str(args.guidance_rescale), "--scheduler", args.scheduler
                  ] + device_args
    header = [
        "# Prompts of scripts/eval_default.py (train names, then held-out names).",
        f"# Run as: RAYON_NUM_THREADS={args.threads} ldm batch prompts.jsonl {' '.join(gen_common)} "
        "--batch-size 1",
        "# Comment before each line: split | category | subcategory | name | style | real image",
    ]
    (out / "prompts.jsonl").write_text("\n".join(header + texts) + "\n")
    n_gen = len(prompts) * args.images_per_prompt
    print(f"generating {n_gen} images ({len(prompts)} prompts x {args.images_per_prompt}) at "
          f"{gen_w}x{gen_h}, {args.steps} steps, {args.jobs} ldm process(es)...", file=sys.stderr)
    t = time.monotonic()
    files, dirs = shard(lines, args.jobs, work, "gen")
    run_ldm_batch(ldm, files, dirs, gen_common, args.threads, "generate", n_gen, work)
    timings["generate_s"] = time.monotonic() - t
    found = read_manifests(dirs)
    for p in prompts:
        p["samples"] = []
        for seed in p["seeds"]:
            src = found.get((p["caption"], seed))
            if src is None or not src.is_file():
                sys.exit(f"error: ldm did not record an image for {p['caption']!r} seed {seed}")
            name = f"{p['split']}-{p['k']:03d}-{slug(p['row']['name'])}-{seed}.png"
            shutil.copyfile(src, out / "samples" / name)
            p["samples"].append({"seed": seed, "file": f"samples/{name}",
                                 "image": load_rgb(src)})
        p["real"] = load_rgb(Path(p["row"]["path"]))

    # ---- seed diversity against prompt separation, per guidance scale
    diversity = None
    div_prompts = [p for p in prompts if p["split"] == "train"][: args.diversity_prompts]
    if len(div_prompts) >= 2 and args.diversity_seeds >= 2:
        scales = [float(g) for g in args.diversity_guidance.split(",") if g.strip()]
        div_seed = args.seed + 100_000  # apart from the evaluation's seeds
        print(f"diversity: {len(div_prompts)} prompts (styled and bare captions) x "
              f"{args.diversity_seeds} seeds at CFG {scales}...", file=sys.stderr)
        t = time.monotonic()
        captions = {"styled": [p["caption"] for p in div_prompts],
                    "bare": [p["row"]["bare_text"] for p in div_prompts]}
        diversity = {"prompts": captions,
                     "seeds": list(range(div_seed, div_seed + args.diversity_seeds)),
                     "measure": "mean absolute difference of 8-bit RGB pixels (0-255 levels), "
                                "averaged over image pairs",
                     "by_guidance": {}}
        for g in scales:
            diversity["by_guidance"][f"{g:g}"] = by_kind = {}
            for kind, texts in captions.items():
                div_lines = [json.dumps({"prompt": text, "seed": div_seed,
                                         "num_images": args.diversity_seeds, "guidance_scale": g},
                                        ensure_ascii=False) for text in texts]
                what = f"div-{kind}-{g:g}"
                files, dirs = shard(div_lines, args.jobs, work, what)
                run_ldm_batch(ldm, files, dirs, gen_common, args.threads, what,
                              len(texts) * args.diversity_seeds, work)
                found = read_manifests(dirs)
                grid = np.stack([[load_rgb(found[(text, s)]).astype(np.float64)
                                  for s in diversity["seeds"]] for text in texts])
                by_kind[kind] = diversity_of(grid)
        timings["diversity_s"] = time.monotonic() - t

    # ---- VAE round trip through the CLI
    vae_rows = sorted(held_rows, key=lambda r: hash_key("vae", r["file_name"]))
    if args.vae_images > 0:
        vae_rows = vae_rows[: args.vae_images]
    vae_lines = [json.dumps({"prompt": r["text"], "image": str(Path(r["path"]).resolve()),
                             "strength": 0.0, "seed": args.seed + i, "steps": 1,
                             "guidance_scale": 1.0, "width": data_w, "height": data_h})
                 for i, r in enumerate(vae_rows)]
    print(f"VAE round trip of {len(vae_rows)} held-out images (ldm img2img, strength 0)...",
          file=sys.stderr)
    t = time.monotonic()
    files, dirs = shard(vae_lines, args.jobs, work, "vae")
    run_ldm_batch(ldm, files, dirs, ["--model", str(model)] + device_args, args.threads,
                  "vae", len(vae_rows), work)
    timings["vae_cli_s"] = time.monotonic() - t
    found = read_manifests(dirs)
    cli_psnr = []
    real_vae = []
    for i, r in enumerate(vae_rows):
        real = load_rgb(Path(r["path"]))
        real_vae.append(real)
        rec = load_rgb(found[(r["text"], args.seed + i)])
        cli_psnr.append(psnr(real, rec))
    vae_result = {
        "images": "held-out, first N in sha256('ldm-eval-v1:vae:' + file_name) order",
        "resolution": [data_w, data_h],
        "cli_roundtrip": dict(psnr_summary(cli_psnr), method=(
            "ldm batch, img2img lines with strength 0: encode, sample the posterior (seed = "
            "--seed + i), decode, 8-bit PNG")),
    }

    # ---- VAE round trip with diffusers (posterior mean)
    if not args.no_diffusers:
        t = time.monotonic()
        try:
            import torch
            from diffusers import AutoencoderKL
            torch.set_num_threads(max(1, args.jobs))
            vae = AutoencoderKL.from_pretrained(str(model / "vae"), torch_dtype=torch.float32).eval()
            x = torch.from_numpy(np.stack(real_vae)).permute(0, 3, 1, 2).float() / 127.5 - 1
            recs = []
            with torch.no_grad():
                for b in range(0, len(x), 16):
                    mean = vae.encode(x[b:b + 16]).latent_dist.mean
                    y = vae.decode(mean).sample
                    y = ((y / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
                    recs.append(y.permute(0, 2, 3, 1).numpy())
            recs = np.concatenate(recs)
            vae_result["diffusers_mean"] = dict(
                psnr_summary([psnr(a, b) for a, b in zip(real_vae, recs)]),
                method="diffusers AutoencoderKL (f32, CPU): encode, posterior mean, decode, "
                       "rounded to 8 bit")
        except ImportError as e:
            vae_result["diffusers_mean"] = {"skipped": f"not installed: {e.name}"}
        except Exception as e:  # a secondary figure: report, do not lose the run
            print(f"warning: diffusers VAE round trip failed: {e!r}", file=sys.stderr)
            vae_result["diffusers_mean"] = {"skipped": f"failed: {e!r}"}
        timings["vae_diffusers_s"] = time.monotonic() - t

    # ---- classifier
    print("training the category classifier on the real train images...", file=sys.stderr)
    t = time.monotonic()
    x_train = features(np.stack([to_clf_size(load_rgb(Path(r["path"]))) for r in train_rows]))
    x_held = features(np.stack([to_clf_size(load_rgb(Path(r["path"]))) for r in held_rows]))
    x_real_sel = features(np.stack([to_clf_size(p["real"]) for p in prompts]))
    x_gen = features(np.stack([to_clf_size(s["image"]) for p in prompts for s in p["samples"]]))
    gen_index = [(p, s) for p in prompts for s in p["samples"]]
    classification = {}
    for key in ("category", "subcategory"):
        y_train = np.array([r[key] for r in train_rows])
        y_held = np.array([r[key] for r in held_rows])
        clf = make_classifier().fit(x_train, y_train)
        pred_held = clf.predict(x_held)
        pred_real_sel = clf.predict(x_real_sel)
        pred_gen = clf.predict(x_gen)
        classes, counts = np.unique(y_train, return_counts=True)
        majority = str(classes[counts.argmax()])
        res = {
            "classes": len(classes),
            "real_heldout": rate(int((pred_held == y_held).sum()), len(y_held)),
            "real_train_fit": rate(int((clf.predict(x_train) == y_train).sum()), len(y_train)),
            "chance_majority_class": {"class": majority,
                                      "rate_heldout": round(float((y_held == majority).mean()), 4)},
        }
        for split in ("train", "heldout"):
            idx = [i for i, p in enumerate(prompts) if p["split"] == split]
            truth = [prompts[i]["row"][key] for i in idx]
            real_ok = sum(pred_real_sel[i] == prompts[i]["row"][key] for i in idx)
            gidx = [j for j, (p, _) in enumerate(gen_index) if p["split"] == split]
            gen_ok = sum(pred_gen[j] == gen_index[j][0]["row"][key] for j in gidx)
            top = Counter(truth).most_common(1)[0][1] if truth else 0
            entry = {
                "generated": rate(int(gen_ok), len(gidx)),
                "real_same_prompts": rate(int(real_ok), len(idx)),
                "chance_majority_of_prompts": round(top / len(truth), 4) if truth else None,
                "generated_predictions": dict(sorted(Counter(str(pred_gen[j]) for j in gidx)
                                                     .items(), key=lambda kv: (-kv[1], kv[0]))),
            }
            if key == "category":
                per_cat = {}
                for c in sorted(set(truth)):
                    cj = [j for j in gidx if gen_index[j][0]["row"]["category"] == c]
                    per_cat[c] = rate(int(sum(pred_gen[j] == c for j in cj)), len(cj))
                entry["generated_per_category"] = per_cat
            res[f"{split}_prompts"] = entry
        classification[key] = res
        for j, (p, s) in enumerate(gen_index):
            s[f"pred_{key}"] = str(pred_gen[j])
            s[f"{key}_ok"] = bool(pred_gen[j] == p["row"][key])
    timings["classifier_s"] = time.monotonic() - t

    # ---- samples.jsonl, grid
    with open(out / "samples" / "samples.jsonl", "w") as f:
        for p, s in gen_index:
            r = p["row"]
            f.write(json.dumps({"file": s["file"][len("samples/"):], "split": p["split"],
                                "prompt": p["caption"], "seed": s["seed"],
                                "category": r["category"], "subcategory": r["subcategory"],
                                "name": r["name"], "style": r["style"],
                                "real_image": f"{r['split']}/{r['file_name']}",
                                "predicted_category": s["pred_category"],
                                "predicted_subcategory": s["pred_subcategory"]},
                               ensure_ascii=False) + "\n")
    tile = max(64, gen_w)
    model_label = model.resolve().name
    make_grid(
        [(f"Training names: real (framed), then {args.images_per_prompt} generated; bar under a "
          "generated image: classifier's category right (green) / wrong (red)",
          [p for p in prompts if p["split"] == "train"]),
         ("Held-out names (never trained on)", [p for p in prompts if p["split"] == "heldout"])],
        tile, args.grid_columns, out / "grid.png",
        f"ldm eval: {model_label}, {args.steps} steps {args.scheduler}, cfg {args.guidance_scale}"
        f"{f' (rescale {args.guidance_rescale})' if args.guidance_rescale else ''}, "
        f"{gen_w}x{gen_h} (shown at {tile}px)")

    # ---- eval.json
    cat = classification["category"]
    sub = classification["subcategory"]
    result = {
        "model": {"path": str(args.model), "native_size": [gen_w, gen_h], "vae_factor": factor,
                  "files_sha256": model_files(model)},
        "ldm": {"binary": str(args.ldm), "version": version, "sha256": sha256_file(Path(ldm))},
        "data": {"path": str(args.data), "resolution": [data_w, data_h],
                 "train_images": len(train_rows), "heldout_images": len(held_rows),
                 "metadata_sha256": {s: sha256_file(data / s / "metadata.jsonl")
                                     for s in ("train", "heldout")}},
        "generation": {"prompts_per_split": {s: sum(p["split"] == s for p in prompts)
                                             for s in ("train", "heldout")},
                       "images_per_prompt": args.images_per_prompt, "steps": args.steps,
                       "guidance_scale": args.guidance_scale,
                       "guidance_rescale": args.guidance_rescale, "scheduler": args.scheduler,
                       "eta": 0.0, "negative_prompt": "", "size": [gen_w, gen_h],
                       "seeds": f"prompt k: {args.seed} + k*{args.images_per_prompt} + i",
                       "batch_size": 1, "rayon_threads": args.threads,
                       "device": args.device or "ldm default", "dtype": args.dtype or "ldm default",
                       "prompt_file": "prompts.jsonl",
                       "selection": "per split, categories allocated proportionally to their "
                                    "number of names (largest remainder, >= 1 each); names in "
                                    "sha256('ldm-eval-v1:<split>:<unified>') order; style "
                                    "alternating twemoji/noto"},
        "vae_psnr": vae_result,
        "diversity": diversity,
        "classifier": {
            "model": "StandardScaler + SVC(rbf, C=10, gamma='scale'), scikit-learn "
                     + __import__("sklearn").__version__,
            "features": "32x32 RGB (Lanczos): 8x8 block means (192), sqrt 4x4x4 joint colour "
                        "histogram (64), 4x4 cells x 8 gradient orientations (128)",
            "trained_on": "all real train images (both styles)",
            "category": cat, "subcategory": sub,
        },
        "files": {"grid": "grid.png", "samples": "samples/samples.jsonl", "table": "eval.md"},
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    # ---- eval.md
    def pct(r: dict) -> str:
        lo, hi = r["ci95"]
        return f"{100 * r['rate']:.1f}% ({r['correct']}/{r['n']}; 95% CI {100 * lo:.0f}–{100 * hi:.0f}%)"

    # Links for the model card (MODEL/README.md) when OUT is inside MODEL, else relative to OUT.
    inside = out.resolve().is_relative_to(model.resolve())
    out_rel = Path(os.path.relpath(out.resolve(), model.resolve())).as_posix() if inside else "."
    grid_rel = f"{out_rel}/grid.png"
    ctr, che = cat["train_prompts"], cat["heldout_prompts"]
    str_, she = sub["train_prompts"], sub["heldout_prompts"]
    md = [
        f"Evaluation by `scripts/eval_default.py` (ldm {version.split()[-1] if version else '?'}; "
        f"data `{data.name}`, {data_w}x{data_h}). Generated with {args.steps} {args.scheduler.upper()} "
        f"steps, CFG {args.guidance_scale}, guidance rescale {args.guidance_rescale}, {gen_w}x{gen_h}, {args.images_per_prompt} fixed seeds "
        f"for each of {che['generated']['n'] // args.images_per_prompt} held-out-name and "
        f"{ctr['generated']['n'] // args.images_per_prompt} training-name prompts "
        f"(captions of the data set, stratified by category; `prompts.jsonl`).",
        "",
        "| Measure | Value |",
        "| --- | --- |",
        f"| VAE reconstruction PSNR, {vae_result['cli_roundtrip']['n']} held-out images "
        f"(`ldm img2img --strength 0`: posterior sample) | "
        f"{vae_result['cli_roundtrip']['psnr_mean_db']:.2f} dB |",
    ]
    dm = vae_result.get("diffusers_mean", {})
    if "psnr_mean_db" in dm:
        md.append(f"| VAE reconstruction PSNR, same images (posterior mean, diffusers) | "
                  f"{dm['psnr_mean_db']:.2f} dB |")
    md += [
        f"| Category classifier on real held-out images (reference) | {pct(cat['real_heldout'])} |",
        f"| Category classifier on the real images of the held-out-name prompts | "
        f"{pct(che['real_same_prompts'])} |",
        f"| **Generated, held-out names: classified as the prompt's category** | "
        f"**{pct(che['generated'])}** |",
        f"| **Generated, training names: classified as the prompt's category** | "
        f"**{pct(ctr['generated'])}** |",
        f"| Chance (majority category, {cat['chance_majority_class']['class']}) | "
        f"{100 * cat['chance_majority_class']['rate_heldout']:.1f}% of real held-out; "
        f"{100 * che['chance_majority_of_prompts']:.1f}% / {100 * ctr['chance_majority_of_prompts']:.1f}%"
        f" of held-out / training prompts |",
        f"| Subcategory ({sub['classes']} classes): real held-out / generated held-out / "
        f"generated training | {100 * sub['real_heldout']['rate']:.1f}% / "
        f"{100 * she['generated']['rate']:.1f}% / {100 * str_['generated']['rate']:.1f}% "
        f"(chance {100 * sub['chance_majority_class']['rate_heldout']:.1f}%) |",
    ]
    if diversity:
        md += [f"| Seed diversity, CFG {g}, {kind} captions ({len(diversity['seeds'])} seeds of "
               f"{len(diversity['prompts'][kind])} training names): mean pixel distance between "
               f"seeds / between prompts | {d['between_seeds']:.1f} / "
               f"{d['between_prompts']:.1f} levels (ratio {d['ratio']:.2f}) |"
               for g, by_kind in diversity["by_guidance"].items()
               for kind, d in by_kind.items()]
    md += [
        "",
        f"Classifier: RBF SVM on 32x32 pixel features (block colours, colour histogram, gradient "
        f"orientations), trained on the {len(train_rows)} real training images; its accuracy on "
        f"the training images themselves is {100 * cat['real_train_fit']['rate']:.1f}%. "
        f"Per-category rates and every prediction: `{out_rel}/eval.json`, "
        f"`{out_rel}/samples/samples.jsonl`.",
        "",
        f"![Samples: real image, then generated images, for each prompt]({grid_rel})",
        "",
    ]
    (out / "eval.md").write_text("\n".join(md))

    if not args.keep_work:
        shutil.rmtree(work)
    timings["total_s"] = time.monotonic() - t_start

    # ---- summary
    print()
    print("\n".join(md[2:-3]))
    print()
    print(f"wrote {out}/eval.json, eval.md, grid.png, prompts.jsonl, samples/ ({n_gen} images)")
    print("time: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
