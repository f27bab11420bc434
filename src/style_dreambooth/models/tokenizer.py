"""The Stable Diffusion 1.x CLIP tokenizer, built offline, and tools to check a rare identifier.

SD 1.x uses OpenAI's CLIP BPE tokenizer (49408 tokens, 77-token context). Its vocabulary is
fully determined by the BPE merge list shipped in ``assets/bpe_simple_vocab_16e6.txt.gz``:

* the 256 byte-level unicode characters (GPT-2's reversible byte -> char table),
* the same 256 characters with ``</w>`` (end of word) appended,
* one token per merge, in merge order (``"a b"`` -> ``"ab"``),
* ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

So the tokenizer can be rebuilt without any download and matches the one in every SD 1.x repo.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

from ..errors import UserError

logger = logging.getLogger(__name__)

BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# 256 single chars + 256 chars with </w> + merges + 2 special tokens = 49408.
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2
# Rarity proxy: a BPE vocabulary is numbered in merge order, and BPE merges the most frequent pairs
# first, so a word's token id (its merge rank + 512) says how common it was in CLIP's training text.
# Below this id a word is common ("painting" 3086, "dog" 1929, "moonlight" 20001); "sks" (48136) and
# "ohwx" (47993) are above it.
COMMON_TOKEN_BELOW = 30000

# Common English words that make poor identifiers even though they are single tokens.
_COMMON_WORDS = frozenset(
    """
    the and for are but not you all any can had her was one our out day get has him his how man new now
    old see two way who boy did its let put say she too use art cat dog sun sky red big top end run set
    that with have this will your from they know want been good much some time very when come here just
    like long make many more only over such take than them well were what each most also back call came
    give made find work year look into high part play word best love life home food blue green
    photo style paint image draw color light dark small large great world water house about
    there their which would other these could first after think where right those
    """.split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the rest are shifted to code points 256+n.
    The insertion order (printable bytes first) is the order of the first 256 vocab entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Parse the bundled BPE file into (tokens in id order, merge lines)."""
    raw = resources.files("style_dreambooth").joinpath("assets", BPE_ASSET).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = tuple(lines[1 : _N_MERGES + 1])
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:  # pragma: no cover - asset check
        raise RuntimeError(f"the bundled {BPE_ASSET} does not yield the {VOCAB_SIZE}-token CLIP vocabulary")
    return tuple(tokens), merges


def write_vocab_files(directory: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the files HF's CLIPTokenizer reads) into ``directory``."""
    tokens, merges = _vocab_and_merges()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(
        json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8"
    )
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(save_dir: Path | None = None, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Build SD 1.x's CLIP tokenizer from the bundled BPE file, without any download.

    With ``save_dir``, the tokenizer is saved there (``save_pretrained``) together with
    ``vocab.json`` and ``merges.txt``, so the folder is a normal diffusers ``tokenizer/`` folder
    that both transformers 5 (``tokenizer.json``) and 4.x slow tokenizers can read. SDXL's second
    tokenizer pads with ``"!"`` instead of the end token.
    """
    tokens, merges = _vocab_and_merges()
    # transformers 5's CLIPTokenizer ignores vocab_file/merges_file in its constructor (only
    # from_pretrained converts them, and then records loader kwargs and the temp path in its
    # saved config), so hand it the parsed vocabulary and merges directly.
    tokenizer = CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=[tuple(m.split(" ")) for m in merges],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
        write_vocab_files(save_dir)
    return tokenizer


# --------------------------------------------------------------------------- identifiers

# Function words skipped when looking for the identifier in an instance prompt such as
# "a painting in the style of yltcaxe".
_PROMPT_FILLER = frozenset("a an the of in on by with and or for to at from as style".split())


def _prompt_words(prompt: str | None) -> list[str]:
    if not prompt:
        return []
    words = (w.strip(string.punctuation + "“”‘’") for w in prompt.lower().split())
    return [w for w in words if w]


def find_identifier(instance_prompt: str, class_prompt: str | None) -> str | None:
    """The rare identifier of an instance prompt: its first word that is not in the class prompt.

    Words are lowercased with surrounding punctuation removed; filler words ("a", "the", "in",
    "of", "style", ...) are skipped. Returns None when every word is shared with the class prompt.
    """
    class_words = set(_prompt_words(class_prompt))
    for word in _prompt_words(instance_prompt):
        if word not in class_words and word not in _PROMPT_FILLER:
            return word
    return None


@dataclass
class IdentifierReport:
    """How the tokenizer splits an identifier, with single-token alternatives if it splits."""

    word: str
    pieces: list[str]
    ids: list[int]
    suggestions: list[str] = field(default_factory=list)

    @property
    def is_single_token(self) -> bool:
        return len(self.ids) == 1

    @property
    def is_common(self) -> bool:
        """One token merged early in BPE (id below COMMON_TOKEN_BELOW): a frequent word with a prior meaning."""
        return self.is_single_token and self.ids[0] < COMMON_TOKEN_BELOW

    @property
    def is_good(self) -> bool:
        return self.is_single_token and not self.is_common


def _display_piece(piece: str) -> str:
    return piece[: -len(END_OF_WORD)] if piece.endswith(END_OF_WORD) else piece


_SUGGESTION_BODY = re.compile(r"[a-z]{3,5}")


def _rare_single_tokens(tokenizer: CLIPTokenizer, n: int, exclude: str) -> list[str]:
    """``n`` rare whole-word tokens (3-5 lowercase letters), latest merges first, verified single tokens."""
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1], reverse=True)
    found: list[str] = []
    for token, _id in by_id:
        if len(found) >= n:
            break
        if not token.endswith(END_OF_WORD):
            continue
        body = token[: -len(END_OF_WORD)]
        if not _SUGGESTION_BODY.fullmatch(body) or body in _COMMON_WORDS or body == exclude:
            continue
        if len(tokenizer(body, add_special_tokens=False)["input_ids"]) != 1:
            continue
        found.append(body)
    return found


def analyze_identifier(tokenizer: CLIPTokenizer, word: str, n_suggestions: int = 5) -> IdentifierReport:
    """Tokenize ``word`` and, if it is more than one token or a common one, suggest rare single-token words."""
    word = word.strip()
    ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    pieces = list(tokenizer.convert_ids_to_tokens(ids))
    suggestions: list[str] = []
    if (len(ids) != 1 or ids[0] < COMMON_TOKEN_BELOW) and n_suggestions > 0:
        suggestions = _rare_single_tokens(tokenizer, n_suggestions, exclude=word.lower())
    return IdentifierReport(word=word, pieces=pieces, ids=ids, suggestions=suggestions)


def format_identifier_report(report: IdentifierReport) -> str:
    """A few human-readable lines describing an :class:`IdentifierReport`."""
    shown = " | ".join(_display_piece(p) for p in report.pieces)
    if report.is_good:
        return (
            f"'{report.word}' -> 1 BPE token (id {report.ids[0]}, a rare one: merged late in BPE, id >= "
            f"{COMMON_TOKEN_BELOW}): good, a rare identifier should be one token."
        )
    if report.is_common:
        lines = [
            f"'{report.word}' -> 1 BPE token (id {report.ids[0]}), but a common word (merged early in BPE, id < "
            f"{COMMON_TOKEN_BELOW}): it carries a prior meaning that the style would mix with.",
        ]
        if report.suggestions:
            lines.append("try a rare word: " + ", ".join(report.suggestions))
        return "\n".join(lines)
    if not report.ids:
        return f"'{report.word}' -> no tokens: the identifier is empty."
    lines = [
        f"'{report.word}' -> {len(report.ids)} BPE pieces: {shown} (ids {report.ids});",
        "a rare identifier should be one token so that it carries no prior meaning and learns the style cleanly.",
    ]
    if report.suggestions:
        lines.append("try: " + ", ".join(report.suggestions))
    return "\n".join(lines)


# --------------------------------------------------------------------------- prompt length


def readable_tokens(tokenizer) -> int:
    """How many prompt tokens the text encoder reads (77 less the start and end tokens for CLIP)."""
    return tokenizer.model_max_length - 2


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _word_end(tokenizer, prompt: str, word: str) -> int | None:
    """How many tokens of `prompt` run up to the end of its first whole `word` (None if absent)."""
    m = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt.lower())
    return None if m is None else count_tokens(tokenizer, prompt[: m.end()])


def _is_rare(tokenizer, word: str) -> bool:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return len(ids) > 1 or (len(ids) == 1 and ids[0] >= COMMON_TOKEN_BELOW)


def check_instance_prompt_fits(tokenizer, label: str, prompt: str, class_prompt: str | None, identifier: str | None) -> None:
    """Refuse an instance prompt (or captioned prompt, named by `label`) that the text encoder cuts before
    its identifier: the identifier as found, or any rare word past the cut, which is the likelier one."""
    limit = readable_tokens(tokenizer)
    n = count_tokens(tokenizer, prompt)
    if n <= limit:
        return
    class_words = set(_prompt_words(class_prompt))
    candidates = [identifier] if identifier else []
    candidates += [w for w in _prompt_words(prompt) if w not in class_words and w not in _PROMPT_FILLER and _is_rare(tokenizer, w)]
    for word in dict.fromkeys(candidates):
        end = _word_end(tokenizer, prompt, word)
        if end is not None and end > limit:
            raise UserError(
                f"{label} is {n} CLIP tokens and the text encoder reads only the first {limit}: the identifier "
                f"'{word}' ends at token {end} and would never be trained; shorten it or put the identifier first"
            )


def warn_if_truncated(tokenizer, prompts: dict[str, str]) -> None:
    """A warning for each prompt (label -> text) longer than the text encoder reads, with its token count."""
    limit = readable_tokens(tokenizer)
    seen: set[str] = set()
    for label, prompt in prompts.items():
        if prompt in seen:
            continue
        seen.add(prompt)
        n = count_tokens(tokenizer, prompt)
        if n > limit:
            logger.warning(
                "%s is %d CLIP tokens; the text encoder reads only the first %d, so its last %d are ignored: %r",
                label, n, limit, n - limit, prompt,
            )
