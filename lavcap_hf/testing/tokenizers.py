"""An offline word-level tokenizer with the placeholder tokens: real tokenisation without a download."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ..model.processing_lavcap import TRAINING_INSTRUCTIONS, add_lavcap_special_tokens


def word_level_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `texts` and of the LAVCap prompts, with the placeholder tokens.

    Ids: 0 `[PAD]`, 1 `<s>`, 2 `</s>`, 3 `[UNK]`, then the words, then `<|audio|>` and `<|video|>`. Like LLaMA's
    tokenizer, it puts `<s>` before the text it encodes with special tokens.
    Built offline in milliseconds: the demo and tests use it in place of LLaMA's tokenizer.
    """
    pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [*texts, *TRAINING_INSTRUCTIONS, "USER: <Speech> </Speech> ASSISTANT:"]
    words = sorted({w for text in corpus for w, _ in pre_tokenizer.pre_tokenize_str(text)})
    specials = ["[PAD]", "<s>", "</s>", "[UNK]"]
    vocab = {token: i for i, token in enumerate(specials + [w for w in words if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # BOS before the text, as LLaMA's tokenizer puts it.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    add_lavcap_special_tokens(tokenizer)
    return tokenizer
