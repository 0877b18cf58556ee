"""The tiny models' tokenizer: a byte-level BPE trained on a built-in English corpus, so that
tests build a real tokenizer offline."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_PARAGRAPHS = """\
The old lighthouse stood at the edge of the cliff, its white paint peeling in the salty wind.
Every evening the keeper climbed one hundred and twelve steps to light the lamp, and every
morning he wrote the weather in a small green notebook.
A recipe for bread needs only flour, water, salt and yeast, yet bakers argue for hours about
the temperature of the oven, the length of the rise and the shape of the loaf.
In 1969 two astronauts walked on the Moon while millions of people watched grainy pictures on
their televisions. The mission lasted eight days; the samples they brought back are still
studied today.
Cats sleep for most of the day, but they wake instantly when a bird lands near the window.
Dogs, on the other hand, seem to know exactly when their owners are about to leave the house.
To compute the area of a circle, multiply pi by the square of the radius. For a radius of 3
centimeters the area is roughly 28.27 square centimeters.
The river flows north through the valley, past farms of wheat and barley, under seven stone
bridges, and finally into the cold grey sea.
She opened the letter carefully, read it twice, and then laughed so loudly that the neighbors
asked whether everything was all right.
Computers store numbers in binary: the number 13 is written 1101, and the number 255 is
11111111. Programmers often write such values in hexadecimal, as 0x0D and 0xFF.
What is shown in this picture? Describe the image in detail. How many people are there?
What color is the car? Is it raining? Where was this photo taken? Please answer briefly.
"""

_SUBJECTS = (
    "the farmer",
    "a small child",
    "my sister",
    "the teacher",
    "our neighbor",
    "the doctor",
    "a tall man",
    "the young artist",
    "the pilot",
    "an old woman",
    "the students",
    "a quiet dog",
    "the orange cat",
    "the engineer",
    "the baker",
)
_VERBS = (
    "painted",
    "found",
    "carried",
    "watched",
    "described",
    "repaired",
    "counted",
    "photographed",
    "sold",
    "bought",
    "cleaned",
    "opened",
    "borrowed",
    "drew",
    "lost",
)
_ADJECTIVES = (
    "red",
    "blue",
    "green",
    "yellow",
    "broken",
    "shiny",
    "wooden",
    "heavy",
    "tiny",
    "enormous",
    "ancient",
    "modern",
    "striped",
    "round",
    "square",
    "soft",
)
_NOUNS = (
    "boat",
    "bicycle",
    "window",
    "table",
    "mountain",
    "picture",
    "garden",
    "letter",
    "lamp",
    "bridge",
    "chair",
    "basket",
    "clock",
    "kite",
    "umbrella",
    "guitar",
)
_PLACES = (
    "near the station",
    "in the kitchen",
    "on the hill",
    "by the river",
    "at the market",
    "under the bridge",
    "in the park",
    "behind the school",
)
_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "re",
    "su",
    "ta",
    "ven",
    "dor",
    "bel",
    "an",
    "is",
    "or",
    "ne",
    "ra",
    "li",
    "mon",
    "tes",
    "ga",
    "fi",
    "ul",
    "qua",
    "zen",
    "pa",
    "ho",
)


def _name(rng: random.Random) -> str:
    """A pseudo proper noun; their variety gives BPE enough distinct words to merge."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def english_corpus(num_sentences: int) -> list[str]:
    """A fixed English-like corpus: the paragraphs above plus generated sentences."""
    rng = random.Random(1234)  # fixed: the tokenizer depends only on the vocab size
    lines = _PARAGRAPHS.splitlines()
    for _ in range(num_sentences):
        lines.append(
            f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
            f"{rng.randint(1, 999)} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}s "
            f"{rng.choice(_PLACES)} with {_name(rng)} and {_name(rng)}."
        )
    return lines


def train_bpe_tokenizer(
    vocab_size: int,
    special_tokens: list[str],
    *,
    bos: str | None,
    eos: str,
    unk: str | None,
    pad: str,
    extra_special_tokens: dict[str, str] | None = None,
    prepend_bos: bool = True,
    model_max_length: int,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of exactly ``vocab_size`` ids; special tokens get ids 0, 1, ...

    With ``bos`` set and ``prepend_bos``, encoding prepends it (LLaVA-1.5 / Llama behaviour);
    without ``prepend_bos`` the chat template writes it. eos is not appended.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Measured: 2V + 2000 sentences support any vocab size V up to at least 64k.
    tok.train_from_iterator(english_corpus(2 * vocab_size + 2000), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"corpus too small for vocab {vocab_size}: got {tok.get_vocab_size()}")
    # add_bos_token makes transformers write a TemplateProcessing post-processor into
    # tokenizer.json; that, not tokenizer_config.json, is what adds bos after reloading.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        add_bos_token=bos is not None and prepend_bos,
        add_eos_token=False,
        extra_special_tokens=extra_special_tokens or {},
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
