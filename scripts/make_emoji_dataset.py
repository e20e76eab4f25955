#!/usr/bin/env python3
"""Build the captioned emoji data set that the embedded default model is trained on.

Usage (Python 3.11+ with Pillow; `--fluent` also needs `pip install cairosvg`
and the system libcairo):

    python3 scripts/make_emoji_dataset.py OUT_DIR [--size 32|64] [--flags generic|all] [--fluent]

Needs `npm` on PATH (only `npm pack` is used: it downloads a package tarball
from the npm registry, checks its integrity and writes the .tgz; nothing is
installed and no package script runs).  The tarballs are cached in
OUT_DIR/.packages (or --cache DIR) and reused when they are already there, so a
second run works offline.  OUT_DIR/train and OUT_DIR/heldout are replaced on
every run; the result is byte-for-byte the same for the same options.

Sources (exact versions):
  * emoji-datasource-twitter@16.0.0  Twemoji images (CC-BY 4.0; data MIT)
  * emoji-datasource-google@16.0.0   Noto Emoji images (Apache-2.0; data MIT)
  * unicode-emoji-json@0.9.0         official Unicode (CLDR) emoji names (MIT)
  * @iconify-json/fluent-emoji-flat@1.2.6  Fluent Emoji Flat SVGs (MIT), only with --fluent
OpenMoji is deliberately not used (CC BY-SA: share-alike would reach the weights).

Output (Hugging Face `imagefolder` layout):
  OUT_DIR/train/*.png + metadata.jsonl
  OUT_DIR/heldout/*.png + metadata.jsonl
  OUT_DIR/README.md, OUT_DIR/LICENSES/, OUT_DIR/preview.png (contact sheet)
Each metadata line: {"file_name", "text", "category", "subcategory", "style",
"name", "unified"}; "text" lists two alternative captions, the name with its
style ("a black cat, twemoji style") and the bare name ("a black cat"): the
trainer picks one at random each time (as diffusers' train_text_to_image.py
does with a list), so a prompt without a style is on the training
distribution too.  Images are RGB, alpha-composited on a WHITE background at
the source resolution (64 px) and then, for --size 32, resized with Lanczos.
File names are "<unified code, lower case>-<style>.png".

Images come from the 64 px "sheets-clean" sprite sheet of each package (one
PNG per style, cropped in a 66 px grid: a cell holds a 64x64 image plus a 1 px
border); the clean sheets hold only that vendor's own art, with no fallbacks.

Captions: "<description>, <style> style", style being twemoji, noto or fluent,
e.g. "a green apple, twemoji style", "a grinning face with smiling eyes, noto
style", "a pair of jeans, twemoji style", "the flag of Japan, noto style".
The description is built from the official CLDR short name (the name Unicode's
emoji-test.txt uses), not from emoji-datasource's `name`, which is the old
Unicode *character* name and is often wrong for the picture ("HEAVY BLACK
HEART" for the red heart, "BLACK RIGHTWARDS ARROW" for a blue arrow,
"WHITE SMILING FACE" for a yellow face).  The CLDR name is turned into a
short noun phrase: natural lower case with proper nouns and initialisms kept
("Santa Claus", "an SOS button"), an article chosen by the first sound
("an hourglass", "a unicorn", "an x-ray", "a one-piece swimsuit"), none for
plurals and mass nouns ("two hearts", "popcorn"), "a pair of" for pair nouns,
articles inside the phrase where CLDR drops them ("a person taking a bath"),
"sign"/"symbol" added where the bare name is not a thing ("a no smoking sign",
"a plus sign"), "a clock showing three o'clock", "the Aries zodiac sign",
"a family of a man, a woman and a boy", "the flag of the United Kingdom", and
a short list of hand-written descriptions where the CLDR name does not name
what is drawn ("cooking" -> "a frying pan with an egg").

Decisions (and why):
  * Skin-tone variants are DROPPED; only the default (yellow / neutral) image
    of each emoji is used.  The 323 emoji with skin tones have 1,875 variant
    images per style: keeping them would make "People & Body" about 60% of
    the data, with five recolourings of one drawing per name; their captions
    would differ only by "medium-dark skin tone".  Gendered variants (person /
    man / woman X) are different drawings with different names and are KEPT.
  * Country and subdivision flags (262) are DROPPED by default (--flags
    generic); the 8 generic flags (chequered, pirate, rainbow, white, ...) are
    kept.  Measured, not assumed: the flags are not illegible (at 32 px they
    render clearly and their nearest-neighbour pixel distance is about that of
    other emoji), but (1) their captions are place names that carry no visual
    meaning, so a model can only memorise them and a held-out flag can never
    be generated from its name; (2) they would be 14% of the data, all the
    same rectangle; (3) at least 10 pairs are pixel-identical under
    different names (France / St. Martin / Clipperton Island, Norway /
    Svalbard & Jan Mayen / Bouvet Island, United States / U.S. Outlying
    Islands, Spain / Ceuta & Melilla, ...), which is contradictory
    supervision.  --flags all keeps them, captioned "the flag of X".
  * The "Component" category (the five bare skin-tone swatches) is dropped.
  * Pixel-identical pictures under different names within one style are
    kept once (one caption per picture), under the least gendered name, then
    the oldest emoji, then the shortest name.  Measured: Twemoji 16 draws all 25
    gendered family emoji ("family: man, woman, boy", ...) as the same four
    neutral silhouettes as "family" / "family: adult, adult, child" / ...,
    so 26 Twemoji images go; in Noto 5 do.  No other name pairs collide.

Split: fixed, never random.  A NAME is held out when
    int(sha256("ldm-emoji-split-v1:" + unified).hexdigest()[:8], 16) % 100 < 10
where `unified` is emoji-datasource's upper-case code (e.g. "1F34F",
"1F9D1-200D-1F373").  About 10% of names are held out; every style of a
held-out name goes to heldout/, nothing of it to train/.  The split does not
depend on --size, --flags or --fluent (a name's side never changes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

SPLIT_SALT = "ldm-emoji-split-v1:"
HELDOUT_PERCENT = 10

DS_TWITTER = ("emoji-datasource-twitter", "16.0.0")
DS_GOOGLE = ("emoji-datasource-google", "16.0.0")
NAMES_PKG = ("unicode-emoji-json", "0.9.0")
FLUENT_PKG = ("@iconify-json/fluent-emoji-flat", "1.2.6")

# style name -> (package, sheet path inside the package)
SHEET_STYLES = {
    "twemoji": (DS_TWITTER, "package/img/twitter/sheets-clean/64.png"),
    "noto": (DS_GOOGLE, "package/img/google/sheets-clean/64.png"),
}
SHEET_CELL = 66  # 64 px image + 1 px border on each side
SRC_PX = 64

TWEMOJI_ATTRIBUTION = (
    "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0, "
    "https://creativecommons.org/licenses/by/4.0/"
)
NOTO_NOTE = (
    "Noto Emoji graphics by Google LLC, licensed under the Apache License, "
    "Version 2.0, https://www.apache.org/licenses/LICENSE-2.0"
)
FLUENT_NOTE = (
    "Fluent Emoji graphics, Copyright (c) Microsoft Corporation, MIT License, "
    "https://github.com/microsoft/fluentui-emoji"
)
MIT_TEXT = """Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


# --------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------

def tgz_name(pkg: tuple[str, str]) -> str:
    name, version = pkg
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def npm_pack(pkg: tuple[str, str], cache: Path) -> Path:
    """`npm pack name@version` into the cache unless the tarball is already there."""
    target = cache / tgz_name(pkg)
    if target.is_file() and target.stat().st_size > 0:
        return target
    if shutil.which("npm") is None:
        sys.exit("error: npm is not on PATH (needed once to fetch %s@%s)" % pkg)
    cache.mkdir(parents=True, exist_ok=True)
    spec = "%s@%s" % pkg
    print(f"fetching {spec} with npm pack ...", flush=True)
    subprocess.run(
        ["npm", "pack", spec, "--pack-destination", str(cache), "--silent"],
        check=True, stdout=subprocess.DEVNULL,
    )
    if not target.is_file():
        sys.exit(f"error: npm pack did not produce {target}")
    return target


def extract(tgz: Path, members: list[str], dest: Path) -> dict[str, Path]:
    """Extract only `members` of a tarball into dest (skip those already there)."""
    out = {m: dest / m for m in members}
    missing = {m for m, p in out.items() if not p.is_file()}
    if missing:
        with tarfile.open(tgz, "r:gz") as tf:
            for ti in tf:
                if ti.name in missing and ti.isfile():
                    data = tf.extractfile(ti).read()
                    out[ti.name].parent.mkdir(parents=True, exist_ok=True)
                    tmp = out[ti.name].with_suffix(out[ti.name].suffix + ".part")
                    tmp.write_bytes(data)
                    tmp.replace(out[ti.name])
                    missing.discard(ti.name)
        if missing:
            sys.exit(f"error: {tgz.name} lacks {sorted(missing)}")
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------

# Hand-written descriptions where the CLDR name does not describe the picture
# or cannot take an article.  Keys are CLDR names (after quote normalisation).
OVERRIDES = {
    "rolling on the floor laughing": "a face rolling on the floor laughing",
    "star-struck": "a star-struck face",
    "hundred points": "a hundred points symbol",
    "collision": "a collision symbol",
    "dizzy": "a dizzy symbol",
    "dashing away": "a dashing away symbol",
    "ZZZ": "a ZZZ sleeping symbol",
    "heart exclamation": "a heart exclamation mark",
    "index pointing up": "an index finger pointing up",
    "index pointing at the viewer": "an index finger pointing at the viewer",
    "breast-feeding": "a woman breast-feeding a baby",
    "horse racing": "a jockey riding a racehorse",
    "person in lotus position": "a person in the lotus position",
    "man in lotus position": "a man in the lotus position",
    "woman in lotus position": "a woman in the lotus position",
    "woman and man holding hands": "a woman and a man holding hands",
    "kiss": "a couple kissing",
    "couple with heart": "a couple with a heart",
    "family": "a family",
    "leaf fluttering in wind": "a leaf fluttering in the wind",
    "herb": "a sprig of herbs",
    "leafy green": "leafy greens",
    "garlic": "a garlic bulb",
    "bread": "a loaf of bread",
    "baguette bread": "a baguette",
    "meat on bone": "a piece of meat on the bone",
    "cooking": "a frying pan with an egg",
    "salt": "a salt shaker",
    "canned food": "a can of food",
    "cooked rice": "a bowl of cooked rice",
    "curry rice": "a plate of curry rice",
    "spaghetti": "a plate of spaghetti",
    "sake": "a bottle of sake",
    "mate": "a cup of mate",
    "ice": "an ice cube",
    "pouring liquid": "a glass pouring liquid",
    "globe showing Europe-Africa": "a globe showing Europe and Africa",
    "globe showing Americas": "a globe showing the Americas",
    "globe showing Asia-Australia": "a globe showing Asia and Australia",
    "mount fuji": "Mount Fuji",
    "camping": "a tent at a campsite",
    "building construction": "a building under construction",
    "wedding": "a wedding chapel",
    "Tokyo tower": "the Tokyo Tower",
    "Statue of Liberty": "the Statue of Liberty",
    "kaaba": "the Kaaba",
    "foggy": "a foggy city",
    "metro": "a metro train",
    "light rail": "a light rail train",
    "construction": "a construction barrier",
    "umbrella on ground": "an umbrella on the ground",
    "hourglass done": "an hourglass with the sand run out",
    "hourglass not done": "an hourglass with sand running",
    "milky way": "the Milky Way",
    "high voltage": "a high voltage sign",
    "sun": "the sun",
    "tennis": "a tennis ball",
    "bowling": "a bowling ball and pins",
    "cricket game": "a cricket bat and ball",
    "field hockey": "a field hockey stick and ball",
    "ice hockey": "an ice hockey stick and puck",
    "lacrosse": "a lacrosse stick and ball",
    "ping pong": "a ping pong paddle and ball",
    "badminton": "a badminton racket and shuttlecock",
    "video game": "a video game controller",
    "joker": "a joker playing card",
    "mahjong red dragon": "a mahjong red dragon tile",
    "performing arts": "performing arts masks",
    "thread": "a spool of thread",
    "yarn": "a ball of yarn",
    "headphone": "a pair of headphones",
    "locked": "a locked padlock",
    "unlocked": "an unlocked padlock",
    "locked with pen": "a padlock with a fountain pen",
    "locked with key": "a padlock with a key",
    "soap": "a bar of soap",
    "moai": "a moai statue",
    "dna": "a DNA double helix",
    "multiply": "a multiplication sign",
    "plus": "a plus sign",
    "minus": "a minus sign",
    "divide": "a division sign",
    "infinity": "an infinity symbol",
    "copyright": "a copyright sign",
    "registered": "a registered sign",
    "trade mark": "a trade mark sign",
    "information": "an information symbol",
    "currency exchange": "a currency exchange symbol",
    "om": "an om symbol",
    "yin yang": "a yin yang symbol",
    "khanda": "a khanda symbol",
    "raised back of hand": "the raised back of a hand",
    "hand with fingers splayed": "a hand with fingers splayed",
    "palms up together": "palms up together",
    "cowboy hat face": "a face with a cowboy hat",
    "litter in bin sign": "a litter in bin sign",
    "star of David": "a Star of David",
    "Santa Claus": "Santa Claus",
    "Mrs. Claus": "Mrs. Claus",
    "Mx Claus": "Mx Claus",
}

# Word-level case fixes for proper nouns / initialisms CLDR writes in lower case.
CASE_FIX = {
    "american": "American", "french": "French", "latin": "Latin",
    "hindu": "Hindu", "shinto": "Shinto", "orthodox": "Orthodox",
    "vulcan": "Vulcan", "ferris": "Ferris", "dvd": "DVD",
}

PAIR_NOUNS = {
    "glasses", "sunglasses", "goggles", "jeans", "gloves", "socks", "shorts",
    "briefs", "skis", "ballet shoes", "chopsticks", "scissors",
}

# Heads that take no article (uncountable here).
MASS = {
    "bacon", "butter", "popcorn", "sushi", "oden", "dango", "falafel",
    "fondue", "fog", "fire", "wood", "luggage", "money", "hair", "sweat",
    "rain", "snow", "lightning", "steam", "joy", "yen", "silhouette", "wind",
    "food", "shaved ice", "fear", "nail polish", "broccoli",
}
# Nouns that take no article after a preposition ("a person in bed").
INNER_NO_ARTICLE = {"bed"}
# Words ending in "s" that are singular.
S_SINGULAR = {"rhinoceros", "wireless", "leftwards", "rightwards", "upwards", "downwards"}
# Prepositions that end the head of a noun phrase.
PREPS = {
    "with", "without", "of", "in", "on", "at", "from", "over", "under",
    "behind", "for", "and", "or", "showing", "facing", "pointing", "but",
}
# After these words CLDR drops an article that English needs.
ARTICLE_TRIGGERS = {
    "with", "without", "in", "behind", "wearing", "getting", "taking",
    "feeding", "rowing", "bouncing", "tipping", "raising",
}
DETERMINERS = {"a", "an", "the", "its", "his", "her", "their", "two", "one"}
ING_NOT_BOUNDARY = {"playing", "ring", "building", "wing", "pudding"}
# All-caps words read as words, not spelled out.
CAPS_WORDS = {"BACK", "END", "ON!", "SOON", "TOP", "COOL", "FREE", "NEW", "UP!", "ZZZ"}
VOWEL_SOUND_LETTERS = set("AEFHILMNORSX")


def article_for(phrase: str) -> str:
    word = phrase.split()[0].strip("\"'(")
    if word[:1].isdigit():
        return "an" if re.match(r"(8|11|18)(\D|$)", word) else "a"
    core = word.rstrip("!")
    if core.isupper() and word not in CAPS_WORDS:          # initialism: SOS, OK, ATM
        return "an" if core[0] in VOWEL_SOUND_LETTERS else "a"
    if re.match(r"^[A-Za-z]-", word):                       # x-ray, t-shirt, e-mail, T-Rex
        return "an" if word[0].upper() in VOWEL_SOUND_LETTERS else "a"
    low = word.lower()
    if low.startswith(("hour", "honest", "heir")):
        return "an"
    if low.startswith(("uni", "use", "usu", "eu", "ewe", "one", "once", "ufo")):
        return "a"
    return "an" if low[0] in "aeiou" else "a"


def head_words(words: list[str]) -> list[str]:
    """The words of a noun phrase before its first preposition / participle."""
    head = []
    for i, w in enumerate(words):
        if i > 0 and (w in PREPS or (w.endswith("ing") and w not in ING_NOT_BOUNDARY)):
            break
        head.append(w)
    return head


def is_plural(words: list[str]) -> bool:
    head = head_words(words)
    if head[0] in ("people", "men", "women"):
        return True
    last = head[-1]
    if last in S_SINGULAR:
        return False
    return last.endswith("s") and not last.endswith(("ss", "us", "is", "ous"))


def is_mass(words: list[str]) -> bool:
    head = head_words(words)
    return head[-1] in MASS or " ".join(head) in MASS


def with_article(phrase: str) -> str:
    words = phrase.split()
    if words[0] in DETERMINERS or is_plural(words) or is_mass(words):
        return phrase
    return f"{article_for(phrase)} {phrase}"


def insert_inner_articles(phrase: str) -> str:
    """"person taking bath" -> "person taking a bath"."""
    words = phrase.split()
    out: list[str] = []
    for i, w in enumerate(words):
        out.append(w)
        if i == 0 or w not in ARTICLE_TRIGGERS or i + 1 >= len(words):
            continue
        rest = words[i + 1:]
        if rest[0] in DETERMINERS or rest[0][:1].isdigit() or rest[0] in INNER_NO_ARTICLE:
            continue
        if not (is_plural(rest) or is_mass(rest)):
            out.append(article_for(" ".join(rest)))
    return " ".join(out)


def member_list(items: list[str]) -> str:
    parts = [f"{article_for(x)} {x}" for x in items]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


THE_PLACES = re.compile(
    r"(Islands|Republic|Territory|Territories|Union|Nations|States|Kingdom|Emirates)$|"
    r"^(Netherlands|Philippines|Bahamas|Gambia|Maldives|Comoros|Seychelles|"
    r"Caribbean Netherlands|Isle of Man)$"
)


def place_name(name: str) -> str:
    name = name.replace(" & ", " and ").replace("St. ", "Saint ").replace(" - ", "-")
    name = name.replace("and Grenadines", "and the Grenadines")
    return f"the {name}" if THE_PLACES.search(name) else name


def describe(name: str, subcategory: str) -> str:
    """CLDR short name -> a natural noun phrase (without the style suffix)."""
    if name in OVERRIDES:
        return OVERRIDES[name]
    m = re.fullmatch(r"(man|woman|person) (red|curly|white|blond) hair", name)
    if m:
        return f"a {m[1]} with {m[2]} hair"
    m = re.fullmatch(r"(man|woman|person) (bald|beard)", name)
    if m:
        return f"a bald {m[1]}" if m[2] == "bald" else f"a {m[1]} with a beard"
    m = re.fullmatch(r"family (.+)", name)
    if m and "," in m[1]:
        return "a family of " + member_list([x.strip() for x in m[1].split(",")])
    m = re.fullmatch(r"kiss (\w+), (\w+)", name)
    if m:
        return f"{member_list([m[1], m[2]])} kissing"
    m = re.fullmatch(r"couple with heart (\w+), (\w+)", name)
    if m:
        return f"a couple with a heart, {member_list([m[1], m[2]])}"
    m = re.fullmatch(r"keycap (.+)", name)
    if m:
        what = {"#": "a hash sign", "*": "an asterisk"}.get(m[1], f"the number {m[1]}")
        return f"a keycap with {what}"
    m = re.fullmatch(r"flag (.+)", name)
    if m and subcategory in ("country-flag", "subdivision-flag"):
        return f"the flag of {place_name(m[1])}"
    if subcategory == "zodiac":
        return f"the {name} zodiac sign"
    if subcategory == "time" and re.fullmatch(r"\w+ o'clock|\w+-thirty", name):
        return f"a clock showing {name}"
    m = re.fullmatch(r"input (.+)", name)
    if m:
        return f"an input symbol for {m[1]}"
    m = re.fullmatch(r"(\w+) button \(blood type\)", name)
    if m:
        return f"{article_for(m[1])} {m[1]} button for blood type"
    if name in PAIR_NOUNS:
        return f"a pair of {name}"

    phrase = " ".join(CASE_FIX.get(w, w) for w in name.split())
    phrase = re.sub(r"face with tongue$", "face sticking out its tongue", phrase)
    phrase = re.sub(r" (over|under|on|from) (mouth|eyes|nose)$", r" \1 its \2", phrase)
    phrase = re.sub(r"^speaker (\w+) volume$", r"speaker at \1 volume", phrase)
    phrase = phrase.replace("open eyes and hand", "open eyes and a hand")
    if phrase.startswith("sun ") or phrase == "sun":
        return "the " + insert_inner_articles(phrase)
    last = phrase.split()[-1]
    if subcategory in ("transport-sign", "warning") and last not in ("sign", "symbol"):
        phrase += " sign"
    elif subcategory == "av-symbol" and last not in ("button", "bars"):
        phrase += " symbol"
    phrase = insert_inner_articles(phrase)
    return with_article(phrase)


def normalise_name(name: str) -> str:
    name = unicodedata.normalize("NFC", name)
    return name.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------

def on_white(rgba: Image.Image, size: int) -> Image.Image:
    """Composite on white at the source resolution, then resize (Lanczos)."""
    rgba = rgba.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    bg.alpha_composite(rgba)
    rgb = bg.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return rgb


def crop_cell(sheet: Image.Image, sx: int, sy: int) -> Image.Image:
    x, y = sx * SHEET_CELL + 1, sy * SHEET_CELL + 1
    return sheet.crop((x, y, x + SRC_PX, y + SRC_PX))


class FluentSource:
    """Rasterises Fluent Emoji Flat SVGs (iconify JSON) with cairosvg."""

    def __init__(self, icons_json: Path, chars_json: Path):
        import cairosvg  # noqa: F401  (checked early so the error is clear)

        self._cairosvg = cairosvg
        data = json.loads(icons_json.read_text(encoding="utf-8"))
        self.icons = data["icons"]
        self.aliases = data.get("aliases", {})
        self.width = data.get("width", 16)
        self.height = data.get("height", 16)
        self.chars = json.loads(chars_json.read_text(encoding="utf-8"))

    def slug_for(self, unified: str, cldr_name: str) -> str | None:
        key = "-".join(p for p in unified.lower().split("-") if p != "fe0f")
        for slug in (self.chars.get(key), self.chars.get(unified.lower()),
                     re.sub(r"[^a-z0-9]+", "-", cldr_name.lower()).strip("-")):
            if slug and (slug in self.icons or slug in self.aliases):
                return slug
        return None

    def render(self, slug: str, px: int) -> Image.Image:
        hflip = vflip = False
        while slug in self.aliases:
            alias = self.aliases[slug]
            hflip ^= bool(alias.get("hFlip"))
            vflip ^= bool(alias.get("vFlip"))
            slug = alias["parent"]
        icon = self.icons[slug]
        w, h = icon.get("width", self.width), icon.get("height", self.height)
        left, top = icon.get("left", 0), icon.get("top", 0)
        body = icon["body"]
        if hflip or vflip:
            sx, sy = (-1 if hflip else 1), (-1 if vflip else 1)
            tx = (2 * left + w) if hflip else 0
            ty = (2 * top + h) if vflip else 0
            body = f'<g transform="translate({tx} {ty}) scale({sx} {sy})">{body}</g>'
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" '
               f'xmlns:xlink="http://www.w3.org/1999/xlink" width="{px}" height="{px}" '
               f'viewBox="{left} {top} {w} {h}">{body}</svg>')
        png = self._cairosvg.svg2png(bytestring=svg.encode("utf-8"),
                                     output_width=px, output_height=px)
        return Image.open(io.BytesIO(png)).convert("RGBA")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def gendered_words(name: str) -> int:
    return sum(w in ("man", "woman", "men", "women", "boy", "girl")
               for w in re.findall(r"[a-z]+", name))


def is_heldout(unified: str) -> bool:
    digest = hashlib.sha256((SPLIT_SALT + unified).encode("ascii")).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


def load_cldr_names(path: Path) -> dict[str, str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    names = {}
    for emoji, info in data.items():
        names[emoji] = info["name"]
        names.setdefault(emoji.replace("\ufe0f", ""), info["name"])
    return names


def unified_to_str(unified: str) -> str:
    return "".join(chr(int(cp, 16)) for cp in unified.split("-"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", type=int, choices=(32, 64), default=64)
    ap.add_argument("--flags", choices=("generic", "all"), default="generic",
                    help="generic (default): only the 8 non-national flags; all: also "
                         "the 262 country/subdivision flags")
    ap.add_argument("--fluent", action="store_true",
                    help="add Fluent Emoji Flat as a third style (needs cairosvg + libcairo)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="where npm tarballs are kept (default OUT_DIR/.packages)")
    args = ap.parse_args()
    t0 = time.time()

    out: Path = args.out_dir
    cache: Path = args.cache or (out / ".packages")
    out.mkdir(parents=True, exist_ok=True)

    if args.fluent:
        try:
            import cairosvg  # noqa: F401
        except Exception as exc:  # ImportError or OSError (libcairo missing)
            sys.exit(f"error: --fluent needs cairosvg and libcairo ({exc}); "
                     "pip install cairosvg, or run without --fluent")

    # ---- fetch and extract -------------------------------------------------
    pkgs = [DS_TWITTER, DS_GOOGLE, NAMES_PKG] + ([FLUENT_PKG] if args.fluent else [])
    tgz = {pkg: npm_pack(pkg, cache) for pkg in pkgs}
    xdir = {pkg: cache / tgz_name(pkg)[:-4] for pkg in pkgs}
    tw = extract(tgz[DS_TWITTER], ["package/emoji.json", "package/LICENSE",
                                   SHEET_STYLES["twemoji"][1]], xdir[DS_TWITTER])
    go = extract(tgz[DS_GOOGLE], ["package/LICENSE", SHEET_STYLES["noto"][1]], xdir[DS_GOOGLE])
    nm = extract(tgz[NAMES_PKG], ["package/data-by-emoji.json", "package/LICENSE"],
                 xdir[NAMES_PKG])
    sheets = {"twemoji": tw[SHEET_STYLES["twemoji"][1]], "noto": go[SHEET_STYLES["noto"][1]]}
    fluent = None
    if args.fluent:
        fl = extract(tgz[FLUENT_PKG], ["package/icons.json", "package/chars.json",
                                       "package/info.json"], xdir[FLUENT_PKG])
        fluent = FluentSource(fl["package/icons.json"], fl["package/chars.json"])
    t_fetch = time.time() - t0

    emoji = json.loads(tw["package/emoji.json"].read_text(encoding="utf-8"))
    cldr = load_cldr_names(nm["package/data-by-emoji.json"])

    # ---- select names ------------------------------------------------------
    entries = []
    dropped = Counter()
    for e in sorted(emoji, key=lambda e: e["sort_order"]):
        if e["category"] == "Component":
            dropped["component (skin-tone swatch)"] += 1
            continue
        if e["subcategory"] in ("country-flag", "subdivision-flag") and args.flags != "all":
            dropped[e["subcategory"]] += 1
            continue
        s = unified_to_str(e["unified"])
        name = cldr.get(s) or cldr.get(s.replace("\ufe0f", ""))
        if name is None:  # not expected for Emoji 16.0; fall back to the char name
            name = e["name"].lower()
        name = normalise_name(name)
        entries.append({
            "unified": e["unified"], "name": name,
            "category": e["category"], "subcategory": e["subcategory"],
            "sheet": (e["sheet_x"], e["sheet_y"]),
            "added_in": tuple(int(p) for p in str(e.get("added_in") or "99").split(".")),
            "has": {"twemoji": e.get("has_img_twitter", False),
                    "noto": e.get("has_img_google", False)},
            "text": describe(name, e["subcategory"]),
        })
        dropped["skin-tone variant images (per style)"] += len(e.get("skin_variations") or {})

    texts = Counter(x["text"] for x in entries)
    dup_texts = [t for t, c in texts.items() if c > 1]
    if dup_texts:
        sys.exit(f"error: duplicate descriptions {dup_texts[:10]}")

    # ---- write images --------------------------------------------------------
    styles = list(SHEET_STYLES) + (["fluent"] if fluent else [])
    for split in ("train", "heldout"):
        shutil.rmtree(out / split, ignore_errors=True)
        (out / split).mkdir(parents=True)
    rows: dict[str, list[dict]] = {"train": [], "heldout": []}
    missing = Counter()
    pixel_hash: dict[str, dict[bytes, list[int]]] = {s: defaultdict(list) for s in styles}
    preview_pick: dict[str, dict[str, Image.Image]] = defaultdict(dict)
    sheet_images = {}
    for style in SHEET_STYLES:
        im = Image.open(sheets[style])
        im.load()
        n_cells = max(max(x["sheet"]) for x in entries) + 1
        if im.width < n_cells * SHEET_CELL:
            sys.exit(f"error: unexpected sheet size {im.size} for {style}")
        sheet_images[style] = im.convert("RGBA")

    # Render everything first, then drop pixel-identical duplicates within a
    # style (Twemoji 16 draws all 25 gendered family emoji as the same neutral
    # silhouettes): one caption per picture, the least gendered name wins.
    rendered: dict[str, dict[int, Image.Image]] = {s: {} for s in styles}
    for idx, x in enumerate(entries):
        for style in styles:
            if style == "fluent":
                slug = fluent.slug_for(x["unified"], x["name"])
                if slug is None:
                    missing[style] += 1
                    continue
                src = fluent.render(slug, args.size * 4)
            else:
                if not x["has"][style]:
                    missing[style] += 1
                    continue
                src = crop_cell(sheet_images[style], *x["sheet"])
            if src.getchannel("A").getbbox() is None:  # blank cell
                missing[style] += 1
                continue
            flat = on_white(src, src.width)  # compare what is visible, at source size
            pixel_hash[style][hashlib.sha256(flat.tobytes()).digest()].append(idx)
            rendered[style][idx] = on_white(src, args.size)

    duplicates: dict[str, list[list[str]]] = {s: [] for s in styles}
    for style in styles:
        for group in pixel_hash[style].values():
            if len(group) < 2:
                continue
            keep = min(group, key=lambda i: (gendered_words(entries[i]["name"]),
                                             entries[i]["added_in"],
                                             len(entries[i]["name"]), i))
            duplicates[style].append([entries[keep]["name"]] +
                                     [entries[i]["name"] for i in group if i != keep])
            for i in group:
                if i != keep:
                    del rendered[style][i]

    for idx, x in enumerate(entries):
        split = "heldout" if is_heldout(x["unified"]) else "train"
        for style in styles:
            img = rendered[style].get(idx)
            if img is None:
                continue
            fname = f"{x['unified'].lower()}-{style}.png"
            img.save(out / split / fname, optimize=True)
            if idx % 37 == 0:
                preview_pick[x["unified"]][style] = img
            rows[split].append({
                "file_name": fname,
                "text": [f"{x['text']}, {style} style", x["text"]],
                "category": x["category"],
                "subcategory": x["subcategory"],
                "style": style,
                "name": x["name"],
                "unified": x["unified"],
            })

    for split, items in rows.items():
        with open(out / split / "metadata.jsonl", "w", encoding="utf-8") as f:
            for r in items:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    # ---- preview contact sheet (every 37th name, one row per style) ----------
    picks = list(preview_pick.items())
    cols, pad = 24, 2
    blocks = [picks[i:i + cols] for i in range(0, len(picks), cols)]
    cell = args.size + pad
    sheet = Image.new("RGB", (cols * cell + pad, len(blocks) * len(styles) * cell + pad),
                      (128, 128, 128))
    for b, block in enumerate(blocks):
        for c, (_, by_style) in enumerate(block):
            for s, style in enumerate(styles):
                if style in by_style:
                    sheet.paste(by_style[style],
                                (pad + c * cell, pad + (b * len(styles) + s) * cell))
    sheet.save(out / "preview.png", optimize=True)

    # ---- licences, README, report -------------------------------------------
    lic = out / "LICENSES"
    shutil.rmtree(lic, ignore_errors=True)
    lic.mkdir()
    (lic / "emoji-datasource-MIT.txt").write_bytes(tw["package/LICENSE"].read_bytes())
    (lic / "unicode-emoji-json-MIT.txt").write_bytes(nm["package/LICENSE"].read_bytes())
    (lic / "twemoji-graphics-CC-BY-4.0.txt").write_text(
        TWEMOJI_ATTRIBUTION + "\n\nFull licence text: "
        "https://creativecommons.org/licenses/by/4.0/legalcode\n"
        "Changes: composited on white, cropped from the sprite sheet, resized.\n")
    (lic / "noto-emoji-Apache-2.0.txt").write_text(
        NOTO_NOTE + "\n\nChanges: composited on white, cropped from the sprite sheet, resized.\n")
    if fluent:
        (lic / "fluent-emoji-MIT.txt").write_text(
            "MIT License\n\nCopyright (c) Microsoft Corporation.\n\n" + MIT_TEXT)

    counts = Counter((r["style"], split) for split, items in rows.items() for r in items)
    cat_counts = Counter((r["category"], split) for split, items in rows.items() for r in items)
    names_per_split = {s: len({r["unified"] for r in rows[s]}) for s in rows}

    lines = []
    lines.append(f"names: {len(entries)} selected, "
                 f"{names_per_split['train'] + names_per_split['heldout']} with an image "
                 f"({names_per_split['train']} train, {names_per_split['heldout']} held out)")
    lines.append("images per style / split:")
    for style in styles:
        lines.append(f"  {style:8s} train {counts[(style, 'train')]:5d}  "
                     f"heldout {counts[(style, 'heldout')]:4d}  missing {missing[style]}")
    lines.append(f"  {'total':8s} train {len(rows['train']):5d}  heldout {len(rows['heldout']):4d}")
    lines.append("images per category (all styles) / split:")
    for cat in sorted({c for c, _ in cat_counts}):
        lines.append(f"  {cat:20s} train {cat_counts[(cat, 'train')]:5d}  "
                     f"heldout {cat_counts[(cat, 'heldout')]:4d}")
    lines.append("left out: " + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())))
    for style in styles:
        groups = duplicates[style]
        if groups:
            lines.append(f"pixel-identical {style} images: {len(groups)} groups, "
                         f"{sum(len(g) - 1 for g in groups)} images dropped; kept first:")
            for g in groups:
                lines.append(f"  {g[0]!r} <- " + ", ".join(repr(n) for n in g[1:]))
    report = "\n".join(lines)

    pkg_rows = []
    lic_of = {
        DS_TWITTER: "images CC-BY 4.0 (Twemoji); data MIT",
        DS_GOOGLE: "images Apache-2.0 (Noto Emoji); data MIT",
        NAMES_PKG: "MIT (names from Unicode CLDR / emoji-test.txt, Unicode License v3)",
        FLUENT_PKG: "MIT (Microsoft Fluent Emoji)",
    }
    for pkg in pkgs:
        pkg_rows.append(f"| `{pkg[0]}` | {pkg[1]} | {lic_of[pkg]} | `{sha256_file(tgz[pkg])}` |")
    examples = [r["text"][0] for r in rows["train"][:: max(1, len(rows["train"]) // 12)]][:12]
    held_examples = [r["text"][0] for r in rows["heldout"][:: max(1, len(rows["heldout"]) // 6)]][:6]
    cmd = "python3 scripts/make_emoji_dataset.py OUT_DIR --size %d%s%s" % (
        args.size, " --flags all" if args.flags == "all" else "",
        " --fluent" if args.fluent else "")
    resized = ", then Lanczos-resized" if args.size != SRC_PX else ""
    readme = f"""# Captioned emoji data set ({args.size}x{args.size})

Made by `scripts/make_emoji_dataset.py` of ldm:

    {cmd}

Layout: Hugging Face `imagefolder`. `train/` and `heldout/` each hold RGB PNGs
({args.size}x{args.size}, composited on white at the 64 px source size{resized}) and `metadata.jsonl` with one JSON object per image:
`file_name`, `text` (two alternative captions: with the style, and the bare name), `category`, `subcategory`, `style`
({", ".join(styles)}), `name` (official CLDR name) and `unified` (code points).
`preview.png` is a contact sheet (every 37th name; one row per style).

Caption examples (train): {"; ".join(f'"{t}"' for t in examples)}.
Held-out examples: {"; ".join(f'"{t}"' for t in held_examples)}.

## Counts

```
{report}
```

## Sources

| npm package | version | licence | sha256 of the .tgz |
| --- | --- | --- | --- |
{chr(10).join(pkg_rows)}

Fetched with `npm pack <name>@<version>`; only `emoji.json`, the 64 px
`sheets-clean` sprite sheet of each image package and the name list are read.
OpenMoji is not used (CC BY-SA).

## Attribution and licences

* {TWEMOJI_ATTRIBUTION}. The images were cropped from the sprite sheet,
  composited on white and resized.
* {NOTO_NOTE}. The images were cropped, composited on white and resized.
{"* " + FLUENT_NOTE + ". The SVGs were rasterised, composited on white and resized." + chr(10) if fluent else ""}* Emoji data (emoji.json) by Cal Henderson, MIT (emoji-datasource); emoji
  names via unicode-emoji-json (MIT, Mu-An Chiou) from Unicode CLDR data.

Licence texts and notices are in `LICENSES/`. Anything trained on or
redistributing these images must carry the Twemoji attribution above and the
Noto Apache-2.0 notice.

## Selection

* Skin-tone variants are dropped: only the default image of each emoji is used.
  The 323 emoji with skin tones have 1,875 variant images per style; keeping
  them would make People & Body about 60% of the data with five recolourings
  of one drawing per name. Gendered variants (person / man / woman X) are
  separate drawings with separate names and are kept.
* Flags: `--flags {args.flags}`. By default the 262 country and subdivision
  flags are dropped and the 8 generic flags kept. At 32 px the flags are still
  legible, but their captions are place names with no visual meaning (a
  held-out flag can never be generated from its name), they would be 14% of the
  data, all the same rectangle, and at least 10 pairs are pixel-identical
  under different names (France / St. Martin, Norway / Svalbard & Jan Mayen,
  United States / U.S. Outlying Islands, ...).
* The five bare skin-tone swatches (category Component) are dropped.
* A picture that is pixel-identical to another name's picture in the same
  style is kept once, under the least gendered name, then the oldest emoji,
  then the shortest name (Twemoji 16 draws the 25 gendered family emoji as
  the four neutral family silhouettes; with `--flags all`, territories share
  their country's flag).

## Split

Fixed and documented, never random: a name (emoji) is held out when

    int(sha256("{SPLIT_SALT}" + unified).hexdigest()[:8], 16) % 100 < {HELDOUT_PERCENT}

with `unified` the upper-case code from emoji-datasource (e.g. `1F34F`,
`1F9D1-200D-1F373`). Every style of a held-out name is in `heldout/` and none
of it in `train/`. The split does not depend on the image size or options.
Gendered and other variants are separate names, so "a woman cook" may be held
out while "a cook" is trained on (a compositional test). Pixel-identical
pictures under different names are kept once per style (listed under Counts),
so no picture is in both splits.
"""
    (out / "README.md").write_text(readme, encoding="utf-8")

    print(report)
    print(f"caption examples: {examples[:6]}")
    print(f"wrote {out} in {time.time() - t0:.1f} s (fetch/extract {t_fetch:.1f} s)")


if __name__ == "__main__":
    main()
