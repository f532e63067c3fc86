"""The PTB tokenizer in Python (`ptb_tokenize`, used where there is no Java) against the jar pycocoevalcap runs:
the same tokens on a few hundred generated captions full of the constructs where tokenizers disagree (contractions,
clitics, assimilations, numbers, abbreviations, URLs, hyphens, quotes, unicode) and on fuzzed text."""

from __future__ import annotations

import random
import shutil

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from lavcap_hf.evaluation.ptb_tokenizer import ptb_tokenize

# No function of a package the stacks pin differently runs here (held to it, tests/conftest.py): one stack is enough.
pytestmark = pytest.mark.stack_independent

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="the reference is the PTB tokenizer jar (Java)"
)

SUBJECTS = [
    "A dog", "The man", "a woman", "Two children", "An old engine", "Birds", "Someone", "The car's horn",
    "People", "Rain", "A motorboat", "The crowd's cheers", "Ma'am Smith", "Mr. Lee", "Dr. Jones",
    "St. Mary's bells", "The U.S. Army band", "An 18-wheeler", "A DJ", "The TV", "y'all", "O'Neil",
]  # fmt: skip
VERBS = [
    "barks", "is talking", "cheers", "idles", "chirp", "hums", "can't stop", "won't start", "isn't moving",
    "cannot hear", "is gonna leave", "wanna play", "gotta go", "'s singing", "'ll shout", "'d laugh",
    "'ve left", "'re clapping", "'m here", "didn't ring", "shan't wait", "ain't loud", "lemme see",
    "gimme that", "DON'T stop", "CAN'T hear", "Won't go", "don’t stop", "'d've gone",
]  # fmt: skip
PHRASES = [
    # numbers, dates, measures, money
    "loudly", "in the distance", "at 3.5 km/h", "for 10 minutes", "near a 50-year-old bridge",
    "on 12/05/2020", "at 10:30 a.m.", "at 5 p.m.", "at 1,000 Hz", "by 50%", "for $5", "for £20", "for €10",
    "for ¥300", "for 5¢", "at 20°C", "at -3 degrees", "by +4 dB", "with 1/2 volume", "for 3 1/2 hours",
    "for ½ hour", "at 2x speed", "at 1e5 Hz", "3.14159", "1.000,50", "12:30:45", "v1.2.3", "2020-05-12",
    "1-800-555-0199", "at 555-1234", "at (555) 123-4567", "50-60", "the 50s", "3rd", "5th", "100m", "5km",
    "x²", "in the 1990s", "in the 80's", "in '99", "in the '90s",
    # apostrophes
    "like rock'n'roll", "with rock 'n' roll", "at o'clock", "near ol' Joe", "to 'em", "'til dawn",
    "'cause it's late", "'twas", "'tis", "Hawai'i", "O'Neil's", "D'Arcy", "l'amour", "d'Artagnan",
    "McDonald's", "James'", "dogs'", "boss's", "it's", "It’s", "I'M", "C'est la vie", "Cap'n Hook",
    "li'l one", "c'mon", "s'mores", "nor'easter", "ev'ry", "e'er", "somethin'", "Dunkin'", "o'er", "'n'",
    "Cannot", "cannotx", "GONNA",
    # programming, web, symbols
    "in C++ class", "in C# code", "on www.example.com", "at http://example.com/a?b=1", "to me@example.com",
    "for @user", "with #hashtag", "near AT&T Park", "with R&B music", "and/or music", "file.wav", "song.mp3",
    "snake_case", "A+", "B-", "&", "= 5", "+", "~", "^", "|", "*", "**", "###", "@@", "<b>bold</b>", "<unk>",
    "< 5", "> 3", ":)", ";-)", ":(", "^_^", "&amp;", "&quot;x&quot;",
    # abbreviations
    "at No. 5", "in Fig. 3", "etc.", "e.g. cars", "i.e. trucks", "vs. wind", "in Jan. 2020", "on Mon. night",
    "in Calif. hills", "at Co. Ltd", "at Inc. headquarters", "U.K.", "USA", "U.S.A.", "Ph.D.", "a.k.a.",
    "Jr.", "Ave.", "Mt. Fuji", "Ft. Worth", "Washington, D.C.", "the U.S.", "U.S. troops", "the U.S. The",
    "I. Newton", "J.K. Rowling", "plan B. The end", "U.S.-U.K. talks",
    # hyphens, dashes, dots
    "with a state-of-the-art mic", "at a high-pitched tone", "with an x-ray", "via e-mail", "twenty-one",
    "co-op", "re-enter", "pre-war", "anti-war", "pro-life", "-- twice --", "– twice –", "— again —", "---",
    "-----", "…", "...", "....", ". . .", "?!", "!!", "??", "..", "soft\u00adhyphen", "non‑breaking",
    "en‐dash",
    # quotes
    '"quoted"', "'single'", "“smart”", "‘curly’", "``latex''", "«guillemets»", "’’twice’’", "''90s",
    # unicode
    "in naïve café", "in São Paulo", "über the façade", "near İstanbul", "in Ελλάδα", "in Москва", "in 日本",
    "with ☺ joy", "with 🙂 joy", "→ next", "× 3", "ñandú", "Straße", "ﬁne", "٣ apples", "zero\u200bwidth", "™",
    "(quietly)", "[softly]", "{faintly}",
]  # fmt: skip
ENDINGS = [".", "!", "?", "", "...", " .", "!?", ";", ":", ",", " -"]
FRAGMENTS = [
    "a", "B", "dog", "'", '"', "s", "'s", "n't", ".", ",", "-", "--", "(", ")", "[", "]", "{", "}", "?", "!",
    ":", ";", "1", "23", "3.5", "/", "&", "@", "#", "$", "%", "+", "*", "_", "~", "…", "–", "—", "’", "‘",
    "“", "”", "é", "İ", "日本", "🙂", "½", "²", "°", "×", "http://", "www.", ".com", "U.S.", "Mr.", "etc.",
    "e.g.", "can", "not", "gon", "na", "'em", "'n'", "ol'", "'90s", "C++", "c#", " ", " ", " ", "The", "It",
    "I.", "x", "<", ">", "=", "\u00ad", "\u200b", "ñ", "Ω", "ß", "ﬁ", "ǅ", "\u0301", "٣", "०", "ª", "µ", "™",
    "€", "£", "¢", "¥", "&amp;",
]  # fmt: skip


def generated_captions(count: int, seed: int = 0) -> list[str]:
    """Captions of 3-6 parts with a random ending, some in upper or lower case."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS)]
        parts += [rng.choice(PHRASES) + rng.choice(["", "", ",", ";", ":"]) for _ in range(rng.randint(1, 4))]
        caption = " ".join(parts) + rng.choice(ENDINGS)
        if rng.random() < 0.2:
            caption = caption.upper() if rng.random() < 0.3 else caption.lower()
        captions.append(caption)
    return captions + PHRASES


def fuzzed_text(count: int, seed: int = 1) -> list[str]:
    """Fragments run together, or captions with characters swapped for fragments: text no captioner writes."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        if rng.random() < 0.5:
            text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(3, 12)))
        else:
            text = " ".join(rng.choice(SUBJECTS + VERBS + PHRASES) for _ in range(rng.randint(2, 6)))
            text = "".join(char if rng.random() > 0.05 else rng.choice(FRAGMENTS) for char in text)
        texts.append(" ".join(text.split()) or "x")
    return texts


def jar_tokens(texts: list[str]) -> list[str]:
    """The jar's tokens, as pycocoevalcap's COCOEvalCap gets them: all texts in one call, in this order."""
    tokenized = PTBTokenizer().tokenize({index: [{"caption": text}] for index, text in enumerate(texts)})
    return [tokenized[index][0] for index in range(len(texts))]


@needs_java
@pytest.mark.parametrize(
    "texts", [generated_captions(400), fuzzed_text(300)], ids=["generated-captions", "fuzzed-text"]
)
def test_ptb_tokenize_gives_the_jars_tokens(texts):
    expected = jar_tokens(texts)
    mismatches = [
        (text, want, got)
        for text, want, got in zip(texts, expected, ptb_tokenize(texts), strict=True)
        if want != got
    ]
    assert not mismatches, (
        f"{len(mismatches)} of {len(texts)} differ, e.g. (text, jar, python): {mismatches[:5]}"
    )


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("I cannot go, you gonna stop? We wanna play.", "i can not go you gon na stop we wan na play"),
        ("Gotta go, lemme see, gimme that", "got ta go lem me see gim me that"),
        ("The ol' man danced in the '90s to C++ music.", "the ol' man danced in the '90s to c++ music"),
        ("A dog's bark, then (quiet) talk...", "a dog 's bark then -lrb- quiet -rrb- talk"),
        ("Can't stop -- it's high-pitched!", "ca n't stop it 's high-pitched"),
        ("Rock'n'roll, y'all: 'twas 5 p.m. in the U.S.", "rock 'n' roll y' all 't was 5 p.m. in the u.s."),
        ("See www.example.com or me@example.com for £20", "see www.example.com or me@example.com for # 20"),
        ("Naïve café – “İstanbul” 🙂 ½", "naïve café i̇stanbul 1/2"),
    ],
)
def test_ptb_tokenize_splits_as_stanford_does(text, tokens):
    """Written out from the jar's output (the test above compares with the jar itself where Java is installed)."""
    assert ptb_tokenize([text]) == [tokens]


def test_each_caption_gets_its_own_line_of_tokens():
    captions = ["A dog barks.", "", "Line\nbreaks\u2028inside", "plan B.", "The end"]
    assert ptb_tokenize(captions) == ["a dog barks", "", "line breaks inside", "plan b", "the end"]
    assert ptb_tokenize(["plan B."]) == ["plan b."]  # the next line's "The" is what drops the period above
