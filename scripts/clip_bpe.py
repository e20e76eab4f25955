"""The real OpenAI CLIP BPE vocabulary (from open_clip's bpe_simple_vocab_16e6.txt.gz), an independent
pure-Python CLIP BPE, and the SD-style tokenizer config files. Shared by make_fixtures.py and
make_default_tokenizer.py."""
import gzip
import importlib.util
import json
import sys
import unicodedata
from pathlib import Path

import regex


def clip_bpe_file():
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (needs torchvision)
    for location in (spec.submodule_search_locations if spec else []):
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.exists():
            return path
    sys.exit("bpe_simple_vocab_16e6.txt.gz not found: pip install --no-deps open_clip_torch==3.3.0")


def byte_to_unicode():
    """GPT-2/CLIP byte -> printable unicode character table (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(others))]
    return dict(zip(printable + others, map(chr, codes)))


def clip_vocabulary():
    """(vocab dict, merges list) exactly as OpenAI's SimpleTokenizer builds them (49408 entries)."""
    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a version header; 48894 merges
    byte_chars = list(byte_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408 and len(merges) == 48894
    return vocab, merges


class ReferenceBpe:
    """Independent pure-Python CLIP BPE with transformers' text normalisation (NFC, whitespace runs -> one space,
    lowercase; no ftfy / html unescape, which only the original OpenAI code applies). `added` are tokens that
    transformers registers as special added tokens and matches before BPE (the SD2 pad token "!" is one: a "!"
    in the text becomes id 0, not "!</w>" = 256). Used to cross-check the tokenizer files."""

    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    )

    def __init__(self, vocab, merges):
        self.vocab = vocab
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.bytes = byte_to_unicode()

    def word(self, piece):
        symbols = [self.bytes[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self.vocab[s] for s in symbols]

    def encode(self, text, added=()):
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
        segments = regex.split("(" + "|".join(map(regex.escape, added)) + ")", text) if added else [text]
        ids = [self.vocab["<|startoftext|>"]]
        for segment in segments:
            if segment in added:
                ids.append(self.vocab[segment])
            else:
                ids += [i for piece in self.PATTERN.findall(segment) for i in self.word(piece)]
        return ids + [self.vocab["<|endoftext|>"]]


def added_token(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_tokenizer_config(folder, pad_token):
    """tokenizer_config.json + special_tokens_map.json in the form of the SD1.5 / SD2.1 hub repos."""
    special = {"bos_token": added_token("<|startoftext|>"), "eos_token": added_token("<|endoftext|>"),
               "pad_token": pad_token, "unk_token": added_token("<|endoftext|>")}
    config = {"add_prefix_space": False, **special, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    write_small_json(folder / "tokenizer_config.json", config)
    write_small_json(folder / "special_tokens_map.json", {k: ({kk: vv for kk, vv in v.items() if kk != "__type"}
                                                        if isinstance(v, dict) else v) for k, v in special.items()})


def write_small_json(path, obj):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
