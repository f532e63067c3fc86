"""`ConversionReport`: what a conversion did with every tensor (written, skipped and why, missing and why)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class ConversionReport:
    """What a conversion did with every tensor.

    Attributes:
        mapped: source key -> target key it was written to (`{q,k,v}_proj` for a split fused projection,
            `... (+ LoRA)` for a LoRA factor merged into or loaded next to a weight).
        skipped: source key -> why it was not used.
        missing: target key the source did not provide -> where its value comes from instead.
        dtypes: part of the saved model (`language_model`, `lm_head`, `audio_tower`, `audio_tower.init_bn`,
            `vision_tower`, `fusion`, `multi_modal_projector`) -> the dtype its tensors ended in.
    """

    mapped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    def merge(self, other: ConversionReport, source_prefix: str = "", target_prefix: str = "") -> None:
        """Add `other`'s entries, its source keys prefixed by `source_prefix`, its target keys by `target_prefix`."""
        self.mapped.update({source_prefix + k: target_prefix + v for k, v in other.mapped.items()})
        self.skipped.update({source_prefix + k: v for k, v in other.skipped.items()})
        self.missing.update({target_prefix + k: v for k, v in other.missing.items()})

    def summary(self, examples: int = 3) -> str:
        """Counts, and the skipped and missing keys grouped by reason with a few examples each."""
        lines = [f"mapped: {len(self.mapped)} tensors"]
        for title, entries in (("skipped", self.skipped), ("missing", self.missing)):
            lines.append(f"{title}: {len(entries)} tensors")
            by_reason: dict[str, list[str]] = defaultdict(list)
            for key, reason in entries.items():
                by_reason[reason].append(key)
            for reason, keys in by_reason.items():
                shown = ", ".join(keys[:examples]) + (", ..." if len(keys) > examples else "")
                lines.append(f"  {len(keys)} x {reason}: {shown}")
        if self.dtypes:
            lines.append("dtypes: " + "; ".join(f"{part} {dtype}" for part, dtype in self.dtypes.items()))
        return "\n".join(lines)
