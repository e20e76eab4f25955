#!/usr/bin/env python3
"""LoRA reference fixtures for ldm (tests/lora_parity.rs).

Writes only its own files, tests/fixtures/lora/*.safetensors and tests/fixtures/cases/lora_*.{json,safetensors},
and adds them to cases/MANIFEST.json. Same reference stack as make_fixtures.py plus `pip install peft==<see
VERSIONS in the case files>` (diffusers' LoRA loading needs it); run after make_fixtures.py:

    /tmp/ldm-fixtures-venv/bin/python scripts/make_lora_fixtures.py

Two tiny random LoRAs for tiny-sd1, one per file format, each touching the U-Net (attention projections, the 1x1
conv proj_in, the feed-forward output and a 3x3 resnet conv: "LoCon") and the text encoder (attention and MLP):
  * lora/kohya_sd1.safetensors: kohya-ss / A1111 keys lora_unet_<module with _>.lora_down.weight / .lora_up.weight
    / .alpha and lora_te_text_model_<...>; rank 4, alpha 2 (scale 0.5 x weight);
  * lora/peft_sd1.safetensors: diffusers / PEFT keys unet.<module>.lora_A.weight / .lora_B.weight and
    text_encoder.<module>...; rank 2, lora_alpha 4 in the lora_adapter_metadata header (scale 2 x weight).
Reference: diffusers StableDiffusionPipeline.load_lora_weights(file) + fuse_lora(lora_scale=W), then the
pipeline from a seed; cases record the final latents and the image.
"""

import json
import sys
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

LORAS = mf.FIXTURES / "lora"
VERSIONS = dict(mf.VERSIONS, peft=peft.__version__)

UNET_LINEAR = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
               "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
               "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
               "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"]
UNET_CONV = ["down_blocks.1.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.1.conv2"]
TE = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.2.self_attn.out_proj", "encoder.layers.3.mlp.fc1"]


def module_weights(pipe):
    unet = dict(pipe.unet.named_parameters())
    te = dict(pipe.text_encoder.named_parameters())
    return unet, {k.removeprefix("text_model."): v for k, v in te.items()}


def low_rank(weight, rank, g):
    """(down, up) for a weight [out, in(, kh, kw)]: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]."""
    out_features = weight.shape[0]
    down = torch.randn((rank, *weight.shape[1:]), generator=g) * 0.3
    up = torch.randn((out_features, rank) + ((1, 1) if weight.ndim == 4 else ()), generator=g) * 0.3
    return down, up


def write_kohya(pipe, path):
    g = mf.generator(1600)
    unet, te = module_weights(pipe)
    tensors = {}
    for prefix, modules, weights, te_prefix in (("lora_unet_", UNET_LINEAR + UNET_CONV, unet, ""),
                                                ("lora_te_", TE, te, "text_model_")):
        for module in modules:
            down, up = low_rank(weights[f"{module}.weight"], 4, g)
            name = prefix + te_prefix + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path), metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})


def write_peft(pipe, path):
    g = mf.generator(1601)
    unet, te = module_weights(pipe)
    tensors = {}
    for prefix, modules, weights in (("unet.", UNET_LINEAR + UNET_CONV, unet), ("text_encoder.", TE, te)):
        for module in modules:
            down, up = low_rank(weights[f"{module}.weight"], 2, g)
            tensors[f"{prefix}{module}.lora_A.weight"] = down
            tensors[f"{prefix}{module}.lora_B.weight"] = up
    metadata = {}
    for component, modules in (("unet", UNET_LINEAR + UNET_CONV), ("text_encoder", TE)):
        metadata.update({f"{component}.r": 2, f"{component}.lora_alpha": 4,
                         f"{component}.target_modules": sorted(modules)})
    save_file(tensors, str(path), metadata={"format": "pt",
                                            "lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True)})


def fused_pipeline(files_and_scales):
    pipe = mf.load_pipeline(StableDiffusionPipeline, mf.SD1)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before_te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    for i, (file, scale) in enumerate(files_and_scales):
        pipe.load_lora_weights(str(file), adapter_name=f"a{i}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"a{i}"])
        pipe.unload_lora_weights()
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])]
    changed_te = [k for k, v in pipe.text_encoder.state_dict().items() if not torch.equal(v, before_te[k])]
    assert len(changed) == len(UNET_LINEAR + UNET_CONV), changed
    assert len(changed_te) == len(TE), changed_te
    return pipe


def case(name, files_and_scales, seed, ldm_args, description, ldm_prompt="a photo of a cat"):
    prompt = "a photo of a cat"
    pipe = fused_pipeline(files_and_scales)
    call = dict(prompt=prompt, negative_prompt="", height=mf.SIZE, width=mf.SIZE, guidance_scale=7.5,
                num_inference_steps=10)
    images = pipe(**call, generator=[mf.generator(seed)], output_type="np").images
    latents = pipe(**call, generator=[mf.generator(seed)], output_type="latent").images
    image, image_u8 = mf.numpy_image_tensors(images)
    mf.save_case(name, {"latents_final": latents, "image": image, "image_u8": image_u8},
                 {"description": description, "call": call, "seed": seed, "versions": VERSIONS,
                  "loras": [[f"lora/{Path(f).name}", s] for f, s in files_and_scales], "ldm_args": ldm_args,
                  "ldm_prompt": ldm_prompt})


def update_manifest():
    path = mf.CASES / "MANIFEST.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for file in sorted([*mf.CASES.glob("lora_*"), *LORAS.glob("*")]):
        file.chmod(0o644)
        rel = file.relative_to(mf.FIXTURES).as_posix()
        manifest["files"][rel] = {"bytes": file.stat().st_size, "sha256": mf.sha256(file)}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    mf.write_json(path, manifest)


def main():
    LORAS.mkdir(exist_ok=True)
    base = mf.load_pipeline(StableDiffusionPipeline, mf.SD1)
    kohya, peft_file = LORAS / "kohya_sd1.safetensors", LORAS / "peft_sd1.safetensors"
    write_kohya(base, kohya)
    write_peft(base, peft_file)
    case("lora_kohya_sd1", [(kohya, 0.8)], 1700, ["--lora", "lora/kohya_sd1.safetensors:0.8"],
         "tiny-sd1 + kohya LoRA (rank 4, alpha 2) fused at 0.8 (effective scale 0.4), DDIM 10 steps.")
    case("lora_peft_sd1", [(peft_file, 0.5)], 1701, ["--lora", "lora/peft_sd1.safetensors:0.5"],
         "tiny-sd1 + diffusers/PEFT LoRA (rank 2, lora_alpha 4) fused at 0.5 (effective scale 1.0).")
    case("lora_both_sd1", [(kohya, 1.0), (peft_file, -0.7)], 1702,
         ["--lora", "lora/peft_sd1.safetensors:-0.7", "--lora-dir", "lora"],
         "tiny-sd1 + the kohya LoRA at 1.0 (from the prompt tag <lora:kohya_sd1:1>) and the PEFT one at -0.7, "
         "fused one after the other.", ldm_prompt="a photo of a cat <lora:kohya_sd1:1>")
    update_manifest()
    print("done")


if __name__ == "__main__":
    main()
