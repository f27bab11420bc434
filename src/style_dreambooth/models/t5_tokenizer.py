"""A small T5 tokenizer built offline, for the random-weight FLUX.1 and SD 3.5 shapes.

No T5 vocabulary can be downloaded here and no package ships one, so the tiny shapes get their own:
a SentencePiece-style Unigram model (``tokenizers``) with T5's special ids (pad 0, eos 1, unk 2),
a ``▁`` word-boundary pre-tokenizer and an ``</s>`` appended to every text, as T5's tokenizer does.
Its pieces are the prompt words of the tests and the proof world plus every single character, with
fixed scores, so the same tokenizer is built every time (a trained Unigram model is not
byte-reproducible). Real models load their own tokenizer from their files.
"""

from __future__ import annotations

import math
import string

from transformers import T5TokenizerFast

SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
WORDS = """
a an the of in on at with and by to is yltcaxe artstyle style painting drawing sketch photo picture image
portrait boy girl man woman dog cat bird tree house star circle square triangle heart moon sun flower car
boat red green blue yellow orange purple pink black white brown grey gray sepia muted bright dark light big
small large tiny one two three left right top bottom sks ohwx
""".split()
WORD_LOG_PROB = -2.0
CHAR_LOG_PROB = -8.0  # a word not in WORDS falls apart into characters


def unigram_vocab() -> list[tuple[str, float]]:
    """(piece, log probability) in id order: T5's special tokens, then words, then characters."""
    chars = ["▁", *string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *string.punctuation]
    vocab = [(token, 0.0) for token in SPECIAL]
    vocab += [(f"▁{word}", WORD_LOG_PROB - math.log(1 + len(word))) for word in dict.fromkeys(WORDS)]
    vocab += [(c, CHAR_LOG_PROB) for c in chars]
    return vocab


def build_t5_tokenizer(model_max_length: int = 32) -> T5TokenizerFast:
    """T5's tokenizer interface over :func:`unigram_vocab` (100 extra ids, as T5 has)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.Unigram(unigram_vocab(), unk_id=SPECIAL.index("<unk>"), byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", SPECIAL.index("</s>"))],
    )
    return T5TokenizerFast(tokenizer_object=tokenizer, extra_ids=100, model_max_length=model_max_length,
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
