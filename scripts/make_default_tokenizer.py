#!/usr/bin/env python3
"""Write the default model's tokenizer: OpenAI's CLIP BPE, trimmed to what the emoji captions use.

Usage: python scripts/make_default_tokenizer.py DATA_DIR OUT_DIR
  DATA_DIR: a make_emoji_dataset.py output (train/ and heldout/ metadata.jsonl)
  OUT_DIR:  gets vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (the SD 1.x
            hub layout, pad = <|endoftext|>)
Needs: pip install regex transformers; pip install --no-deps open_clip_torch==3.3.0 (its vocabulary).

Why trim: the full CLIP vocabulary (49,408 tokens) would make the text encoder's embedding table most
of the default model's 32 MB budget, and tokens no caption uses are never trained.

What is kept: the 512 byte-level tokens (so every text still tokenizes, unknown words falling back to
smaller pieces), every token that some caption of the train OR held-out split is tokenized into, and
every intermediate token that BPE builds on the way (the closure under the merges that create them);
the merges among kept tokens, in their original order (= rank). Captions therefore tokenize exactly as
with the full CLIP tokenizer, up to renumbering (checked below with transformers' CLIPTokenizer).
Held-out words are in the vocabulary only so that their prompts tokenize as CLIP would; their images
are never trained on, and a token seen only there keeps its initial embedding.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clip_bpe import ReferenceBpe, byte_to_unicode, clip_vocabulary, write_tokenizer_config  # noqa: E402

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def captions(data_dir):
    texts = []
    for split in ("train", "heldout"):
        with open(data_dir / split / "metadata.jsonl", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    text = json.loads(line)["text"]  # a caption or a list of alternatives
                    texts += text if isinstance(text, list) else [text]
    return texts


def kept_tokens(texts, vocab, merges):
    """Byte tokens, the captions' tokens and their BPE ancestors, in CLIP's id order."""
    parts_of = {"".join(m.split()): tuple(m.split()) for m in merges}
    by_id = {i: t for t, i in vocab.items()}
    reference = ReferenceBpe(vocab, merges)
    pending = {by_id[i] for text in texts for i in reference.encode(text)}
    byte_chars = list(byte_to_unicode().values())
    kept = set(byte_chars) | {c + "</w>" for c in byte_chars} | set(SPECIALS)
    while pending:
        token = pending.pop()
        if token in kept:
            continue
        kept.add(token)
        pending.update(parts_of[token])
    return sorted(kept, key=vocab.__getitem__)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    data_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    vocab, merges = clip_vocabulary()
    texts = captions(data_dir)
    tokens = kept_tokens(texts, vocab, merges)
    trimmed = {t: i for i, t in enumerate(tokens)}
    trimmed_merges = [m for m in merges if "".join(m.split()) in trimmed]
    assert all(a in trimmed and b in trimmed for a, b in (m.split() for m in trimmed_merges))

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(trimmed, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(trimmed_merges) + "\n", encoding="utf-8")
    write_tokenizer_config(out, "<|endoftext|>")
    check(out, texts, vocab, merges, trimmed)
    print(f"{out}: {len(trimmed)} tokens ({len(trimmed_merges)} merges) from {len(texts)} captions")


def check(out, texts, vocab, merges, trimmed):
    """The trimmed tokenizer, loaded by transformers, gives every caption CLIP's tokens renumbered,
    and still round-trips text made of words no caption has."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(out))
    by_id = {i: t for t, i in vocab.items()}
    full = ReferenceBpe(vocab, merges)
    for text in texts:
        expected = [trimmed[by_id[i]] for i in full.encode(text)]
        assert tokenizer(text).input_ids == expected, text
    for text in ("a quokka juggling xylophones", "a zebra reading ünïcode"):
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text.lower(), text


if __name__ == "__main__":
    main()
