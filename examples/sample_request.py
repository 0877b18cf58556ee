"""Send one chat completion with an image to a running epdserve cluster and print the reply.

    python examples/sample_request.py [--base-url http://127.0.0.1:8000] [--model NAME] [--image PATH]

Uses only the standard library and Pillow; any OpenAI client works the same way.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import urllib.request

from PIL import Image, ImageDraw


def sample_image() -> bytes:
    img = Image.new("RGB", (320, 240), "skyblue")
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 170, 320, 240), fill="forestgreen")
    draw.ellipse((230, 20, 290, 80), fill="gold")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--image", default=None, help="an image file; default: a drawn landscape")
    args = p.parse_args()

    with urllib.request.urlopen(f"{args.base_url}/v1/models") as resp:
        model = args.model or json.load(resp)["data"][0]["id"]
    image = open(args.image, "rb").read() if args.image else sample_image()
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
        ]}],
        "max_tokens": 32,
        "temperature": 0,
    }
    req = urllib.request.Request(f"{args.base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        answer = json.load(resp)
    print(f"model: {model}")
    print(f"reply: {answer['choices'][0]['message']['content']!r}")
    print(f"usage: {answer['usage']}")


if __name__ == "__main__":
    main()
