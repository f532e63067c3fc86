"""Choices of the `lavcap` parsers, written by scripts/write_cli_choices.py from lavcap_hf: do not edit."""

FUSION_TYPES = (
    "ot_att",
    "ot_concat",
    "ot_channel_concat",
    "ot_cross_attention",
    "concat",
    "channel_concat",
    "audio_only",
    "visual_only",
    "concat_once",
    "plain_cross_attention",
)
"""`lavcap_hf.model.configuration_lavcap.FUSION_TYPES`."""

DEFAULT_COLUMNS = {
    "video": "video_path",
    "audio": "audio_path",
    "caption": "caption",
    "id": "id",
    "video_embeds": "video_embeds_path",
}
"""`lavcap_hf.data.clips.DEFAULT_COLUMNS`: manifest columns of each role."""

QUANTIZE_CHOICES = ("4bit", "8bit")
"""`lavcap_hf.quantization.QUANTIZE_CHOICES`: the values of `--quantize`."""
