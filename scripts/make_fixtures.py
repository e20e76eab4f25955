#!/usr/bin/env python3
"""Generate the diffusers/transformers parity fixtures of ldm under tests/fixtures/.

Run by hand (not in CI). The reference stack, CPU only, float32:

    python3.11 -m venv /tmp/ldm-fixtures-venv
    /tmp/ldm-fixtures-venv/bin/pip install torch==2.15.0 diffusers==0.42.1 transformers==5.23.0 \
        tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6 pillow==13.0.0 accelerate==1.15.0 regex
    /tmp/ldm-fixtures-venv/bin/pip install --no-deps open_clip_torch==3.3.0   # only for its BPE vocabulary file
    /tmp/ldm-fixtures-venv/bin/python scripts/make_fixtures.py

(The committed files were made with the default PyPI torch wheel, run on the CPU.)
Nothing is downloaded from a model hub: every model is built from a config with seeded initialisation,
saved in the diffusers folder layout and re-loaded from disk before any reference is computed.
Deterministic: one torch thread, explicit seeds everywhere; cases/MANIFEST.json lists the sha256 of every
file, so two runs can be compared with `diff`.

Output (tests/fixtures/, everything except cases/README.md is rewritten):
    tiny-sd1/      SD1-style pipeline (DDIM, epsilon, conv proj_in/out, quick_gelu CLIP, vocab.json + merges.txt)
    tiny-sd2/      SD2-style pipeline (DDIM v_prediction, linear proj, per-block heads, gelu CLIP,
                   tokenizer.json, pad "!")
    tiny-inpaint/  tiny-sd1 with a 9-channel UNet; text_encoder/, vae/ and tokenizer/ are symlinks to tiny-sd1's
    cases/         <case>.safetensors + <case>.json reference data, tokenizer.json, test PNGs, MANIFEST.json
cases/README.md documents every case and tensor.

Cases: tokenizer (json only), rng, text_encoder_sd1/_sd2, vae_sd1/_sd2, unet_sd1/_sd2/_inpaint,
schedulers_<variant> (DDIM and DDPM config variants, [1,4,8,8] latents), txt2img_* (StableDiffusionPipeline),
img2img_sd1_ddim, inpaint_9ch_ddim, inpaint_4ch_ddim. End-to-end cases use generator=[torch.Generator("cpu")
.manual_seed(seed)] (one generator per image) and are meant to be reproduced from the seed alone.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import regex  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clip_bpe import ReferenceBpe, clip_vocabulary, write_tokenizer_config  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SD1, SD2, INPAINT, CASES = (FIXTURES / d for d in ("tiny-sd1", "tiny-sd2", "tiny-inpaint", "cases"))

VERSIONS = {m.__name__: m.__version__ for m in (torch, diffusers, transformers, np, regex)}
VERSIONS["tokenizers"] = __import__("tokenizers").__version__
VERSIONS["safetensors"] = __import__("safetensors").__version__
VERSIONS["pillow"] = __import__("PIL").__version__

# ---------------------------------------------------------------------------------------------
# Seeds. All are torch CPU generators (mt19937), seeded with manual_seed.
# ---------------------------------------------------------------------------------------------
SEEDS = {
    "text_encoder_sd1": (100, 200),  # (constructor init, parameter perturbation)
    "text_encoder_sd2": (101, 201),
    "vae_sd1": (102, 202),
    "vae_sd2": (103, 203),
    "unet_sd1": (104, 204),
    "unet_sd2": (105, 205),
    "unet_inpaint": (106, 206),
}
SEED_UNET_CASE = 300  # UNet case samples
SEED_VAE_CASE = 301  # VAE posterior sample eps (latent_dist.sample(generator))
SEED_VAE_LATENTS = 302  # latents for the VAE decode check
SEED_SCHED = 400  # scheduler cases: + variant index (x_T, model outputs); + 100 for step noise

PROMPT = "a photo of a cat"
PROMPT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
LONG_PROMPT = ", ".join(
    ["an astronaut riding a horse on the moon", "highly detailed", "8k", "trending on artstation"] * 5
)
TOKENIZER_STRINGS = [
    PROMPT,
    "",
    "A Photo OF a CAT",
    "hello, world! (masterpiece:1.2), [best quality] {sharp}; it's a dog's life...",
    "don't won't we'll they've I'm she'd",
    "wow!! amazing! !",
    "1234567 3.14159 2024-01-01 4k 8K x2",
    "café naïve résumé ÅNGSTRÖM Straße",
    "cafe\u0301 decomposed accent",
    "emoji \U0001f431\U0001f680\u2728 and CJK \u732b\u306e\u5199\u771f",
    "  extra   spaces\tand\ttabs\nand newlines  ",
    " ".join(["cat"] * 75),
    " ".join(["cat"] * 76),
    LONG_PROMPT,
]
NEGATIVE_REAL = "blurry, low quality, watermark"
SIZE = 64  # pixels; every pipeline case is 64x64, latents 32x32 (vae factor 2)
GUIDANCE = 7.5

SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)
SD21_SCHEDULER = dict(SD15_SCHEDULER, prediction_type="v_prediction")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def generator(seed):
    return torch.Generator("cpu").manual_seed(seed)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items() if k != "_use_default_values"}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def write_json(path, obj):
    path.write_text(json.dumps(jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def scheduler_config(scheduler):
    """The dict diffusers writes to scheduler_config.json (class name included, version dropped)."""
    cfg = json.loads(scheduler.to_json_string())
    cfg.pop("_diffusers_version", None)
    # DPM-Solver's default lambda_min_clipped is -inf, which strict JSON cannot hold (diffusers writes a bare
    # -Infinity; ldm reads that too, see tests/schedulers.rs). Left out, it takes the same default.
    if cfg.get("lambda_min_clipped") == float("-inf"):
        del cfg["lambda_min_clipped"]
    return cfg


def save_case(name, tensors, meta):
    """<name>.safetensors (contiguous CPU tensors) + <name>.json (meta + an index of the tensors)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(CASES / f"{name}.safetensors"), metadata={"case": name})
    meta = {"case": name, **meta, "versions": VERSIONS}
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in sorted(tensors.items())}
    write_json(CASES / f"{name}.json", meta)
    print(f"  case {name}: {len(tensors)} tensors")


def load_case_tensor(case, name):
    return load_file(str(CASES / f"{case}.safetensors"))[name]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_equal(what, a, b):
    assert a.shape == b.shape and torch.equal(a, b), f"{what}: differs (max {float((a - b).abs().max())})"


def write_tokenizer_folders(workdir):
    """Returns ({"sd1": folder with vocab.json + merges.txt, "sd2": folder with tokenizer.json}, ReferenceBpe)."""
    vocab, merges = clip_vocabulary()
    folders = {"sd1": workdir / "sd1", "sd2": workdir / "sd2"}
    for name, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
        folders[name].mkdir(parents=True)
        (folders[name] / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folders[name] / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        write_tokenizer_config(folders[name], pad)
    # The fast form of the SD2 tokenizer: what transformers builds from vocab.json + merges.txt + the SD2 config
    # (NFC, \s+ -> " ", lowercase; CLIP split regex; byte-level; BPE with "</w>"; RobertaProcessing bos/eos;
    # the special tokens, "!" included, as added tokens), saved by the tokenizers library.
    sd2 = CLIPTokenizer.from_pretrained(str(folders["sd2"]))
    sd2.backend_tokenizer.save(str(folders["sd2"] / "tokenizer.json"), pretty=False)
    for name in ("vocab.json", "merges.txt"):
        (folders["sd2"] / name).unlink()
    return folders, ReferenceBpe(vocab, merges)


def check_tokenizers(folders, reference):
    toks = {k: CLIPTokenizer.from_pretrained(str(v)) for k, v in folders.items()}
    raw = Tokenizer.from_file(str(folders["sd2"] / "tokenizer.json"))
    assert toks["sd1"].pad_token_id == 49407 and toks["sd2"].pad_token_id == 0
    added = {"sd1": (), "sd2": ("!",)}
    for tok in toks.values():
        assert tok.model_max_length == 77 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
        assert tok(PROMPT).input_ids == PROMPT_IDS
    for text in TOKENIZER_STRINGS:
        for name, tok in toks.items():
            expected = reference.encode(text, added[name])
            assert tok(text).input_ids == expected, (name, text, tok(text).input_ids, expected)
        assert raw.encode(text).ids == toks["sd2"](text).input_ids, ("tokenizer.json", text)
    return toks


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def perturb(model, seed):
    """Adds seeded noise to every parameter, in named_parameters() order, so that no norm is an identity and no
    bias or weight is zero: randn*0.1*std(p) on >=2-D tensors (0.1 absolute if p is constant), randn*0.1 on 1-D."""
    g = generator(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            std = float(p.std()) if p.ndim >= 2 else 0.0
            p.add_(noise * (0.1 * std if std > 0 else 0.1))
            assert torch.count_nonzero(p) == p.numel() or p.ndim >= 2, name
            assert p.numel() == 1 or float(p.std()) > 0, f"{name} is constant"


def build_text_encoder(key, **config):
    init, noise = SEEDS[key]
    torch.manual_seed(init)
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **config)
    model = CLIPTextModel(cfg).eval()
    perturb(model, noise)
    return model.to(torch.float16)  # stored in f16; the f32 references use the f16-rounded values


def build_vae(key, **config):
    init, noise = SEEDS[key]
    torch.manual_seed(init)
    blocks = len(config["block_out_channels"])
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", sample_size=SIZE,
                          scaling_factor=0.18215, down_block_types=("DownEncoderBlock2D",) * blocks,
                          up_block_types=("UpDecoderBlock2D",) * blocks, **config).eval()
    perturb(model, noise)
    return model


def build_unet(key, **config):
    init, noise = SEEDS[key]
    torch.manual_seed(init)
    model = UNet2DConditionModel(sample_size=SIZE // 2, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                                 **config).eval()
    perturb(model, noise)
    return model


SD1_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
                projection_dim=32, hidden_act="quick_gelu")
SD2_TEXT = dict(hidden_size=24, intermediate_size=50, num_hidden_layers=3, num_attention_heads=3,
                projection_dim=24, hidden_act="gelu")
SD1_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)
SD2_VAE = dict(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=16)
SD1_UNET = dict(in_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, use_linear_projection=False)
SD2_UNET = dict(in_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=24, attention_head_dim=[2, 4, 8], norm_num_groups=16,
                use_linear_projection=True, upcast_attention=True)


def add_text_model_prefix(folder):
    """transformers 5 saves CLIPTextModel tensors without the `text_model.` prefix that every SD repo (saved by
    transformers 4) has; rewrite to the SD layout (transformers 5 loads both)."""
    path = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(str(path))
    tensors = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def save_pipeline(folder, pipeline_class, tokenizer_folder, **components):
    pipe = pipeline_class(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    add_text_model_prefix(folder)
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(tokenizer_folder, folder / "tokenizer")


def link_shared_components(folder, source):
    """tiny-inpaint shares text encoder, VAE and tokenizer with tiny-sd1: after checking that the saved files are
    byte-identical, replace them with relative symlinks (keeps the fixtures small)."""
    for component in ("text_encoder", "vae", "tokenizer"):
        mine, theirs = folder / component, source / component
        names = sorted(p.name for p in mine.iterdir())
        assert names == sorted(p.name for p in theirs.iterdir()), component
        assert all(sha256(mine / n) == sha256(theirs / n) for n in names), component
        shutil.rmtree(mine)
        mine.symlink_to(Path("..") / source.name / component, target_is_directory=True)


def load_pipeline(pipeline_class, folder):
    pipe = pipeline_class.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_reloaded(pipe, **expected):
    for name, module in expected.items():
        loaded = getattr(pipe, name).state_dict()
        reference = {k: v.float() for k, v in module.state_dict().items()}
        assert loaded.keys() == reference.keys(), name
        for k in loaded:
            assert_equal(f"{name}.{k}", loaded[k], reference[k])


# ---------------------------------------------------------------------------------------------
# Random draws made by diffusers (randn_tensor), recorded with the generator each one used
# ---------------------------------------------------------------------------------------------
DRAWING_MODULES = [
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
    "diffusers.schedulers.scheduling_ddim",
    "diffusers.schedulers.scheduling_ddpm",
    "diffusers.schedulers.scheduling_euler_discrete",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "diffusers.models.autoencoders.vae",
]


class DrawRecorder:
    """Context manager replacing diffusers' randn_tensor in the modules that draw, recording each call:
    the function that asked, the shape, which of the case's generators it used (a list of one generator is
    treated by diffusers as that generator) and the tensor."""

    def __init__(self, generators):
        self.generators = generators
        self.draws = []

    def __enter__(self):
        self.modules = [sys.modules[m] if m in sys.modules else importlib.import_module(m) for m in DRAWING_MODULES]
        self.original = self.modules[0].randn_tensor
        for module in self.modules:
            assert module.randn_tensor is self.original, module.__name__
            module.randn_tensor = self.randn_tensor
        self.global_rng = torch.get_rng_state()
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            module.randn_tensor = self.original
        assert torch.equal(self.global_rng, torch.get_rng_state()), "diffusers used torch's global RNG"
        return False

    def randn_tensor(self, shape, generator=None, device=None, dtype=None, layout=None):
        caller = sys._getframe(1)
        used = generator if isinstance(generator, list) else [generator]
        indices = [next(i for i, g in enumerate(self.generators) if g is u) for u in used]
        tensor = self.original(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        self.draws.append({"caller": f"{caller.f_globals['__name__'].split('.')[-1]}.{caller.f_code.co_name}",
                           "shape": list(shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                           "generators": indices, "tensor": tensor.clone()})
        return tensor

    def replay_from_seeds(self, seeds):
        """Checks that fresh generators, drawn in the recorded order, reproduce every draw: with one generator
        per call randn(shape); with a list of n generators row i = randn([1, ...]) from generator i."""
        fresh = [generator(s) for s in seeds]
        for i, draw in enumerate(self.draws):
            if len(draw["generators"]) == 1:
                again = torch.randn(draw["shape"], generator=fresh[draw["generators"][0]])
            else:
                again = torch.cat([torch.randn([1, *draw["shape"][1:]], generator=fresh[g])
                                   for g in draw["generators"]])
            assert_equal(f"draw {i} replayed from seeds", again, draw["tensor"])

    def summary(self):
        return [{k: v for k, v in d.items() if k != "tensor"} for d in self.draws]


# ---------------------------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------------------------
def write_test_images():
    """A smooth deterministic RGB image and an inpainting mask (white = repaint), saved as PNG."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / (SIZE - 1)
    rgb = np.stack([0.5 + 0.45 * np.sin(2 * np.pi * (x + 0.3 * y)),
                    0.2 + 0.7 * y * (1 - 0.5 * x),
                    0.5 + 0.45 * np.cos(2 * np.pi * np.hypot(x - 0.6, y - 0.4) * 1.5)], axis=-1)
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(CASES / "test_image_64.png")
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[13:45, 22:54] = 255  # rows 13..44, cols 22..53: odd start row, so nearest downsampling matters
    mask[13:45, 21] = 128  # 128/255 >= 0.5: binarised to 1 (repaint)
    mask[13:45, 54] = 127  # 127/255 < 0.5: binarised to 0 (keep)
    Image.fromarray(mask).save(CASES / "test_mask_64.png")


def load_test_image():
    return Image.open(CASES / "test_image_64.png")


def load_test_mask():
    return Image.open(CASES / "test_mask_64.png")


def image_tensor():
    """[1,3,64,64] in [-1,1], computed as diffusers' VaeImageProcessor does (u8/255 in f32, then 2x-1)."""
    u8 = np.array(load_test_image())
    return 2.0 * torch.from_numpy(u8.astype(np.float32) / 255.0).permute(2, 0, 1)[None] - 1.0


# ---------------------------------------------------------------------------------------------
# Cases: tokenizer, rng, text encoders, VAEs, UNets
# ---------------------------------------------------------------------------------------------
def case_tokenizer(toks):
    rows = []
    for text in TOKENIZER_STRINGS:
        row = {"text": text}
        for name, tok in toks.items():
            enc = tok(text, padding="max_length", max_length=77, truncation=True)
            assert len(enc.input_ids) == 77
            row[f"{name}_input_ids"] = enc.input_ids
            row[f"{name}_attention_mask"] = enc.attention_mask
            row[f"{name}_input_ids_untruncated"] = tok(text).input_ids
        rows.append(row)
    write_json(CASES / "tokenizer.json", {
        "case": "tokenizer",
        "description": "CLIP BPE tokenization as SD pipelines do it: tokenizer(text, padding='max_length', "
                       "max_length=77, truncation=True). Truncation keeps BOS + the first 75 tokens + EOS. sd1 pads "
                       "with <|endoftext|> (49407), sd2 with '!' (0). <tok>_input_ids_untruncated: tokenizer(text) "
                       "with no padding/truncation. sd2 registers its pad token '!' as a special added token, so a "
                       "'!' in the text also becomes id 0 (sd1: '!</w>' = 256, '!!</w>' = 748 ...); otherwise the "
                       "two agree.",
        "tokenizers": {"sd1": {"folder": "tiny-sd1/tokenizer", "files": ["vocab.json", "merges.txt"],
                               "pad_token": "<|endoftext|>", "pad_token_id": 49407},
                       "sd2": {"folder": "tiny-sd2/tokenizer", "files": ["tokenizer.json"],
                               "pad_token": "!", "pad_token_id": 0}},
        "bos_token_id": 49406, "eos_token_id": 49407, "max_length": 77,
        "rows": rows, "versions": VERSIONS,
    })
    print(f"  case tokenizer: {len(rows)} strings")


RNG_SEEDS = [0, 1, 5, 42, 2**32 + 5, 123456789]
RNG_SHAPES = [[1, 4, 8, 8], [2, 4, 32, 32], [16], [17], [5], [3, 7], [1]]
RNG_RAND_SHAPES = [[5], [16], [2, 3, 4]]


def shape_name(shape):
    return "x".join(map(str, shape))


def case_rng():
    tensors = {}
    for seed in RNG_SEEDS:
        for shape in RNG_SHAPES:
            tensors[f"seed{seed}_shape{shape_name(shape)}"] = torch.randn(shape, generator=generator(seed))
        for shape in RNG_RAND_SHAPES:
            tensors[f"rand_seed{seed}_shape{shape_name(shape)}"] = torch.rand(shape, generator=generator(seed))
    sequences = {}
    for key, seed, plan in [("sequence", 7, [("randn", [1, 4, 8, 8]), ("randn", [3]), ("randn", [3]), ("randn", [20])]),
                            ("sequence_mixed", 8, [("randn", [5]), ("rand", [3]), ("randn", [17]), ("randn", [1]),
                                                   ("rand", [20]), ("randn", [2])])]:
        g = generator(seed)
        draws = []
        for i, (fn, shape) in enumerate(plan):
            name = f"{key}_{i}_{fn}_shape{shape_name(shape)}"
            tensors[name] = getattr(torch, fn)(shape, generator=g)
            draws.append({"name": name, "fn": fn, "shape": shape})
        sequences[key] = {"seed": seed, "draws": draws}
    seed5_same = torch.equal(tensors["seed5_shape1x4x8x8"], tensors[f"seed{2**32 + 5}_shape1x4x8x8"])
    save_case("rng", tensors, {
        "description": "torch CPU generator reference. seed{S}_shape{AxB..} = torch.randn(shape, generator="
                       "torch.Generator('cpu').manual_seed(S)) (float32); rand_seed{S}_shape{..} = torch.rand(...). "
                       "sequence / sequence_mixed: one generator, the listed draws in order (state carries over).",
        "seeds": RNG_SEEDS, "randn_shapes": RNG_SHAPES, "rand_shapes": RNG_RAND_SHAPES,
        **sequences,
        "seed_2pow32_plus_5_equals_seed_5": seed5_same,
    })


TEXT_ROWS = [PROMPT, "", "an astronaut riding a horse on the moon, highly detailed, 4k"]


def case_text_encoder(name, pipe):
    ids = torch.tensor([pipe.tokenizer(t, padding="max_length", max_length=77, truncation=True).input_ids
                        for t in TEXT_ROWS], dtype=torch.int64)
    te = pipe.text_encoder
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        # diffusers' clip_skip path calls text_encoder.text_model.final_layer_norm, which transformers 5's
        # CLIPTextModel no longer has (pipe(..., clip_skip=n) raises AttributeError); same maths here.
        skip1 = te.final_layer_norm(out.hidden_states[-2])
        embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
    pipeline_drift = float((torch.cat([embeds, negative]) - out.last_hidden_state[:2]).abs().max())
    assert pipeline_drift < 1e-5, pipeline_drift
    save_case(name, {"input_ids": ids, "last_hidden_state": out.last_hidden_state,
                     "pooler_output": out.pooler_output, "hidden_states": torch.stack(out.hidden_states),
                     "clip_skip_1": skip1}, {
        "description": "CLIPTextModel forward, no attention mask (SD pipelines pass none), causal mask inside.",
        "texts": TEXT_ROWS,
        "text_encoder_config": pipe.text_encoder.config.to_dict(),
        "weights": "stored in float16, loaded as float32 (exact upcast)",
    })
    return out.last_hidden_state


def case_vae(name, vae):
    image = image_tensor()
    latents = torch.randn([1, 4, SIZE // 2, SIZE // 2], generator=generator(SEED_VAE_LATENTS))
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
        sample = posterior.sample(generator=generator(SEED_VAE_CASE))
        decoded = vae.decode(latents).sample
    eps = torch.randn(posterior.mean.shape, generator=generator(SEED_VAE_CASE))
    assert_equal("posterior sample", sample, posterior.mean + posterior.std * eps)
    save_case(name, {"image": image, "mean": posterior.mean, "logvar": posterior.logvar, "std": posterior.std,
                     "sample_eps": eps, "sample": sample, "latents": latents, "decoded": decoded}, {
        "description": "AutoencoderKL. encode(image).latent_dist: mean, logvar = clamp(moments[:,4:], -30, 20), "
                       "std = exp(0.5*logvar); sample = latent_dist.sample(Generator.manual_seed(sample_seed)) = "
                       "mean + std*sample_eps. decoded = vae.decode(latents).sample, raw (no 1/scaling_factor, "
                       "no clamp). image = 2*u8/255-1 of cases/test_image_64.png.",
        "sample_seed": SEED_VAE_CASE, "latents_seed": SEED_VAE_LATENTS,
        "vae_config": dict(vae.config),
    })


def case_unet(name, unet, text_states, debug_activations):
    channels = unet.config.in_channels
    sample = torch.randn([2, channels, SIZE // 2, SIZE // 2], generator=generator(SEED_UNET_CASE))
    timestep = torch.tensor([999.0, 17.0], dtype=torch.float32)
    states = text_states[[1, 0]]  # (empty prompt, prompt): the order of a CFG batch
    activations, hooks = {}, []
    if debug_activations:
        # the low-resolution half only (the full-resolution maps would dominate the file size)
        modules = {"time_proj": unet.time_proj, "time_embedding": unet.time_embedding, "mid_block": unet.mid_block}
        modules.update({f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)})
        for key, module in modules.items():
            hooks.append(module.register_forward_hook(
                lambda m, a, o, key=key: activations.__setitem__(f"act.{key}", o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        out = unet(sample, timestep, encoder_hidden_states=states).sample
    for h in hooks:
        h.remove()
    with torch.no_grad():  # per-row timesteps really are per row
        row1 = unet(sample[1:], timestep[1:], encoder_hidden_states=states[1:]).sample
    assert float((row1 - out[1:]).abs().max()) < 1e-4 * float(out.abs().max())
    save_case(name, {"sample": sample, "timestep": timestep, "encoder_hidden_states": states, "out": out,
                     **activations}, {
        "description": "UNet2DConditionModel forward with a different timestep per batch row (float32 [2]). "
                       "encoder_hidden_states = text encoder last_hidden_state of ('', 'a photo of a cat').",
        "timesteps": timestep, "sample_seed": SEED_UNET_CASE,
        "activations": "act.<module> = output of that module: time_proj [2,C0] (sinusoids, [cos, sin]), "
                       "time_embedding [2,4*C0], down_blocks.i (hidden states only, not the residuals), mid_block"
                       if debug_activations else None,
        "unet_config": dict(unet.config),
    })


# ---------------------------------------------------------------------------------------------
# Scheduler cases
# ---------------------------------------------------------------------------------------------
SCHEDULER_VARIANTS = [
    # name, class, config (beyond the class defaults), inference steps, eta (DDIM only)
    ("ddim_sd15", DDIMScheduler, SD15_SCHEDULER, 10, 0.0),
    ("ddim_sd15_eta07", DDIMScheduler, SD15_SCHEDULER, 10, 0.7),
    ("ddim_sd21_vpred", DDIMScheduler, SD21_SCHEDULER, 10, 0.0),
    # {} = the class defaults: linear 1e-4..0.02, clip_sample (1.0), set_alpha_to_one, steps_offset 0, leading
    ("ddim_defaults_linear_clip", DDIMScheduler, {}, 7, 0.0),
    ("ddim_linear_leading_offset0_clip2", DDIMScheduler,
     dict(beta_schedule="linear", clip_sample=True, clip_sample_range=2.0, set_alpha_to_one=False), 10, 0.7),
    ("ddim_cos_vpred_trailing", DDIMScheduler,
     dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
          clip_sample=False, set_alpha_to_one=False), 7, 0.0),
    ("ddim_scaled_trailing_alpha_one", DDIMScheduler,
     dict(SD15_SCHEDULER, timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True), 10, 0.0),
    ("ddim_linspace_sample_clip15_eta07", DDIMScheduler,
     dict(SD15_SCHEDULER, timestep_spacing="linspace", steps_offset=0, prediction_type="sample", clip_sample=True,
          clip_sample_range=1.5), 7, 0.7),
    ("ddim_vpred_zero_snr_trailing", DDIMScheduler,
     dict(SD21_SCHEDULER, timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True), 10, 0.0),
    ("ddpm_sd15", DDPMScheduler, SD15_SCHEDULER, 10, None),
    ("ddpm_sd15_fixed_large", DDPMScheduler, dict(SD15_SCHEDULER, variance_type="fixed_large"), 10, None),
    ("ddpm_sd21_vpred", DDPMScheduler, SD21_SCHEDULER, 10, None),
    ("ddpm_defaults_linear_clip", DDPMScheduler, {}, 7, None),
    ("ddpm_cos_vpred_trailing", DDPMScheduler,
     dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
          clip_sample=False), 7, None),
    ("ddpm_linspace_sample_clip2_fixed_large", DDPMScheduler,
     dict(SD15_SCHEDULER, timestep_spacing="linspace", steps_offset=0, prediction_type="sample", clip_sample=True,
          clip_sample_range=2.0, variance_type="fixed_large"), 7, None),
    ("ddpm_scaled_trailing_eps", DDPMScheduler,
     dict(SD15_SCHEDULER, timestep_spacing="trailing", steps_offset=0), 10, None),
    ("ddpm_linear_leading_offset1", DDPMScheduler,
     dict(beta_schedule="linear", clip_sample=False, steps_offset=1), 10, None),
    ("euler_sd15", EulerDiscreteScheduler, SD15_SCHEDULER, 10, None),
    # {} = the class defaults: linear betas, linspace spacing (fractional timesteps), final sigma 0
    ("euler_defaults_linspace", EulerDiscreteScheduler, {}, 7, None),
    ("euler_sd21_vpred_karras", EulerDiscreteScheduler, dict(SD21_SCHEDULER, use_karras_sigmas=True), 10, None),
    ("euler_vpred_zero_snr_trailing", EulerDiscreteScheduler,
     dict(SD21_SCHEDULER, timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True), 10, None),
    ("euler_trailing_sigma_min", EulerDiscreteScheduler,
     dict(SD15_SCHEDULER, timestep_spacing="trailing", steps_offset=0, final_sigmas_type="sigma_min"), 7, None),
    ("euler_a_sd15", EulerAncestralDiscreteScheduler, SD15_SCHEDULER, 10, None),
    ("euler_a_vpred_linspace", EulerAncestralDiscreteScheduler,
     dict(SD21_SCHEDULER, timestep_spacing="linspace", steps_offset=0), 7, None),
    ("dpmpp_2m_sd15", DPMSolverMultistepScheduler, SD15_SCHEDULER, 10, None),
    # {} = the class defaults: linear, linspace, order 2 midpoint, lower_order_final (not reached: 20 >= 15 steps)
    ("dpmpp_2m_defaults_20", DPMSolverMultistepScheduler, {}, 20, None),
    ("dpmpp_2m_sd21_vpred_karras", DPMSolverMultistepScheduler, dict(SD21_SCHEDULER, use_karras_sigmas=True), 10, None),
    ("dpmpp_2m_heun_trailing_sigma_min", DPMSolverMultistepScheduler,
     dict(SD15_SCHEDULER, timestep_spacing="trailing", steps_offset=0, solver_type="heun",
          final_sigmas_type="sigma_min", lower_order_final=False), 7, None),
    ("dpmpp_2m_sde_sd15", DPMSolverMultistepScheduler, dict(SD15_SCHEDULER, algorithm_type="sde-dpmsolver++"),
     10, None),
    ("dpmpp_2m_sde_heun_vpred_trailing", DPMSolverMultistepScheduler,
     dict(SD21_SCHEDULER, algorithm_type="sde-dpmsolver++", solver_type="heun", timestep_spacing="trailing",
          steps_offset=0), 7, None),
    ("dpmpp_1_vpred_zero_snr", DPMSolverMultistepScheduler,
     dict(SD21_SCHEDULER, solver_order=1, rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0),
     8, None),
]

# Schedulers that walk sigmas: no get_velocity, add_noise at the pipeline's begin index.
SIGMA_CLASSES = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler)


def prev_timestep(scheduler, t):
    """The previous timestep as the scheduler's step() computes it."""
    if isinstance(scheduler, DDIMScheduler):
        return int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return int(scheduler.previous_timestep(t))


SIGMA_ADD_NOISE_STEP = 3


def case_scheduler(index, name, cls, config, steps, eta):
    scheduler = cls.from_config(config)  # as users do; keys the class lacks (set_alpha_to_one for DDPM) are dropped
    scheduler.set_timesteps(steps)
    seed = SEED_SCHED + index
    noise_seed = seed + 100
    inputs = generator(seed)
    step_noise = generator(noise_seed)
    shape = [1, 4, 8, 8]
    sample = torch.randn(shape, generator=inputs) * scheduler.init_noise_sigma
    record = {k: [] for k in ("sample", "model_output", "noise", "prev_sample", "pred_original_sample")}
    scaled_inputs = []
    noise_drawn = []
    for t in scheduler.timesteps:
        scaled_inputs.append(scheduler.scale_model_input(sample, t))
        model_output = torch.randn(shape, generator=inputs)
        kwargs = {"generator": step_noise}
        if eta is not None:
            kwargs["eta"] = eta
        with DrawRecorder([step_noise]) as draws:
            out = scheduler.step(model_output, t, sample, return_dict=False, **kwargs)
        # DPM-Solver returns only prev_sample; its x0 prediction is the converted model output it keeps.
        prev, pred_x0 = (out[0], scheduler.model_outputs[-1]) if len(out) == 1 else out
        assert len(draws.draws) <= 1
        noise = draws.draws[0]["tensor"] if draws.draws else torch.zeros(shape)
        noise_drawn.append(bool(draws.draws))
        for key, value in zip(record, (sample, model_output, noise, prev, pred_x0)):
            record[key].append(value)
        sample = prev
    replay = generator(noise_seed)  # the drawn noises are consecutive randn draws of one generator
    for noise, drawn in zip(record["noise"], noise_drawn):
        if drawn:
            assert_equal("scheduler noise from seed", torch.randn(shape, generator=replay), noise)
    # Training-side helpers with a different timestep per batch row.
    add_original = torch.randn([2, 4, 8, 8], generator=inputs)
    add_noise = torch.randn([2, 4, 8, 8], generator=inputs)
    tensors = {key: torch.stack(values) for key, values in record.items()}
    tensors.update({"timesteps": scheduler.timesteps, "alphas_cumprod": scheduler.alphas_cumprod,
                    "betas": scheduler.betas, "scaled_input": torch.stack(scaled_inputs),
                    "add_noise_original": add_original, "add_noise_noise": add_noise})
    if isinstance(scheduler, SIGMA_CLASSES):
        # add_noise uses the sigma of the pipeline's begin index (img2img), whatever the rows.
        fresh = cls.from_config(config)
        fresh.set_timesteps(steps)
        fresh.set_begin_index(SIGMA_ADD_NOISE_STEP)
        rows = fresh.timesteps[SIGMA_ADD_NOISE_STEP].repeat(2)
        tensors.update({"sigmas": scheduler.sigmas,
                        "add_noise_out": fresh.add_noise(add_original, add_noise, rows)})
    else:
        add_timesteps = torch.tensor([999, 17], dtype=torch.int64)
        tensors.update({
            "add_noise_timesteps": add_timesteps,
            "add_noise_out": scheduler.add_noise(add_original, add_noise, add_timesteps),
            "velocity": scheduler.get_velocity(add_original, add_noise, add_timesteps),
        })
    meta = {
        "description": f"{cls.__name__}: set_timesteps({steps}), then a chain of step(model_output, t, sample"
                       f"{', eta=' + str(eta) if eta is not None else ''}, generator=Generator.manual_seed("
                       f"noise_seed)) calls; sample[i+1] = prev_sample[i].",
        "scheduler_class": cls.__name__, "scheduler_config": scheduler_config(scheduler),
        "num_inference_steps": steps, "eta": eta,
        "timesteps": scheduler.timesteps,
        "noise_drawn": noise_drawn, "init_noise_sigma": float(scheduler.init_noise_sigma),
        "inputs_seed": seed, "noise_seed": noise_seed,
        "inputs_order": "x_T = randn([1,4,8,8]) * init_noise_sigma, then model_output[i] = randn([1,4,8,8]) per "
                        "step, then add_noise_original, add_noise_noise ([2,4,8,8]), all from Generator(inputs_seed)",
    }
    if isinstance(scheduler, SIGMA_CLASSES):
        meta["add_noise_step"] = SIGMA_ADD_NOISE_STEP
    else:
        meta["prev_timesteps"] = [prev_timestep(scheduler, t) for t in scheduler.timesteps]
    if isinstance(scheduler, DDIMScheduler):
        meta["final_alpha_cumprod"] = float(scheduler.final_alpha_cumprod)
    save_case(f"schedulers_{name}", tensors, meta)


# ---------------------------------------------------------------------------------------------
# End-to-end pipeline cases
# ---------------------------------------------------------------------------------------------
class PipelineProbe:
    """Hooks on one pipeline run: UNet calls (sample, timestep, states), VAE encoder inputs and the latents after
    every step (callback_on_step_end, i.e. after the inpainting blend for 4-channel UNets)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet_calls, self.encoder_inputs, self.step_latents, self.callback_tensors = [], [], [], {}

    def __enter__(self):
        def unet_hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            self.unet_calls.append({"sample": sample.clone(), "timestep": timestep,
                                    "encoder_hidden_states": kwargs["encoder_hidden_states"].clone()})

        self.hooks = [self.pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True),
                      self.pipe.vae.encoder.register_forward_pre_hook(
                          lambda m, a: self.encoder_inputs.append(a[0].clone()))]
        self.encoded_latents = []  # inpainting: scaling_factor * posterior sample, per _encode_vae_image call
        if hasattr(self.pipe, "_encode_vae_image"):
            encode = self.pipe._encode_vae_image

            def recording_encode(*args, **kwargs):
                latents = encode(*args, **kwargs)
                self.encoded_latents.append(latents.clone())
                return latents

            self.pipe._encode_vae_image = recording_encode
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.pipe.__dict__.pop("_encode_vae_image", None)
        return False

    def callback(self, pipe, i, t, tensors):
        self.step_latents.append(tensors["latents"].clone())
        if i == 0:
            self.callback_tensors = {k: v.clone() for k, v in tensors.items()}
        return {}


def numpy_image_tensors(images):
    """diffusers' output_type='np' image [B,H,W,3] and the uint8 image numpy_to_pil makes of it."""
    assert images.dtype == np.float32
    return torch.from_numpy(images.copy()), torch.from_numpy((images * 255).round().astype("uint8"))


def run_pipeline_case(name, pipe, description, seeds, call, extra_meta=None, inputs=None):
    """Runs pipe(**call) twice with fresh generators [Generator.manual_seed(s) for s in seeds]: output_type='np'
    (recorded) and output_type='latent' (final latents)."""
    inputs = inputs or {}
    generators = [generator(s) for s in seeds]
    probe = PipelineProbe(pipe)
    callback_inputs = ["latents", "prompt_embeds"]
    if isinstance(pipe, StableDiffusionInpaintPipeline):
        callback_inputs += ["mask", "masked_image_latents"]
    with probe, DrawRecorder(generators) as draws:
        images = pipe(**call, generator=generators, output_type="np", callback_on_step_end=probe.callback,
                      callback_on_step_end_tensor_inputs=callback_inputs).images
    draws.replay_from_seeds(seeds)
    latents = pipe(**call, generator=[generator(s) for s in seeds], output_type="latent").images
    assert_equal("output_type='latent' vs last step latents", latents, probe.step_latents[-1])
    image, image_u8 = numpy_image_tensors(images)
    batch = latents.shape[0]
    timesteps = torch.stack([torch.as_tensor(c["timestep"]).reshape(()) for c in probe.unet_calls])
    first = probe.unet_calls[0]
    tensors = {
        "latents_init": first["sample"][:batch, :4],  # scale_model_input is the identity for DDIM / DDPM
        "encoder_hidden_states": first["encoder_hidden_states"],
        "timesteps": timesteps,
        "step_latents": torch.stack(probe.step_latents),
        "latents_final": latents,
        "image": image,
        "image_u8": image_u8,
        **inputs,
    }
    if isinstance(pipe, StableDiffusionInpaintPipeline) and pipe.unet.config.in_channels == 4:
        tensors["image_latents"] = probe.encoded_latents[0]
    if "mask" in probe.callback_tensors:
        cfg_rows = probe.callback_tensors["mask"].shape[0] // 2  # cat([x] * 2) under CFG
        tensors["mask_latents"] = probe.callback_tensors["mask"][:cfg_rows]
        tensors["masked_image_latents"] = probe.callback_tensors["masked_image_latents"][:cfg_rows]
    scheduler = pipe.scheduler
    call_meta = {k: v for k, v in call.items() if k not in ("image", "mask_image")}
    meta = {
        "description": description,
        "pipeline": type(pipe).__name__,
        "call": {**call_meta, "generator": f"[torch.Generator('cpu').manual_seed(s) for s in {seeds}]"},
        "seeds": seeds,
        "scheduler_class": type(scheduler).__name__, "scheduler_config": scheduler_config(scheduler),
        "init_noise_sigma": float(scheduler.init_noise_sigma),
        "timesteps": timesteps,
        "unet_timestep_dtype": str(torch.as_tensor(first["timestep"]).dtype).removeprefix("torch."),
        "unet_calls": len(probe.unet_calls), "unet_batch": int(first["sample"].shape[0]),
        "random_draws": draws.summary(),
        "random_draws_note": "every randn_tensor call in order: caller, shape, and the indices (into seeds) of the "
                             "generators used; one index = one torch.randn(shape) from that generator, several = "
                             "row i drawn as randn([1, ...]) from generator i",
        "vae_encoder_calls": len(probe.encoder_inputs),
        **(extra_meta or {}),
    }
    save_case(name, tensors, meta)
    return probe, draws


def txt2img_cases(sd1, sd2):
    base = dict(prompt=PROMPT, negative_prompt="", height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                num_inference_steps=10)
    ddim1, ddim2 = sd1.scheduler, sd2.scheduler
    ddpm1 = DDPMScheduler.from_config(ddim1.config)
    ddpm2 = DDPMScheduler.from_config(ddim2.config)
    cases = [
        ("txt2img_sd1_ddim", sd1, ddim1, [1000], {}, "SD1, DDIM eta 0: the only draw is the initial latents."),
        ("txt2img_sd1_ddpm", sd1, ddpm1, [1001], {},
         "SD1, DDPMScheduler.from_config(DDIM config): variance noise drawn at every step from the same generator."),
        ("txt2img_sd1_ddim_eta", sd1, ddim1, [1002], dict(eta=0.5, negative_prompt=NEGATIVE_REAL),
         "SD1, DDIM eta 0.5 (noise drawn at every step) and a real negative prompt."),
        ("txt2img_sd1_cfg1", sd1, ddim1, [1003], dict(guidance_scale=1.0),
         "SD1, guidance_scale 1.0: no classifier-free guidance, the UNet batch is 1 and the negative prompt "
         "is not encoded."),
        ("txt2img_sd1_batch2", sd1, ddpm1, [1004, 1005], dict(num_images_per_prompt=2),
         "SD1, DDPM, num_images_per_prompt 2 with one generator per image: image i's initial latents and step "
         "noise come from generator i. UNet batch = [neg, neg, pos, pos]."),
        ("txt2img_sd2_ddim", sd2, ddim2, [1006], {}, "SD2 (v_prediction), DDIM eta 0."),
        ("txt2img_sd2_ddpm", sd2, ddpm2, [1007], {}, "SD2 (v_prediction), DDPM."),
        ("txt2img_sd2_ddim_rescale", sd2, ddim2, [1008], dict(guidance_rescale=0.7),
         "SD2 (v_prediction), DDIM, guidance_rescale 0.7: each image's guided prediction is pulled towards "
         "the standard deviation of its text-conditioned one (rescale_noise_cfg)."),
        ("txt2img_sd1_euler_a", sd1, EulerAncestralDiscreteScheduler.from_config(ddim1.config), [1009, 1010],
         dict(num_images_per_prompt=2),
         "SD1, EulerAncestralDiscreteScheduler.from_config(DDIM config) (leading spacing, steps_offset 1): "
         "latents scaled by init_noise_sigma, inputs by 1/sqrt(sigma^2+1), fresh noise every step from each image's "
         "generator."),
        ("txt2img_sd2_euler", sd2, EulerDiscreteScheduler.from_config(ddim2.config), [1011], {},
         "SD2 (v_prediction), EulerDiscreteScheduler.from_config(DDIM config)."),
        ("txt2img_sd1_dpmpp_2m", sd1, DPMSolverMultistepScheduler.from_config(ddim1.config), [1012], {},
         "SD1, DPMSolverMultistepScheduler.from_config(DDIM config): DPM-Solver++ 2M, leading spacing."),
        ("txt2img_sd2_dpmpp_2m_sde", sd2,
         DPMSolverMultistepScheduler.from_config(ddim2.config, algorithm_type="sde-dpmsolver++"), [1013], {},
         "SD2 (v_prediction), DPM-Solver++ 2M SDE: noise drawn at every step."),
    ]
    for name, pipe, scheduler, seeds, overrides, description in cases:
        pipe.scheduler = scheduler
        run_pipeline_case(name, pipe, description, seeds, {**base, **overrides})
    sd1.scheduler, sd2.scheduler = ddim1, ddim2


def img2img_inpaint_cases(sd1, inpaint9):
    base = dict(prompt=PROMPT, negative_prompt="", height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                num_inference_steps=10)
    image = image_tensor()
    mask = torch.from_numpy((np.array(load_test_mask()).astype(np.float32) / 255.0 >= 0.5).astype(np.float32))
    mask = mask[None, None]
    paths = {"image_path": "cases/test_image_64.png"}

    img2img = StableDiffusionImg2ImgPipeline(**sd1.components)
    img2img.set_progress_bar_config(disable=True)
    probe, _ = run_pipeline_case(
        "img2img_sd1_ddim", img2img,
        "StableDiffusionImg2ImgPipeline on tiny-sd1, DDIM eta 0, strength 0.6: timesteps[4:] are run; draws: VAE "
        "posterior sample of the image, then the add_noise noise.",
        [1100], {**base, "image": load_test_image(), "strength": 0.6},
        extra_meta=paths, inputs={"init_image": image})
    assert_equal("img2img preprocessing", probe.encoder_inputs[0], image)

    masked = image * (mask < 0.5)
    probe, _ = run_pipeline_case(
        "inpaint_9ch_ddim", inpaint9,
        "StableDiffusionInpaintPipeline on tiny-inpaint (9-channel UNet), DDIM eta 0, strength 1.0: latents are "
        "pure noise; UNet input = cat(latents, mask_latents, masked_image_latents) on channels; no blending.",
        [1101], {**base, "image": load_test_image(), "mask_image": load_test_mask(), "strength": 1.0},
        extra_meta={**paths, "mask_path": "cases/test_mask_64.png"},
        inputs={"init_image": image, "mask": mask, "masked_image": masked})
    assert_equal("inpaint masked image", probe.encoder_inputs[0], masked)
    nearest = load_case_tensor("inpaint_9ch_ddim", "mask_latents")
    assert_equal("mask latents = mask[::2, ::2]", nearest, mask[:, :, ::2, ::2])

    inpaint4 = StableDiffusionInpaintPipeline(**sd1.components)
    inpaint4.set_progress_bar_config(disable=True)
    probe, _ = run_pipeline_case(
        "inpaint_4ch_ddim", inpaint4,
        "StableDiffusionInpaintPipeline on tiny-sd1 (4-channel UNet), DDIM eta 0, strength 0.75: timesteps[3:]. "
        "After each step: latents = (1-m)*add_noise(image_latents, noise, t_next) + m*latents (no add_noise after "
        "the last step). Draws: image posterior sample, noise, masked-image posterior sample (unused by a "
        "4-channel UNet but still drawn).",
        [1102], {**base, "image": load_test_image(), "mask_image": load_test_mask(), "strength": 0.75},
        extra_meta={**paths, "mask_path": "cases/test_mask_64.png"},
        inputs={"init_image": image, "mask": mask, "masked_image": masked})
    assert_equal("inpaint 4ch image", probe.encoder_inputs[0], image)
    assert_equal("inpaint 4ch masked image", probe.encoder_inputs[1], masked)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def clean_outputs():
    for folder in (SD1, SD2, INPAINT):
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        elif folder.exists():
            shutil.rmtree(folder)
    CASES.mkdir(parents=True, exist_ok=True)
    for path in CASES.iterdir():
        if path.name != "README.md":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_manifest():
    for path in FIXTURES.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o644)
    files = {}
    for path in sorted(FIXTURES.rglob("*")):
        rel = path.relative_to(FIXTURES).as_posix()
        if path.is_symlink():
            files[rel] = {"symlink": os.readlink(path)}
        elif (path.is_file() and rel not in ("cases/MANIFEST.json", "cases/README.md")
              and not any(p.is_symlink() for p in path.parents)):
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    write_json(CASES / "MANIFEST.json", {"versions": VERSIONS, "seeds": SEEDS, "files": files})


def main():
    clean_outputs()
    print("tokenizers")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_folders, reference_bpe = write_tokenizer_folders(Path(tmp))
        toks = check_tokenizers(tokenizer_folders, reference_bpe)

        print("models")
        te1 = build_text_encoder("text_encoder_sd1", **SD1_TEXT)
        te2 = build_text_encoder("text_encoder_sd2", **SD2_TEXT)
        vae1 = build_vae("vae_sd1", **SD1_VAE)
        vae2 = build_vae("vae_sd2", **SD2_VAE)
        unet1 = build_unet("unet_sd1", **SD1_UNET)
        unet2 = build_unet("unet_sd2", **SD2_UNET)
        unet9 = build_unet("unet_inpaint", **dict(SD1_UNET, in_channels=9))
        save_pipeline(SD1, StableDiffusionPipeline, tokenizer_folders["sd1"], unet=unet1, vae=vae1,
                      text_encoder=te1, tokenizer=toks["sd1"], scheduler=DDIMScheduler(**SD15_SCHEDULER))
        save_pipeline(SD2, StableDiffusionPipeline, tokenizer_folders["sd2"], unet=unet2, vae=vae2,
                      text_encoder=te2, tokenizer=toks["sd2"], scheduler=DDIMScheduler(**SD21_SCHEDULER))
        save_pipeline(INPAINT, StableDiffusionInpaintPipeline, tokenizer_folders["sd1"], unet=unet9, vae=vae1,
                      text_encoder=te1, tokenizer=toks["sd1"], scheduler=DDIMScheduler(**SD15_SCHEDULER))
        link_shared_components(INPAINT, SD1)

    # Every reference below comes from the files on disk.
    sd1 = load_pipeline(StableDiffusionPipeline, SD1)
    sd2 = load_pipeline(StableDiffusionPipeline, SD2)
    inpaint9 = load_pipeline(StableDiffusionInpaintPipeline, INPAINT)
    check_reloaded(sd1, unet=unet1, vae=vae1, text_encoder=te1)
    check_reloaded(sd2, unet=unet2, vae=vae2, text_encoder=te2)
    check_reloaded(inpaint9, unet=unet9, vae=vae1, text_encoder=te1)
    assert sd1.text_encoder.dtype == torch.float32 and sd2.tokenizer.pad_token_id == 0
    assert sd1.vae_scale_factor == 2 and sd2.vae_scale_factor == 2
    del te1, te2, vae1, vae2, unet1, unet2, unet9

    print("cases")
    write_test_images()
    case_tokenizer({"sd1": sd1.tokenizer, "sd2": sd2.tokenizer})
    case_rng()
    states1 = case_text_encoder("text_encoder_sd1", sd1)
    states2 = case_text_encoder("text_encoder_sd2", sd2)
    case_vae("vae_sd1", sd1.vae)
    case_vae("vae_sd2", sd2.vae)
    case_unet("unet_sd1", sd1.unet, states1, debug_activations=True)
    case_unet("unet_sd2", sd2.unet, states2, debug_activations=True)
    case_unet("unet_inpaint", inpaint9.unet, states1, debug_activations=False)
    for index, variant in enumerate(SCHEDULER_VARIANTS):
        case_scheduler(index, *variant)
    txt2img_cases(sd1, sd2)
    img2img_inpaint_cases(sd1, inpaint9)
    write_manifest()
    print("done:", FIXTURES)


if __name__ == "__main__":
    main()
