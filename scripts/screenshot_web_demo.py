"""Redo docs/web_demo.png: serve `lavcap app` with the demo's trained model, caption a clip in headless Chromium
and save a screenshot of the whole page. With --bad-upload, redo docs/web_demo_error.png instead: after that
caption, a text file named `notes.mp4` is uploaded on the same page, and the screenshot is taken once the page has
answered and every toast has closed by itself (what a visitor sees from then until the next request).

    .venvs/current/bin/python scripts/screenshot_web_demo.py [--model lavcap_demo/model-ot_att] [--clip FILE]
    .venvs/current/bin/python scripts/screenshot_web_demo.py --bad-upload

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
    wait_for_status,
    wait_until_no_toast,
)

BAD_UPLOAD_TEXT = "These are meeting notes, saved with a video's name by mistake.\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Relative to the repository, where the app runs: the page's settings table shows the path as given.
    parser.add_argument("--model", default="lavcap_demo/model-ot_att")
    parser.add_argument(
        "--clip", help="video to caption (default: the page's synthesised bird-in-a-cave example)"
    )
    parser.add_argument(
        "--bad-upload",
        action="store_true",
        help="then upload a file that is not media and show the page's answer",
    )
    parser.add_argument(
        "--output", help="default: docs/web_demo.png, or docs/web_demo_error.png with --bad-upload"
    )
    args = parser.parse_args()
    output = args.output or str(ROOT / "docs" / ("web_demo_error.png" if args.bad_upload else "web_demo.png"))
    if not (ROOT / args.model / "config.json").is_file():
        parser.error(f"{args.model} holds no model: run `bash scripts/demo.sh` first")
    with tempfile.TemporaryDirectory(prefix="lavcap-screenshot-") as workdir:
        clip = args.clip
        if clip is None:
            from lavcap_hf.apps.web_demo import example_clips

            clip = next(path for path, _ in example_clips(workdir) if "chirps" in path)
        with running_app(args.model, workdir) as url, chromium(width=1400, height=1600) as driver:
            caption_in_page(driver, url, clip)
            shown = wait_for_caption(driver)
            image_size(driver, "#ot-plan")
            if args.bad_upload:
                bad = Path(workdir) / "notes.mp4"
                bad.write_text(BAD_UPLOAD_TEXT)
                caption_in_page(driver, url, bad, reload=False)
                shown = wait_for_status(driver, "cannot be captioned")
                wait_until_no_toast(driver)
            page_screenshot(driver, output)
    print(f"{Path(clip).name} -> {shown!r}; screenshot: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
