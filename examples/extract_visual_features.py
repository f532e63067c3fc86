"""Precompute frozen CLIP image embeddings of every clip's frames as `.npy` files (num_frames, projection_dim).

LAVCap trains on stored CLIP ViT-L/14 features of 20 frames per clip, (20, 768) per clip; this writes them:

    # AudioCaps layout: <root>/visual_feature/<split>/<audio name>.npy, where load_audiocaps looks for them
    python examples/extract_visual_features.py dataset/audiocaps --split train
    # a manifest or saved dataset: <output_dir>/<clip id>.npy, plus a manifest that points at them
    python examples/extract_visual_features.py data/train.jsonl --output_dir data/features \
        --write_manifest data/train_features.jsonl

Frames are decoded and preprocessed in DataLoader workers. Clips whose `.npy` exists are skipped, and each file is
written under a temporary name then renamed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPVisionModelWithProjection

from lavcap_hf.data.clips import Clip, load_audiocaps, load_clips
from lavcap_hf.data.dataset import LavCapDataset
from lavcap_hf.model._compat import dtype_kwarg
from lavcap_hf.model.feature_extraction_lavcap import LavCapFeatureExtractor


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", help="AudioCaps root, CSV/JSONL/JSON manifest, or a folder saved by datasets"
    )
    parser.add_argument("--split", default="train", help="split of an AudioCaps root or DatasetDict")
    parser.add_argument(
        "--output_dir", help="where the .npy files go (AudioCaps default: visual_feature/<split>)"
    )
    parser.add_argument("--write_manifest", help="JSONL manifest of the clips with their video_embeds_path")
    parser.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="CLIP folder or Hub id")
    parser.add_argument("--num_frames", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8, help="clips per forward pass")
    parser.add_argument("--num_workers", type=int, default=4, help="DataLoader workers decoding the frames")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    return parser.parse_args(argv)


def targets_of(args: argparse.Namespace) -> list[tuple[Clip, Path]]:
    """Every clip of the source with the `.npy` path its features go to."""
    source = Path(args.source)
    if source.is_dir() and (source / f"{args.split}.json").is_file():
        clips = load_audiocaps(source, args.split, visual_features_dir=args.output_dir)
        return [(clip, Path(clip.video_embeds)) for clip in clips]
    if args.output_dir is None:
        raise ValueError(f"{source}: give --output_dir for the features of a manifest or dataset")
    clips = load_clips(source, args.split)
    return [
        (clip, Path(args.output_dir) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', clip.id)}.npy") for clip in clips
    ]


class FrameBatches:
    """Collate function: frames of each clip -> CLIP pixel values (B, num_frames, 3, size, size) and the indices."""

    def __init__(self, extractor: LavCapFeatureExtractor) -> None:
        self.extractor = extractor

    def __call__(self, items: list[dict[str, Any]]) -> tuple[torch.Tensor, list[int]]:
        pixels = self.extractor.preprocess_videos([item["frames"] for item in items])
        return torch.from_numpy(pixels), [item["index"] for item in items]


def extract(args: argparse.Namespace) -> int:
    """Write the missing feature files; returns how many were written."""
    pairs = targets_of(args)
    todo = list({target: clip for clip, target in pairs if not target.exists()}.items())
    if todo:
        dtype = {dtype_kwarg(): getattr(torch, args.dtype)}
        model = CLIPVisionModelWithProjection.from_pretrained(args.clip_model, **dtype)
        model = model.to(args.device).eval()
        extractor = LavCapFeatureExtractor(num_frames=args.num_frames, image_size=model.config.image_size)
        clips = [dataclasses.replace(clip, video_embeds=None) for _, clip in todo]
        dataset = LavCapDataset(clips, num_frames=args.num_frames, load_audio=False)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            collate_fn=FrameBatches(extractor),
        )
        for pixels, indices in tqdm(loader, desc="CLIP features", unit="batch"):
            with torch.no_grad():
                flat = pixels.flatten(0, 1).to(args.device, model.dtype)
                embeds = model(pixel_values=flat).image_embeds.view(len(indices), args.num_frames, -1)
            for index, features in zip(indices, embeds.float().cpu().numpy(), strict=True):
                save_atomically(todo[index][0], features)
    if args.write_manifest:
        write_manifest(args.write_manifest, pairs)
    return len(todo)


def save_atomically(path: Path, features: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.save(f, features)
    os.replace(partial, path)


def write_manifest(path: str | os.PathLike, pairs: list[tuple[Clip, Path]]) -> None:
    """One row per clip entry (caption) with absolute media paths and its `video_embeds_path`."""
    rows = []
    for clip, target in pairs:
        row = {"id": clip.id, "caption": clip.caption, "references": list(clip.references)}
        for key, value in (("video_path", clip.video), ("audio_path", clip.audio)):
            if isinstance(value, (str, os.PathLike)):
                row[key] = str(Path(value).resolve())
        rows.append(json.dumps({**row, "video_embeds_path": str(target.resolve())}))
    Path(path).write_text("".join(row + "\n" for row in rows))


if __name__ == "__main__":
    written = extract(parse_args())
    print(f"wrote {written} feature files")
