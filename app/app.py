"""Hugging Face Space entry point: the LAVCap captioning page of `lavcap_hf.apps.web_demo` (locally: `lavcap app`).

The model is the Space variable LAVCAP_MODEL (a Hub id or a folder); unset, it is the demo's model, trained at
start-up by `lavcap demo`'s code when the folder `lavcap_demo/model-ot_att` is missing.
"""

import os

from lavcap_hf.apps.web_demo import create_demo, serve

demo = create_demo(os.environ.get("LAVCAP_MODEL") or None)

if __name__ == "__main__":
    serve(demo)
