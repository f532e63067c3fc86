"""Redo docs/web_demo.png: serve `lavcap app` with the demo's trained model, caption a clip in headless Chromium
and save a screenshot of the whole page.

    .venvs/current/bin/python scripts/screenshot_web_demo.py [--model lavcap_demo/model-ot_att] [--clip FILE]

The model must exist (`bash scripts/demo.sh` trains it); the clip defaults to one of the page's synthesised
examples. Needs Debian's chromium and chromium-driver (`scripts/test.sh` installs them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from web_app_driver import (  # noqa: E402
    caption_in_page,
    chromium,
    image_size,
    page_screenshot,
    running_app,
    wait_for_caption,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "lavcap_demo" / "model-ot_att"))
    parser.add_argument(
        "--clip", help="video to caption (default: the page's synthesised bird-in-a-cave example)"
    )
    parser.add_argument("--output", default=str(ROOT / "docs" / "web_demo.png"))
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"{args.model} holds no model: run `bash scripts/demo.sh` first")
    with tempfile.TemporaryDirectory(prefix="lavcap-screenshot-") as workdir:
        clip = args.clip
        if clip is None:
            from lavcap_hf.web_demo import example_clips

            clip = next(p for p in example_clips(workdir) if "chirps" in p)
        with running_app(args.model, workdir) as url, chromium(width=1400, height=1600) as driver:
            caption_in_page(driver, url, clip)
            caption = wait_for_caption(driver)
            image_size(driver, "#ot-plan")
            page_screenshot(driver, args.output)
    print(f"{Path(clip).name} -> {caption!r}; screenshot: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
