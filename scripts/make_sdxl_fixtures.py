#!/usr/bin/env python3
"""Generate the SDXL parity fixtures of ldm under tests/fixtures/ (run after scripts/make_fixtures.py).

Same reference stack and rules as make_fixtures.py (whose helpers this script imports): CPU, float32, one torch
thread, seeded random tiny models, nothing from a model hub, every reference computed from the files on disk.

    /work/pyenv/venv/bin/python scripts/make_sdxl_fixtures.py

Output:
    tiny-sdxl/        StableDiffusionXLPipeline: text_encoder + tokenizer are tiny-sd1's (CLIPTextModel, pads with
                      <|endoftext|>), tokenizer_2 is tiny-sd2's (pads with "!"), text_encoder_2 a new
                      CLIPTextModelWithProjection (hidden 16, projection 24, legacy eos_token_id 2 as in SDXL's
                      config); U-Net with addition_embed_type "text_time", a per-block transformer_layers_per_block
                      list and nested reverse_transformer_layers_per_block, linear projections, a first block
                      without attention; a new tiny VAE (scaling 0.13025, force_upcast); EulerDiscreteScheduler
                      with SDXL base's config; force_zeros_for_empty_prompt true.
    tiny-sdxl-turbo/  the same components (symlinks) with SDXL-Turbo's scheduler (EulerAncestral, trailing).
    tiny-sdxl-inpaint/ StableDiffusionXLInpaintPipeline: a 9-channel U-Net (otherwise tiny-sdxl's config), the
                      other components tiny-sdxl's (symlinks).
    cases/sdxl_*.safetensors + .json: end-to-end runs (final latents, image, first U-Net call's conditioning).
"""

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets torch threads, offline env, logging)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

FIXTURES = mf.FIXTURES
SDXL, TURBO, CASES = FIXTURES / "tiny-sdxl", FIXTURES / "tiny-sdxl-turbo", mf.CASES
INPAINT = FIXTURES / "tiny-sdxl-inpaint"
SEEDS = {"text_encoder_2": (110, 210), "vae": (111, 211), "unet": (112, 212), "unet_inpaint": (113, 213)}
SIZE = mf.SIZE  # 64 px, latents 32x32 (vae factor 2)

# SDXL base's scheduler_config.json, keys of other schedulers included (DDIM built from it does not clip).
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
                      interpolation_type="linear", use_karras_sigmas=False, clip_sample=False,
                      set_alpha_to_one=False, sample_max_value=1.0, skip_prk_steps=True, trained_betas=None)
TURBO_SCHEDULER = dict(SDXL_SCHEDULER, timestep_spacing="trailing")

TEXT_2 = dict(hidden_size=16, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, projection_dim=24,
              hidden_act="gelu")
UNET = dict(in_channels=4, out_channels=4, sample_size=SIZE // 2, flip_sin_to_cos=True, freq_shift=0,
            block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 1, 2], reverse_transformer_layers_per_block=[[2, 1], [1, 2], [1, 1]],
            attention_head_dim=[2, 4, 4], cross_attention_dim=32 + 16, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16, scaling_factor=0.13025,
           force_upcast=True)


def build_text_encoder_2():
    init, noise = SEEDS["text_encoder_2"]
    torch.manual_seed(init)
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
                         eos_token_id=2, pad_token_id=1, **TEXT_2)
    model = CLIPTextModelWithProjection(cfg).eval()
    mf.perturb(model, noise)
    return model.to(torch.float16)


def build(cls, key, **config):
    init, noise = SEEDS[key]
    torch.manual_seed(init)
    model = cls(**config).eval()
    mf.perturb(model, noise)
    return model.to(torch.float16)  # stored in f16; the f32 references use the f16-rounded values


def link(folder, component, target):
    path = folder / component
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else None
    path.symlink_to(target, target_is_directory=True)


def save_pipelines():
    for folder in (SDXL, TURBO, INPAINT):
        if folder.exists():
            shutil.rmtree(folder)
    te1 = CLIPTextModel.from_pretrained(str(mf.SD1 / "text_encoder"), dtype=torch.float16)
    pipe = StableDiffusionXLPipeline(
        vae=build(AutoencoderKL, "vae", in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **VAE),
        text_encoder=te1, text_encoder_2=build_text_encoder_2(),
        tokenizer=CLIPTokenizer.from_pretrained(str(mf.SD1 / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(mf.SD2 / "tokenizer")),
        unet=build(UNet2DConditionModel, "unet", **UNET), scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(str(SDXL), safe_serialization=True)
    # Shared with the SD fixtures: the same tensors, kept once.
    link(SDXL, "text_encoder", "../tiny-sd1/text_encoder")
    link(SDXL, "tokenizer", "../tiny-sd1/tokenizer")
    link(SDXL, "tokenizer_2", "../tiny-sd2/tokenizer")
    shared = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
    index = json.loads((SDXL / "model_index.json").read_text())
    TURBO.mkdir()
    for component in shared + ("unet",):
        link(TURBO, component, f"../tiny-sdxl/{component}")
    (TURBO / "scheduler").mkdir()
    turbo_scheduler = EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER)
    turbo_scheduler.save_config(str(TURBO / "scheduler"))
    turbo_index = dict(index, scheduler=["diffusers", "EulerAncestralDiscreteScheduler"])
    (TURBO / "model_index.json").write_text(json.dumps(turbo_index, indent=2, sort_keys=True) + "\n")
    INPAINT.mkdir()
    for component in shared + ("scheduler",):
        link(INPAINT, component, f"../tiny-sdxl/{component}")
    build(UNet2DConditionModel, "unet_inpaint", **dict(UNET, in_channels=9)).save_pretrained(
        str(INPAINT / "unet"), safe_serialization=True)
    inpaint_index = dict(index, _class_name="StableDiffusionXLInpaintPipeline", requires_aesthetics_score=False)
    (INPAINT / "model_index.json").write_text(json.dumps(inpaint_index, indent=2, sort_keys=True) + "\n")


def load(cls, folder):
    pipe = cls.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(name, pipe, description, seeds, call, extra_meta=None):
    """pipe(**call) with [Generator.manual_seed(s) for s in seeds], output_type 'np'; records the final latents
    (callback at the last step), the image and the first U-Net call's conditioning."""
    generators = [mf.generator(s) for s in seeds]
    first, steps = {}, []

    def unet_hook(module, args, kwargs):
        if not first:
            first.update(encoder_hidden_states=kwargs["encoder_hidden_states"].clone(),
                         text_embeds=kwargs["added_cond_kwargs"]["text_embeds"].clone(),
                         time_ids=kwargs["added_cond_kwargs"]["time_ids"].clone())

    def callback(pipe, i, t, tensors):
        steps.append(tensors["latents"].clone())
        return {}

    hook = pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)
    with mf.DrawRecorder(generators) as draws:
        images = pipe(**call, generator=generators, output_type="np", callback_on_step_end=callback).images
    hook.remove()
    draws.replay_from_seeds(seeds)
    image, _ = mf.numpy_image_tensors(images)
    tensors = {"latents_final": steps[-1], "image": image, **first}
    call_meta = {k: v for k, v in call.items() if k not in ("image", "mask_image")}
    meta = {"description": description, "pipeline": type(pipe).__name__,
            "call": {**call_meta, "generator": f"[torch.Generator('cpu').manual_seed(s) for s in {seeds}]"},
            "seeds": seeds, "scheduler_class": type(pipe.scheduler).__name__,
            "scheduler_config": mf.scheduler_config(pipe.scheduler), "unet_calls": len(steps),
            "random_draws": draws.summary(), **(extra_meta or {})}
    mf.save_case(name, tensors, meta)


def cases(sdxl, turbo, inpaint9):
    base = dict(prompt=mf.PROMPT, height=SIZE, width=SIZE, guidance_scale=5.0, num_inference_steps=4)
    image = {"image_path": "cases/test_image_64.png"}
    ddim = DDIMScheduler.from_config(sdxl.scheduler.config)
    sdxl.scheduler = ddim
    run_case("sdxl_txt2img_ddim", sdxl,
             "tiny-sdxl, DDIM, no negative prompt: force_zeros_for_empty_prompt makes the negative embeddings and "
             "pooled embeddings zeros; add_time_ids (64, 64, 0, 0, 64, 64).", [2000], base)
    run_case("sdxl_txt2img_ddim_clip_skip", sdxl,
             "tiny-sdxl, DDIM, clip_skip 1: both encoders' hidden_states[-3] (A1111's clip skip 2); no negative "
             "prompt (zeros), since diffusers reads a negative prompt at hidden_states[-2] whatever clip_skip.",
             [2008], dict(base, clip_skip=1))
    sdxl.scheduler = EulerAncestralDiscreteScheduler.from_config(ddim.config)
    run_case("sdxl_txt2img_euler_a", sdxl,
             "tiny-sdxl, Euler a, a real negative prompt (encoded by both encoders), two images with one generator "
             "each.", [2001, 2002], dict(base, negative_prompt=mf.NEGATIVE_REAL, num_images_per_prompt=2))
    sdxl.scheduler = DPMSolverMultistepScheduler.from_config(ddim.config)
    run_case("sdxl_txt2img_dpmpp_2m_microcond", sdxl,
             "tiny-sdxl, DPM++ 2M, micro-conditioning: original_size (96, 128) (height, width), crops_coords_top_left "
             "(8, 16) (top, left), target_size (48, 80), guidance_rescale 0.7.", [2003],
             dict(base, original_size=(96, 128), crops_coords_top_left=(8, 16), target_size=(48, 80),
                  guidance_rescale=0.7))
    img2img = StableDiffusionXLImg2ImgPipeline(**sdxl.components, requires_aesthetics_score=False,
                                               force_zeros_for_empty_prompt=True, add_watermarker=False)
    img2img.scheduler = ddim
    img2img.set_progress_bar_config(disable=True)
    run_case("sdxl_img2img_ddim", img2img,
             "StableDiffusionXLImg2ImgPipeline on tiny-sdxl, DDIM, strength 0.6 (timesteps[2:] of 5), "
             "requires_aesthetics_score false.", [2004],
             dict(base, num_inference_steps=5, image=mf.load_test_image(), strength=0.6), image)
    inpaint = StableDiffusionXLInpaintPipeline(**sdxl.components, requires_aesthetics_score=False,
                                               force_zeros_for_empty_prompt=True, add_watermarker=False)
    inpaint.scheduler = ddim
    inpaint.set_progress_bar_config(disable=True)
    run_case("sdxl_inpaint_ddim", inpaint,
             "StableDiffusionXLInpaintPipeline on tiny-sdxl (4-channel U-Net: blending), DDIM, strength 0.75.",
             [2005], dict(base, image=mf.load_test_image(), mask_image=mf.load_test_mask(), strength=0.75),
             {**image, "mask_path": "cases/test_mask_64.png"})
    inpaint9.scheduler = ddim
    run_case("sdxl_inpaint_9ch_ddim", inpaint9,
             "StableDiffusionXLInpaintPipeline on tiny-sdxl-inpaint (9-channel U-Net: mask and masked-image "
             "latents as input channels), DDIM, strength 1.0 (pure noise, the image is not encoded).",
             [2007], dict(base, image=mf.load_test_image(), mask_image=mf.load_test_mask(), strength=1.0),
             {**image, "mask_path": "cases/test_mask_64.png"})
    run_case("sdxl_turbo_1step", turbo,
             "tiny-sdxl-turbo: EulerAncestral with trailing spacing, one step, guidance_scale 0 (no unconditional "
             "pass).", [2006], dict(base, guidance_scale=0.0, num_inference_steps=1))
    sdxl.scheduler = EulerDiscreteScheduler.from_config(ddim.config)


def main():
    mf.DRAWING_MODULES += [f"diffusers.pipelines.stable_diffusion_xl.{m}" for m in (
        "pipeline_stable_diffusion_xl", "pipeline_stable_diffusion_xl_img2img", "pipeline_stable_diffusion_xl_inpaint")]
    for path in CASES.glob("sdxl_*"):
        path.unlink()
    save_pipelines()
    sdxl, turbo = load(StableDiffusionXLPipeline, SDXL), load(StableDiffusionXLPipeline, TURBO)
    inpaint9 = load(StableDiffusionXLInpaintPipeline, INPAINT)
    assert inpaint9.unet.config.in_channels == 9
    assert sdxl.tokenizer.pad_token_id == 49407 and sdxl.tokenizer_2.pad_token_id == 0
    assert sdxl.text_encoder_2.config.eos_token_id == 2 and sdxl.vae_scale_factor == 2
    assert list(sdxl.unet.config.transformer_layers_per_block) == [1, 1, 2]
    cases(sdxl, turbo, inpaint9)
    mf.write_manifest()
    print("done")


if __name__ == "__main__":
    main()
