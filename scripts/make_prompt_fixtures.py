#!/usr/bin/env python3
"""Reference fixtures for ldm's A1111 prompt handling and CLIP skip (tests/prompt_parity.rs).

Writes only its own files, tests/fixtures/cases/prompt_*.{json,safetensors}, and adds them to
cases/MANIFEST.json; the tiny pipelines and every other case are left as scripts/make_fixtures.py wrote them.
Same reference stack as make_fixtures.py (see its docstring); run after it:

    /tmp/ldm-fixtures-venv/bin/python scripts/make_prompt_fixtures.py

The reference for prompt syntax and long prompts is AUTOMATIC1111's algorithm as its sources describe it
(modules/prompt_parser.py parse_prompt_attention, modules/sd_hijack_clip.py tokenize_line / process_tokens,
modules/sd_emphasis.py EmphasisOriginal), re-implemented here from that description:
  * emphasis syntax: ( ) x1.1, [ ] /1.1, (text:w), escapes \\( \\) \\[ \\] \\\\, a lone backslash dropped,
    brackets left open weight the rest, closers with nothing open are text, equal-weight runs merged,
    BREAK (a whole word) is a marker;
  * each piece tokenized on its own (the pipeline's CLIPTokenizer, no special tokens, no truncation); chunks of 75
    tokens, a full chunk moves the tokens after a comma within its last 20 to the next chunk; BREAK ends a chunk;
    each chunk = bos + tokens + eos padding + eos (77), ids after the first eos set to the pad id;
  * each chunk encoded on its own by the CLIPTextModel (A1111 clip skip N: hidden_states[-N] then the final layer
    norm), multiplied by the token weights, rescaled to the chunk's original mean; chunks concatenated;
  * prompts with fewer chunks than the longest of the batch (e.g. the negative prompt) are padded with the empty
    prompt's chunk (A1111's empty_chunk / pad_cond).
End-to-end cases run diffusers' own pipelines with these embeddings as prompt_embeds / negative_prompt_embeds.

CLIP skip: diffusers' pipelines apply clip_skip to the prompt only and encode the negative prompt from the last
layer; A1111 (and ldm) skip for both. The cfg-1 case runs the pipeline's own clip_skip (no negative prompt is
encoded); the guided case passes negative_prompt_embeds computed with the same skip.
transformers 5's CLIPTextModel has no `text_model` attribute, which diffusers' clip_skip path reads; the script
gives it one pointing at the model's own final_layer_norm (same maths).
"""

import json
import re
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline  # noqa: E402

CHUNK = 75
BACKTRACK = 20

# ---------------------------------------------------------------------------------------------
# A1111's emphasis parser, as described by parse_prompt_attention's docstring and source
# ---------------------------------------------------------------------------------------------
LEXEME = re.compile(r"""
    (?P<escaped>\\[()\[\]\\]) | (?P<lone>\\) | (?P<open>[(\[]) | :(?P<weight>[+-]?[.\d]+)\) |
    (?P<close>[)\]]) | (?P<text>[^\\()\[\]:]+) | (?P<colon>:)""", re.X)
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(prompt):
    """[[text, weight], ...]; BREAK markers are ["BREAK", -1.0]. Raises ValueError on a bad weight in brackets."""
    out, open_round, open_square = [], [], []

    def scale(start, factor):
        for item in out[start:]:
            item[1] *= factor

    def add_text(text):
        for i, part in enumerate(BREAK.split(text)):
            if i:
                out.append(["BREAK", -1.0])
            out.append([part, 1.0])

    for m in LEXEME.finditer(prompt):
        kind, whole = m.lastgroup, m.group(0)
        if kind == "escaped":
            out.append([whole[1], 1.0])
        elif kind == "lone":
            out.append(["", 1.0])
        elif kind == "open":
            (open_round if whole == "(" else open_square).append(len(out))
        elif kind == "weight" and open_round:
            scale(open_round.pop(), float(m.group("weight")))
        elif whole == ")" and open_round:
            scale(open_round.pop(), 1.1)
        elif whole == "]" and open_square:
            scale(open_square.pop(), 1 / 1.1)
        else:
            add_text(whole)
    for start in open_round:
        scale(start, 1.1)
    for start in open_square:
        scale(start, 1 / 1.1)
    if not out:
        out = [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


# ---------------------------------------------------------------------------------------------
# Chunks and embeddings
# ---------------------------------------------------------------------------------------------
def chunks_of(tokenizer, prompt, syntax=True):
    pieces = parse_emphasis(prompt) if syntax else [[prompt, 1.0]]
    tokenized = tokenizer([p[0] for p in pieces], truncation=False, add_special_tokens=False).input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    chunks, ids, weights, comma_at = [], [], [], None

    def close():
        nonlocal ids, weights, comma_at
        row = [bos] + ids + [eos] * (CHUNK - len(ids)) + [eos]
        first_end = row.index(eos)
        row = row[:first_end + 1] + [pad] * (len(row) - first_end - 1)
        chunks.append((row, [1.0] + weights + [1.0] * (CHUNK - len(weights)) + [1.0]))
        ids, weights, comma_at = [], [], None

    for (text, weight), tokens in zip(pieces, tokenized):
        if text == "BREAK" and weight == -1.0:
            close()
            continue
        for token in tokens:
            if token == comma:
                comma_at = len(ids)
            elif comma_at is not None and len(ids) == CHUNK and CHUNK - comma_at <= BACKTRACK:
                keep = comma_at + 1
                moved_ids, moved_weights = ids[keep:], weights[keep:]
                ids, weights = ids[:keep], weights[:keep]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return pieces, chunks


def encode_chunk(text_encoder, ids, weights, clip_skip):
    with torch.no_grad():
        out = text_encoder(torch.tensor([ids]), output_hidden_states=True)
        z = out.last_hidden_state if clip_skip == 1 else text_encoder.final_layer_norm(
            out.hidden_states[-clip_skip])
    z = z[0]
    if all(w == 1.0 for w in weights):
        return z
    original_mean = z.mean()
    z = z * torch.tensor(weights).reshape(-1, 1)
    return z * (original_mean / z.mean())


def embed(pipe, prompts, syntax=True, clip_skip=1):
    """[B, 77*k, D]: every prompt chunked and encoded, padded with the empty chunk to the longest."""
    per_prompt = [chunks_of(pipe.tokenizer, p, syntax)[1] for p in prompts]
    count = max(len(c) for c in per_prompt)
    empty = chunks_of(pipe.tokenizer, "", syntax)[1][0]
    rows = []
    for chunks in per_prompt:
        chunks = chunks + [empty] * (count - len(chunks))
        rows.append(torch.cat([encode_chunk(pipe.text_encoder, ids, w, clip_skip) for ids, w in chunks]))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
LONG = ("masterpiece, best quality, (a red apple:1.3) on a [wooden] table, ((soft morning light)), "
        "highly detailed, sharp focus, 8k, a black cat sleeping beside the fruit bowl, [[blurry background]], "
        "(cinematic composition:0.8), golden hour, warm colours, an old brass lamp, a stack of leather books, "
        "dust in the air, (film grain), a window with rain drops, a small green plant in a clay pot, "
        "a ceramic cup of tea, steam rising slowly, a knitted blanket, a wooden chair, a painting of the sea, "
        "trending on artstation, award winning photograph, (depth of field:1.2), bokeh, 35mm lens, f1.8, "
        "soft shadows, rim light, volumetric light, subsurface scattering, detailed fur, detailed skin of the "
        "apple, water drops on the apple, reflections on the table, a silver spoon, a folded newspaper")
PARSE_PROMPTS = [
    "normal text", "an (important) word", "(unbalanced", "\\(literal\\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "a cat BREAK a dog", "BREAK a dog", "a cat BREAK", "(BREAK)", "aBREAK BREAKb", "x,BREAK,y BREAK BREAK z",
    "a \\ b \\\\ c \\x", "a) b] c:1.5) d: e", "(a:)", "(a:+1.5) [b:-0.5] (c:.5)", "[[a]] ((b)) [(c)]",
    "(ugly:-0.5), (neutral:1)", "caf\u00e9 (na\u00efve:1.2) BREAK\ttabs", "", LONG,
]
BAD_PROMPTS = ["ab (cat:1.2.3)", "(x:.)"]
EMBED_PROMPTS = [
    ("plain", "a photo of a cat", True, 1),
    ("weighted", "a (red:1.3) apple on a [wooden] ((table))", True, 1),
    ("escapes", "a \\(cat\\) with [[a hat]], (sunny day:0.7)", True, 1),
    ("break", "a cat BREAK (a dog:1.4), blue sky", True, 1),
    ("break_first", "BREAK a dog", True, 1),
    ("empty", "", True, 1),
    ("long", LONG, True, 1),
    ("long_literal", LONG, False, 1),
    ("plain_75", " ".join(["cat"] * 75), True, 1),
    ("plain_76", " ".join(["cat"] * 76), True, 1),
    ("weighted_skip2", "a (red:1.3) apple on a [wooden] ((table))", True, 2),
    ("long_skip2", LONG, True, 2),
]


def case_parse():
    rows = [{"prompt": p, "pieces": parse_emphasis(p)} for p in PARSE_PROMPTS]
    errors = []
    for p in BAD_PROMPTS:
        try:
            parse_emphasis(p)
        except ValueError as e:
            errors.append({"prompt": p, "python_error": str(e)})
        else:
            raise AssertionError(f"{p!r} parsed")
    return rows, errors


def case_embeddings(name, pipe):
    tensors, rows = {}, []
    for key, prompt, syntax, skip in EMBED_PROMPTS:
        pieces, chunks = chunks_of(pipe.tokenizer, prompt, syntax)
        tensors[key] = embed(pipe, [prompt], syntax, skip)[0]
        rows.append({"key": key, "prompt": prompt, "syntax": syntax, "clip_skip": skip,
                     "chunks": [{"ids": ids, "weights": w} for ids, w in chunks]})
    # Plain prompts under 76 tokens are exactly what diffusers encodes.
    with torch.no_grad():
        diffusers_plain, _ = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)
        diffusers_75, _ = pipe.encode_prompt(" ".join(["cat"] * 75), "cpu", 1, False)
    mf.assert_equal("plain prompt = diffusers", tensors["plain"], diffusers_plain[0])
    mf.assert_equal("75-token prompt = diffusers", tensors["plain_75"], diffusers_75[0])
    long_chunks = rows[[r["key"] for r in rows].index("long")]["chunks"]
    eos = pipe.tokenizer.eos_token_id
    assert len(long_chunks) >= 2 and long_chunks[0]["ids"].index(eos) < CHUNK + 1, "no comma backtrack happened"
    assert len(pipe.tokenizer(LONG, add_special_tokens=False).input_ids) > 150
    return tensors, rows


def with_text_model(pipe):
    """diffusers' clip_skip path reads text_encoder.text_model.final_layer_norm (transformers 4 layout)."""
    te = pipe.text_encoder
    if not hasattr(te, "text_model"):
        te.text_model = types.SimpleNamespace(final_layer_norm=te.final_layer_norm)
    return pipe


def run_case(name, pipe, description, seed, call, ldm):
    """Runs pipe(**call) from Generator.manual_seed(seed): final latents and the image, plus the ldm command."""
    images = pipe(**call, generator=[mf.generator(seed)], output_type="np").images
    latents = pipe(**call, generator=[mf.generator(seed)], output_type="latent").images
    image, image_u8 = mf.numpy_image_tensors(images)
    tensors = {"latents_final": latents, "image": image, "image_u8": image_u8}
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        if key in call:
            tensors[key] = call[key]
    meta_call = {k: (list(v.shape) if torch.is_tensor(v) else v) for k, v in call.items() if k != "image"}
    mf.save_case(name, tensors, {"description": description, "pipeline": type(pipe).__name__,
                                 "call": meta_call, "seed": seed, "ldm": ldm})


def pipeline_cases(sd1, sd2):
    base = dict(height=mf.SIZE, width=mf.SIZE, num_inference_steps=10)
    negative = "(blurry:1.2), [low quality], watermark"
    pos, neg = embed(sd1, [LONG, negative])
    assert pos.shape[0] == 77 * 3 and neg.shape == pos.shape
    run_case("prompt_a1111_sd1_txt2img", sd1,
             "tiny-sd1, DDIM, a 3-chunk weighted prompt (comma backtracking) and a weighted negative prompt padded "
             "to 3 chunks with the empty chunk; diffusers pipeline with these prompt_embeds/negative_prompt_embeds.",
             1500, dict(base, prompt_embeds=pos[None], negative_prompt_embeds=neg[None], guidance_scale=7.5),
             {"command": "txt2img", "model": "tiny-sd1", "prompt": LONG, "negative_prompt": negative,
              "args": ["--sampler", "ddim", "--steps", "10", "--guidance-scale", "7.5"]})
    prompt2 = "a (photo:1.2) of a cat BREAK [[studio light]], \\(sharp\\)"
    pos, neg = embed(sd2, [prompt2, ""])
    run_case("prompt_a1111_sd2_img2img", StableDiffusionImg2ImgPipeline(**sd2.components),
             "tiny-sd2 img2img (strength 0.6), DDIM, BREAK + weights + escapes; 2 chunks, the empty negative padded.",
             1501, dict(base, image=mf.load_test_image(), strength=0.6, prompt_embeds=pos[None],
                        negative_prompt_embeds=neg[None], guidance_scale=7.5),
             {"command": "img2img", "model": "tiny-sd2", "prompt": prompt2, "negative_prompt": "",
              "image": "cases/test_image_64.png",
              "args": ["--sampler", "ddim", "--steps", "10", "--guidance-scale", "7.5", "--strength", "0.6"]})
    cat = "a photo of a cat"
    run_case("prompt_clip_skip_sd1_cfg1", with_text_model(sd1),
             "tiny-sd1, DDIM, guidance 1 (no negative encoded), the pipeline's own clip_skip=1 (A1111 clip skip 2).",
             1502, dict(base, prompt=cat, guidance_scale=1.0, clip_skip=1),
             {"command": "txt2img", "model": "tiny-sd1", "prompt": cat, "negative_prompt": "",
              "args": ["--sampler", "ddim", "--steps", "10", "--guidance-scale", "1", "--clip-skip", "2"]})
    negative = "blurry"
    neg = embed(sd2, [negative], clip_skip=2)
    run_case("prompt_clip_skip_sd2_cfg", with_text_model(sd2),
             "tiny-sd2, DDIM, guidance 7.5, the pipeline's clip_skip=1 for the prompt and negative_prompt_embeds "
             "encoded with the same skip (A1111 clip skip 2 for both; diffusers alone skips only the prompt).",
             1503, dict(base, prompt=cat, negative_prompt_embeds=neg, guidance_scale=7.5, clip_skip=1),
             {"command": "txt2img", "model": "tiny-sd2", "prompt": cat, "negative_prompt": negative,
              "args": ["--sampler", "ddim", "--steps", "10", "--guidance-scale", "7.5", "--clip-skip", "2"]})


def update_manifest():
    path = mf.CASES / "MANIFEST.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for file in sorted(mf.CASES.glob("prompt_*")):
        file.chmod(0o644)
        rel = file.relative_to(mf.FIXTURES).as_posix()
        manifest["files"][rel] = {"bytes": file.stat().st_size, "sha256": mf.sha256(file)}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    mf.write_json(path, manifest)


def main():
    sd1 = mf.load_pipeline(StableDiffusionPipeline, mf.SD1)
    sd2 = mf.load_pipeline(StableDiffusionPipeline, mf.SD2)
    rows, errors = case_parse()
    tokenizers = {}
    for name, pipe in (("sd1", sd1), ("sd2", sd2)):
        tensors, chunk_rows = case_embeddings(name, pipe)
        mf.save_case(f"prompt_embeddings_{name}", tensors, {
            "description": "A1111-algorithm embeddings [77*k, D] of single prompts (see the script's docstring); "
                           "rows give each prompt's chunks (token ids after the pad fix, per-token weights).",
            "rows": chunk_rows})
        tokenizers[name] = chunk_rows
    mf.write_json(mf.CASES / "prompt_syntax.json", {
        "case": "prompt_syntax",
        "description": "A1111 parse_prompt_attention re-implemented from its description: [[text, weight], ...], "
                       "BREAK = ['BREAK', -1.0]. errors: prompts whose bracketed weight is not a number.",
        "rows": rows, "errors": errors, "versions": mf.VERSIONS})
    pipeline_cases(sd1, sd2)
    update_manifest()
    print("done")


if __name__ == "__main__":
    main()
