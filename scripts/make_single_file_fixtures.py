#!/usr/bin/env python3
"""Single-file (original CompVis / A1111 layout) checkpoint fixtures for ldm (tests/single_file.rs).

Writes only its own files, tests/fixtures/single_file/* and tests/fixtures/cases/single_file_*.{json,safetensors},
and adds them to cases/MANIFEST.json. Same reference stack as make_fixtures.py; run after it:

    /work/pyenv/venv/bin/python scripts/make_single_file_fixtures.py

The tiny diffusers pipelines are rewritten in the original layout by this script's own diffusers -> original key
mapping (the inverse of what diffusers' single_file_utils reads):
  * single_file/sd1_ema.safetensors: tiny-sd1 as `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE,
    attention q/k/v/proj_out as 1x1 convolutions), `cond_stage_model.transformer.text_model.*` (OpenAI CLIP, with
    its `position_ids`), plus a second, perturbed U-Net as EMA weights under flattened `model_ema.<name without
    dots>` keys (and `model_ema.decay`, `model_ema.num_updates`), and `alphas_cumprod`, as full SD 1.x training
    checkpoints hold; U-Net and VAE in float16, as A1111 checkpoints mostly are;
  * single_file/sd2.ckpt: tiny-sd2 as a PyTorch pickle ({"state_dict": ..., "global_step": ...}), text encoder in
    the OpenCLIP layout `cond_stage_model.model.*` (fused `attn.in_proj_weight/bias`, `ln_final`,
    `positional_embedding`, `token_embedding`, `text_projection`) with one extra unused resblock, as SD 2.x files
    carry 24 resblocks for a 23-layer text encoder;
  * single_file/inpaint.safetensors: tiny-inpaint (9-channel conv_in);
  * single_file/code.ckpt: a PyTorch-style zip whose pickle calls posix.system (must never run).
Cases single_file_sd1 (diffusers' default, non-EMA), single_file_sd1_ema (extract_ema=True), single_file_sd1_lora
(+ the kohya LoRA of make_lora_fixtures.py fused at 0.8), single_file_sd2, single_file_inpaint.
Reference: diffusers StableDiffusionPipeline / StableDiffusionInpaintPipeline .from_single_file(file,
config=<tiny folder>, torch_dtype=float32) (extract_ema=True for the EMA case); the script first checks that the
loaded components equal the tiny pipeline's own weights (so the files are original-layout as diffusers reads
them), then records the pipeline runs as make_fixtures.py does.
"""

import json
import pickle
import pickletools
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline  # noqa: E402

OUT = mf.FIXTURES / "single_file"

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def component(folder, name):
    stem = "model" if name == "text_encoder" else "diffusion_pytorch_model"
    return load_file(str(folder / name / f"{stem}.safetensors"))


def config(folder, name):
    return json.loads((folder / name / "config.json").read_text())


def resnet_param(rest):
    module, param = rest.rsplit(".", 1)
    return f"{RESNET[module]}.{param}"


def unet_key(name, cfg):
    """diffusers U-Net name -> original (without the model.diffusion_model. prefix)."""
    module, param = name.rsplit(".", 1)
    if module in UNET_TOP:
        return f"{UNET_TOP[module]}.{param}"
    per_block = cfg["layers_per_block"] + 1
    parts = name.split(".")
    rest = ".".join(parts[4:])
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.<p>
            return f"input_blocks.{1 + block * per_block + per_block - 1}.0.op.{parts[-1]}"
        index = 1 + block * per_block + int(parts[3])
        return f"input_blocks.{index}.0.{resnet_param(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[1]}.{parts[2]}"]
        rest = ".".join(parts[3:])
        return f"middle_block.{index}.{resnet_param(rest) if parts[1] == 'resnets' else rest}"
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            has_attention = cfg["up_block_types"][block].startswith("CrossAttn")
            return f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention else 1}.conv.{parts[-1]}"
        index = block * per_block + int(parts[3])
        return f"output_blocks.{index}.0.{resnet_param(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    raise KeyError(name)


def unet_tensors(weights, cfg, prefix="model.diffusion_model."):
    return {prefix + unet_key(k, cfg): v for k, v in weights.items()}


def vae_key(name, cfg):
    """diffusers VAE name -> original (without first_stage_model.); the second value: reshape to a 1x1 conv."""
    side, rest = name.split(".", 1)
    if side in ("quant_conv", "post_quant_conv"):
        return name, False
    parts = rest.split(".")
    if parts[0] in ("conv_in", "conv_out"):
        return name, False
    if parts[0] == "conv_norm_out":
        return f"{side}.norm_out.{parts[1]}", False
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"{side}.mid.block_{int(parts[2]) + 1}.{'.'.join(parts[3:])}", False
        module, param = ".".join(parts[3:]).rsplit(".", 1)
        return f"{side}.mid.attn_1.{VAE_ATTENTION[module]}.{param}", module != "group_norm" and param == "weight"
    block = int(parts[1])
    if side == "decoder":
        block = len(cfg["up_block_types"]) - 1 - block
    level = "down" if side == "encoder" else "up"
    if parts[2] in ("downsamplers", "upsamplers"):
        sampler = "downsample" if side == "encoder" else "upsample"
        return f"{side}.{level}.{block}.{sampler}.conv.{parts[-1]}", False
    rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
    return f"{side}.{level}.{block}.block.{parts[3]}.{rest}", False


def vae_tensors(weights, cfg):
    out = {}
    for k, v in weights.items():
        key, as_conv = vae_key(k, cfg)
        out["first_stage_model." + key] = v[:, :, None, None] if as_conv else v
    return out


def clip_tensors(weights):
    out = {"cond_stage_model.transformer." + k: v for k, v in weights.items()}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def open_clip_tensors(weights, cfg, g):
    """OpenCLIP layout, q/k/v fused; plus text_projection and one extra resblock (random, unused)."""
    p = "cond_stage_model.model."
    w = {k.removeprefix("text_model."): v for k, v in weights.items()}
    out = {p + "token_embedding.weight": w.pop("embeddings.token_embedding.weight"),
           p + "positional_embedding": w.pop("embeddings.position_embedding.weight"),
           p + "ln_final.weight": w.pop("final_layer_norm.weight"),
           p + "ln_final.bias": w.pop("final_layer_norm.bias")}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    layers = cfg["num_hidden_layers"]
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [w.pop(f"{src}self_attn.{x}_proj.{param}") for x in "qkv"]
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv)
        for name, original in names.items():
            for param in ("weight", "bias"):
                out[f"{dst}{original}.{param}"] = w.pop(f"{src}{name}.{param}")
    assert not w, sorted(w)
    width = cfg["hidden_size"]
    for k in [k for k in out if k.startswith(f"{p}transformer.resblocks.0.")]:
        extra = k.replace("resblocks.0.", f"resblocks.{layers}.")
        out[extra] = (torch.randn(out[k].shape, generator=g) * 0.1).to(out[k].dtype)
    out[p + "text_projection"] = (torch.randn((width, width), generator=g) * 0.1).to(torch.float16)
    return out


def half(tensors):
    return {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}


def ema_tensors(unet, g):
    """Flattened EMA names as CompVis' LitEma stores them: model_ema.<name after 'model.' without dots>."""
    out = {}
    for k, v in unet.items():
        noise = torch.randn(v.shape, generator=g) * (0.2 * float(v.float().std()) if v.ndim >= 2 else 0.2)
        out["model_ema." + "".join(k.split(".")[1:])] = (v.float() + noise).to(v.dtype)
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


def original_layout(folder, text="clip", g=None):
    unet = unet_tensors(component(folder, "unet"), config(folder, "unet"))
    vae = vae_tensors(component(folder, "vae"), config(folder, "vae"))
    te = component(folder, "text_encoder")
    te = clip_tensors(te) if text == "clip" else open_clip_tensors(te, config(folder, "text_encoder"), g)
    return {**half(unet), **half(vae), **te}


def check_loaded(pipe, folder, unet=None):
    """The single-file pipeline's weights equal the tiny pipeline's (f16-rounded where the file is f16)."""
    for name in ("unet", "vae", "text_encoder"):
        expected = unet if (name == "unet" and unet is not None) else component(folder, name)
        loaded = getattr(pipe, name).state_dict()
        expected = {k.removeprefix("text_model.") if name == "text_encoder" and k not in loaded else k: v
                    for k, v in expected.items()}
        assert set(expected) <= set(loaded), (name, sorted(set(expected) - set(loaded))[:5])
        for k, v in expected.items():
            want = v.half().float() if name != "text_encoder" else v.float()
            mf.assert_equal(f"{name}.{k}", loaded[k], want)


def from_single_file(cls, file, folder, **kwargs):
    pipe = cls.from_single_file(str(file), config=str(folder), torch_dtype=torch.float32, local_files_only=True,
                                **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_call():
    return dict(prompt=mf.PROMPT, negative_prompt="", height=mf.SIZE, width=mf.SIZE, guidance_scale=mf.GUIDANCE,
                num_inference_steps=10)


def write_code_pickle(path):
    """A torch-style zip (archive/data.pkl) whose pickle calls posix.system('touch ldm-pickle-ran')."""
    payload = (b"\x80\x02}q\x00X\n\x00\x00\x00state_dictq\x01}q\x02X\x01\x00\x00\x00xq\x03"
               b"cposix\nsystem\nq\x04X\x14\x00\x00\x00touch ldm-pickle-ranq\x05\x85q\x06Rq\x07ss.")
    ops = [op.name for op, _, _ in pickletools.genops(payload)]
    assert "GLOBAL" in ops and "REDUCE" in ops, ops
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in (("archive/data.pkl", payload), ("archive/version", b"3\n")):
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    try:
        torch.load(path, weights_only=True)
        raise AssertionError("torch's safe loader accepted a pickle that calls code")
    except pickle.UnpicklingError:
        pass


def update_manifest():
    path = mf.CASES / "MANIFEST.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for file in sorted([*mf.CASES.glob("single_file_*"), *OUT.glob("*")]):
        file.chmod(0o644)
        rel = file.relative_to(mf.FIXTURES).as_posix()
        manifest["files"][rel] = {"bytes": file.stat().st_size, "sha256": mf.sha256(file)}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    mf.write_json(path, manifest)


def main():
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    g = mf.generator(1800)

    sd1_file = OUT / "sd1_ema.safetensors"
    sd1 = original_layout(mf.SD1)
    ema = ema_tensors({k: v for k, v in sd1.items() if k.startswith("model.diffusion_model.")}, g)
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    save_file({**sd1, **ema, "alphas_cumprod": alphas.float()}, str(sd1_file))
    base = from_single_file(StableDiffusionPipeline, sd1_file, mf.SD1)
    check_loaded(base, mf.SD1)
    mf.run_pipeline_case(
        "single_file_sd1", base,
        "StableDiffusionPipeline.from_single_file(single_file/sd1_ema.safetensors, config=tiny-sd1): diffusers' "
        "default reads the non-EMA model.diffusion_model.* weights; DDIM 10 steps.",
        [1800], base_call(), extra_meta={"checkpoint": "single_file/sd1_ema.safetensors", "config": "tiny-sd1"})
    ema_pipe = from_single_file(StableDiffusionPipeline, sd1_file, mf.SD1, extract_ema=True)
    unet_cfg = config(mf.SD1, "unet")
    ema_diffusers = {}
    for name in component(mf.SD1, "unet"):
        original = "model.diffusion_model." + unet_key(name, unet_cfg)
        ema_diffusers[name] = ema["model_ema." + "".join(original.split(".")[1:])]
    check_loaded(ema_pipe, mf.SD1, unet=ema_diffusers)
    mf.run_pipeline_case(
        "single_file_sd1_ema", ema_pipe,
        "from_single_file(single_file/sd1_ema.safetensors, config=tiny-sd1, extract_ema=True): the U-Net from the "
        "flattened model_ema.* weights; DDIM 10 steps.",
        [1801], base_call(), extra_meta={"checkpoint": "single_file/sd1_ema.safetensors", "config": "tiny-sd1"})

    lora = mf.FIXTURES / "lora" / "kohya_sd1.safetensors"
    lora_pipe = from_single_file(StableDiffusionPipeline, sd1_file, mf.SD1)
    lora_pipe.load_lora_weights(str(lora))
    lora_pipe.fuse_lora(lora_scale=0.8)
    lora_pipe.unload_lora_weights()
    mf.run_pipeline_case(
        "single_file_sd1_lora", lora_pipe,
        "from_single_file(single_file/sd1_ema.safetensors, config=tiny-sd1) + load_lora_weights("
        "lora/kohya_sd1.safetensors) + fuse_lora(lora_scale=0.8); DDIM 10 steps.",
        [1804], base_call(), extra_meta={"checkpoint": "single_file/sd1_ema.safetensors", "config": "tiny-sd1",
                                         "lora": "lora/kohya_sd1.safetensors:0.8"})

    sd2_file = OUT / "sd2.ckpt"
    torch.save({"state_dict": original_layout(mf.SD2, text="open_clip", g=g), "global_step": 110000}, sd2_file)
    sd2 = from_single_file(StableDiffusionPipeline, sd2_file, mf.SD2)
    check_loaded(sd2, mf.SD2)
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    mf.run_pipeline_case(
        "single_file_sd2", sd2,
        "StableDiffusionPipeline.from_single_file(single_file/sd2.ckpt, config=tiny-sd2): OpenCLIP text encoder "
        "with fused q/k/v, v-prediction from tiny-sd2's scheduler config; DDIM 10 steps.",
        [1802], base_call(), extra_meta={"checkpoint": "single_file/sd2.ckpt", "config": "tiny-sd2"})

    inpaint_file = OUT / "inpaint.safetensors"
    save_file(original_layout(mf.INPAINT), str(inpaint_file))
    inpaint = from_single_file(StableDiffusionInpaintPipeline, inpaint_file, mf.INPAINT)
    check_loaded(inpaint, mf.INPAINT)
    assert inpaint.unet.config.in_channels == 9
    mf.run_pipeline_case(
        "single_file_inpaint", inpaint,
        "StableDiffusionInpaintPipeline.from_single_file(single_file/inpaint.safetensors, config=tiny-inpaint): "
        "9-channel U-Net, strength 1.0; DDIM 10 steps.",
        [1803], {**base_call(), "image": mf.load_test_image(), "mask_image": mf.load_test_mask(), "strength": 1.0},
        extra_meta={"checkpoint": "single_file/inpaint.safetensors", "config": "tiny-inpaint",
                    "image_path": "cases/test_image_64.png", "mask_path": "cases/test_mask_64.png"})

    write_code_pickle(OUT / "code.ckpt")
    update_manifest()
    print("done")


if __name__ == "__main__":
    main()
