"""The benchmarks' model and workload: deterministic for a given seed, so every mode of a run
(and every run with the same flags) sends exactly the same prompts, images and `max_tokens`."""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from epdserve.tools.images import synthetic_png

IMAGE_SIZES = ((64, 48), (320, 240), (640, 480))   # (W, H) of the generated PNGs

MIN_TOKENS, MAX_TOKENS = 16, 96

SHORT_TEXTS = (
    "What is in this image?", "Describe the picture briefly.", "What colors do you see?",
    "Is there anything unusual here?", "Summarize this in one sentence.", "Hi, how are you?",
)

_PROSE = (
    "the old lighthouse stood at edge of cliff keeper climbed steps to light lamp every evening "
    "bread needs flour water salt and yeast bakers argue about oven temperature river flows north "
    "through valley past farms of wheat barley under seven stone bridges into cold grey sea she "
    "opened letter carefully read it twice laughed loudly computers store numbers in binary"
)


@dataclass(frozen=True)
class WorkItem:
    """One benchmark request: a user turn with an optional image and a fixed output length."""

    rid: str
    text: str
    image: bytes | None          # PNG bytes, or None for a text-only request
    max_tokens: int

    def hf_messages(self) -> list[dict]:
        """The turn as the HF chat template takes it (image part first, as the processor does)."""
        parts = [{"type": "image"}] if self.image is not None else []
        return [{"role": "user", "content": [*parts, {"type": "text", "text": self.text}]}]

    def openai_messages(self, image_url: str | None) -> list[dict]:
        """The same turn as an OpenAI chat request, the image as `image_url`."""
        parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
        return [{"role": "user", "content": [*parts, {"type": "text", "text": self.text}]}]


def decode_png(data: bytes) -> Image.Image:
    """PNG bytes -> RGB PIL image."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def _long_text(rng: random.Random) -> str:
    """A 60..200-word pseudo-English paragraph followed by a question."""
    vocabulary = _PROSE.split()
    words = [rng.choice(vocabulary) for _ in range(rng.randint(60, 200))]
    return " ".join(words).capitalize() + ". " + rng.choice(SHORT_TEXTS)


def build_workload(num_requests: int, seed: int, tag: str) -> list[WorkItem]:
    """`num_requests` mixed requests: half with one image, short and long texts, `max_tokens`
    spread evenly over 16..96 (shuffled). `tag` (e.g. the concurrency level) seeds the
    content, so different levels get different prompts and no prefix cache carries over."""
    rng = random.Random(f"{seed}/{tag}")
    n = num_requests
    budgets = [MIN_TOKENS + (MAX_TOKENS - MIN_TOKENS) * i // max(n - 1, 1) for i in range(n)]
    rng.shuffle(budgets)
    with_image = set(rng.sample(range(n), n // 2))
    items = []
    for i in range(n):
        text = _long_text(rng) if rng.random() < 0.5 else rng.choice(SHORT_TEXTS)
        image = None
        if i in with_image:
            image = synthetic_png(rng.randrange(2**31), IMAGE_SIZES[i % len(IMAGE_SIZES)])
        items.append(WorkItem(f"{tag}-{i}", text, image, budgets[i]))
    return items


def ensure_model(preset: str) -> Path:
    """A random-weight LLaVA of `preset`, built once into $EPDSERVE_CACHE (~/.cache/epdserve)."""
    from epdserve.tools.tiny_model import build_tiny_model
    cache = Path(os.environ.get("EPDSERVE_CACHE", Path.home() / ".cache" / "epdserve"))
    path = cache / f"bench-llava-{preset}"
    if not (path / "config.json").is_file():
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        build_tiny_model("llava", tmp, preset=preset)
        tmp.rename(path)
    return path
