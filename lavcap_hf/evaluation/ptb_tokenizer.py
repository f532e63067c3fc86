"""Stanford's PTB tokenisation of captions, in Python, for machines without Java.

The COCO caption toolkit (pycocoevalcap) tokenises every caption with the PTBTokenizer of Stanford CoreNLP 3.4.1 (the
jar it ships), run as `PTBTokenizer -preserveLines -lowerCase` over all captions of a call, one per line, and then
drops its punctuation tokens. `ptb_tokenize` gives the same token strings without a JVM: the tokenizer is a
longest-match lexer (at each position the rule matching the most characters wins, counting the right context a rule
looks at; on a tie the earlier rule), and `_lexer` states its rules, as the jar applies them with its default PTB3
escaping. Among them: `cannot` -> `can not` and `gonna` -> `gon na` (as `gotta lemme gimme wanna`); kept whole:
`ol'`, `'90s`, `'n'`, `'em`, `c++`, `o'clock`, URLs, e-mail addresses, dotted abbreviations (`mr.`, `u.s.`, `jan.`);
clitics split off (`dog 's`, `ca n't`); brackets become `-lrb-`-style tokens, quotes `` `` `` and `''`, unicode
dashes `--`, `£` `#` and `€` `$`; characters the jar cannot tokenise (emoji) are dropped.

It gives the jar's tokens on the tests' few hundred generated captions full of these constructs and on fuzzed text
(tests/test_ptb_tokenizer.py). The scores computed from it say `tokenizer: "python-fallback"` wherever they are
reported, since text far from captions (scripts whose letters Unicode added after the jar was built, SGML with odd
attributes) can still tokenise differently.

This file is also `metrics/audio_captioning/ptb_tokenizer.py` (a symbolic link), which the `evaluate` module
imports: it imports nothing but the standard library.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from typing import Any

try:  # the regex parser, public as sre_parse up to Python 3.10
    from re import _constants as _sre
    from re import _parser as _sre_parser
except ImportError:  # pragma: no cover
    import sre_constants as _sre
    import sre_parse as _sre_parser

PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
"""pycocoevalcap's `PUNCTUATIONS`: the tokens it drops after the lower-casing tokenizer, so the upper-case bracket
names are never dropped (`-lrb-` stays)."""

_LINE_BREAKS = "\r\n\u2028\u2029\u000b\u000c\u0085"


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenise captions as pycocoevalcap's `PTBTokenizer.tokenize` does with Java: lower-cased tokens without
    punctuation, joined by single spaces.

    The captions are lexed as one text, one caption per line, as the jar reads them: a few rules look past the end
    of a line (e.g. `plan B.` before a line starting with `The` loses its period), so a caption's tokens can depend
    on the next caption, in both implementations.

    Args:
        captions: the captions, in the order pycocoevalcap would write them; line breaks inside one become spaces.

    Returns:
        One string per caption.
    """
    text = "\n".join(re.sub(f"[{_LINE_BREAKS}]", " ", caption) for caption in captions)
    lines: list[list[str]] = [[]]
    for token in _lex(text):
        if token == "\n":
            lines.append([])
        # Java lower-cases with Locale.ENGLISH: the same full case mapping as str.lower (İ -> i̇, final sigma).
        elif (lowered := token.lower()) not in PTB_PUNCTUATION:
            lines[-1].append(lowered)
    return [" ".join(tokens) for tokens in lines[: len(captions)]]


Emit = Callable[[str], "tuple[str | None, int]"]
"""A rule's action: the token's text -> (the token, or None for nothing; how many of its characters are consumed,
fewer giving the rest back to the lexer)."""


class _Lexer:
    """The rules, matched at a position by one pattern holding those that can start with the character there.

    In such a pattern rule i is an optional lookahead: its group 2i+1 spans the rule's match, right context
    included (what the longest match counts), its group 2i+2 the token.
    """

    def __init__(self, rules: Sequence[tuple[str, str, Emit]]) -> None:
        self.sources = [f"(?:(?=(({token}){context})))?" for token, context, _ in rules]
        self.emits = [emit for _, _, emit in rules]
        self.first = [_first_characters(token) for token, _, _ in rules]
        self.known = frozenset().union(*(chars for chars in self.first if chars is not None))
        self._by_start: dict[str, tuple[re.Pattern[str], list[int]]] = {}

    def candidates(self, char: str) -> tuple[re.Pattern[str], list[int]]:
        """The pattern of the rules that can start with `char`, and their indices."""
        key = char if char in self.known else ""
        if key not in self._by_start:
            rules = [i for i, chars in enumerate(self.first) if chars is None or key in chars]
            self._by_start[key] = (re.compile("".join(self.sources[i] for i in rules)), rules)
        return self._by_start[key]


def _lex(text: str) -> Iterator[str]:
    """The jar's token strings for `text`, before lower-casing and punctuation removal; "\\n" between lines."""
    lexer = _lexer()
    shadow = _shadow(text)
    position = 0
    while position < len(text):
        pattern, rules = lexer.candidates(shadow[position])
        spans = pattern.match(shadow, position).regs
        best, best_end = -1, position
        for slot in range(len(rules)):
            if spans[2 * slot + 1][1] > best_end:  # the longest match; the earlier rule on a tie
                best, best_end = slot, spans[2 * slot + 1][1]
        if best < 0:
            position += 1  # untokenisable: the jar drops the character
            continue
        start, end = spans[2 * best + 2]
        token, consumed = lexer.emits[rules[best]](text[start:end])
        if token is not None:
            yield token
        position += consumed


def _first_characters(pattern: str) -> frozenset[str] | None:
    """The characters a match of `pattern` can start with; None where any can (a negated class)."""
    chars, _ = _first_of(_sre_parser.parse(pattern).data, ignore_case=False)
    return None if chars is None else frozenset(chars)


def _first_of(items: Sequence[tuple[Any, Any]], ignore_case: bool) -> tuple[set[str] | None, bool]:
    """(the first characters, or None for any; whether the items can match nothing) of parsed regex items."""
    found: set[str] = set()
    for op, argument in items:
        if op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
            continue  # zero-width
        if op is _sre.LITERAL:
            first, nullable = {chr(argument)}, False
        elif op is _sre.IN and all(kind in (_sre.LITERAL, _sre.RANGE) for kind, _ in argument):
            first = set()
            for kind, value in argument:
                first.update(chr(value) if kind is _sre.LITERAL else map(chr, range(value[0], value[1] + 1)))
            nullable = False
        elif op is _sre.BRANCH:
            branches = [_first_of(branch, ignore_case) for branch in argument[1]]
            if any(chars is None for chars, _ in branches):
                return None, False
            first, nullable = (
                set().union(*(chars for chars, _ in branches)),
                any(empty for _, empty in branches),
            )
        elif op is _sre.SUBPATTERN:
            _, add_flags, remove_flags, sub = argument
            case_flag = _sre.SRE_FLAG_IGNORECASE
            first, nullable = _first_of(
                sub, (ignore_case or bool(add_flags & case_flag)) and not remove_flags & case_flag
            )
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
            low, _, sub = argument
            first, nullable = _first_of(sub, ignore_case)
            nullable = nullable or low == 0
        else:  # any character, a negated class or literal, or a construct these rules do not use
            return None, False
        if first is None:
            return None, False
        found |= first | ({char.swapcase() for char in first} if ignore_case else set())
        if not nullable:
            return found, False
    return found, True


def _keep(text: str) -> tuple[str | None, int]:
    return text, len(text)


def _skip(text: str) -> tuple[str | None, int]:
    return None, len(text)


def _as(replacement: str) -> Emit:
    return lambda text: (replacement, len(text))


def _split_last(count: int) -> Emit:
    """`cannot` -> `can` (then `not` is lexed again): the last `count` characters go back to the lexer."""
    return lambda text: (text[:-count], len(text) - count)


def _period_again(text: str) -> tuple[str | None, int]:
    """An abbreviation ending a sentence: the token keeps its period and the period is also lexed again."""
    return text, len(text) - 1


def _acronym_ending_sentence(text: str) -> tuple[str | None, int]:
    """A one-letter acronym (`B.`) before a sentence start loses its period; a longer one keeps it (and the period is
    lexed again)."""
    return (text[:-1], 1) if len(text) == 2 else (text, len(text) - 1)


def _no_soft_hyphens(text: str) -> tuple[str | None, int]:
    return text.replace("\u00ad", "") or "-", len(text)


_QUOTES_LATEX = str.maketrans(
    {
        "\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`",
        "\u0092": "'", "\u2019": "'", "\u203a": "'",
        "\u0093": "``", "\u201c": "``", "\u00ab": "``",
        "\u0094": "''", "\u201d": "''", "\u00bb": "''",
    }
)  # fmt: skip


def _quote(opening: bool) -> Emit:
    """Quotes in LaTeX style: a straight quote becomes ` or `` when it probably opens, ' or '' otherwise."""
    single, double = ("`", "``") if opening else ("'", "''")

    def emit(text: str) -> tuple[str | None, int]:
        normal = re.sub("&apos;|'", single, text).replace("&quot;", '"').replace('"', double)
        return normal.translate(_QUOTES_LATEX), len(text)

    return emit


def _ampersand(text: str) -> tuple[str | None, int]:
    return re.sub("(?i)&amp;", "&", text), len(text)


def _currency(text: str) -> tuple[str | None, int]:
    return {"\u00a2": "cents", "\u00a3": "#"}.get(
        text, "$" if text in "\u0080\u00a4\u20a0\u20ac" else text
    ), 1


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _fraction(text: str) -> tuple[str | None, int]:
    return _FRACTIONS.get(text, text), 1


_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-"}
_PARENTHESES = str.maketrans({"(": "-LRB-", ")": "-RRB-"})


def _bracket(text: str) -> tuple[str | None, int]:
    return _BRACKETS[text], 1


def _parentheses(text: str) -> tuple[str | None, int]:
    """Parentheses inside a longer token (a smiley, a phone number) are named; other brackets stay."""
    return text.translate(_PARENTHESES), len(text)


def _hyphens(text: str) -> tuple[str | None, int]:
    return ("--" if 3 <= len(text) <= 4 else text), len(text)


def _spaces_to_nbsp(text: str) -> tuple[str | None, int]:
    return text.replace(" ", "\u00a0"), len(text)


def _phone_number(text: str) -> tuple[str | None, int]:
    return _parentheses(text.replace(" ", "\u00a0"))


# Stand-ins for the characters the rules know only by their class, so that the rules' classes stay small: the text is
# lexed in this "shadow" (one character for one) and the tokens are cut from the original.
_OTHER_LETTER = "\ue000"  # a letter beyond ASCII, not upper-case
_UPPER_LETTER = "\ue001"  # an upper-case letter beyond ASCII
_WORD_MARK = "\ue002"  # no letter, but inside words: the `_WORD_MARKS` that are no letters
_OTHER_DIGIT = "\ue003"  # a decimal digit beyond ASCII
# What the jar takes inside words besides letters (combining marks of some scripts, modifier symbols), as ranges;
# other marks (e.g. the Malayalam virama) split words and are dropped.
_WORD_MARKS = (
    "0237-024f 02c2-02c5 02d2-02df 02e5-02ff 0300-037d 0384-0385 03cf 03f6 03fc-03ff 0483-0487 04cf 04f6-04ff "
    "0510-0525 055a-055f 0591-05bd 05bf 05c1-05c2 05c4-05c5 05c7 0615-061a 063b-063f 064b-065e 0670 06d6-06ef "
    "06fa-06ff 070f 0711 0730-077f 07a6-07b1 07ca-07f5 07fa 0900-0903 093c 093e-094e 0951-0955 0962-0963 "
    "0981-0983 09bc-09c4 09c7-09c8 09cb-09cd 09d7 09e2-09e3 0a01-0a03 0a3c 0a3e-0a4f 0a81-0a83 0abc-0acf 0b82 "
    "0bbe-0bc2 0bc6-0bc8 0bca-0bcd 0c01-0c03 0c3e-0c56 0d3e-0d44 0d46-0d48 0e30-0e3a 0e47-0e4e 0eb1-0ebc 0ec8-0ecd"
)
_UNTOKENISABLE = "\ue004"  # private-use characters, and those beyond the BMP (Java sees two surrogates)


@functools.cache
def _shadow_table() -> dict[int, str]:
    """`str.translate`'s table to the shadow: the stand-ins above for the characters beyond ASCII they stand for."""
    marks = set()
    for span in _WORD_MARKS.split():
        first, _, last = span.partition("-")
        marks.update(range(int(first, 16), int(last or first, 16) + 1))
    table = {}
    for code in range(0x80, 0x10000):
        category = unicodedata.category(chr(code))
        if category == "Lu":
            table[code] = _UPPER_LETTER
        elif category.startswith("L"):  # Java's Character.isLetter
            table[code] = _OTHER_LETTER
        elif category == "Nd":  # Character.isDigit
            table[code] = _OTHER_DIGIT
        elif code in marks:
            table[code] = _WORD_MARK
        elif category == "Co":
            table[code] = _UNTOKENISABLE
    return table


def _shadow(text: str) -> str:
    """`text` with the stand-ins, as long as `text`."""
    return re.sub("[\U00010000-\U0010ffff]", _UNTOKENISABLE, text.translate(_shadow_table()))


@functools.cache
def _lexer() -> _Lexer:
    """The lexer's rules, in the jar's order of precedence (which decides ties in match length), on the shadow text."""
    letter, digit = f"A-Za-z{_OTHER_LETTER}{_UPPER_LETTER}", f"0-9{_OTHER_DIGIT}"
    upper = f"A-Z{_UPPER_LETTER}"
    word_letter = f"[{letter}{_WORD_MARK}\u00ad]"  # the letters of words: also marks and soft hyphens
    L, D, LD = f"[{letter}]", f"[{digit}]", f"[{letter}{digit}]"  # noqa: N806  (short: the rules use them often)
    apos = "(?:['\u0092\u2019]|&apos;)"
    apos_any = "(?:['\u0092\u2019`\u0091\u2018\u201b]|&apos;)"
    space = "[ \t\u00a0\u2000-\u200a\u3000]"
    space_nl = f"(?:{space}|\r\n|[{_LINE_BREAKS}])"
    word = f"{word_letter}(?:{word_letter}|{D})*(?:[.!?]{word_letter}(?:{word_letter}|{D})*)*"
    clitic = f"{apos}(?:[msdMSD]|(?i:re|ve|ll))"
    nt = f"(?i:n){apos_any}(?i:t)"
    # Python tries alternatives in order, the jar takes the longest: an alternative that can extend another comes first.
    us_pairs = r"(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))"
    acro, acro2 = rf"{us_pairs}|[A-Za-z](?:\.[A-Za-z])*", rf"{us_pairs}|[A-Za-z](?:\.[A-Za-z])+"
    sgml = (
        r"<(?:[!?][A-Za-z-][^>\r\n]*|[A-Za-z][\w:.-]*(?: +[A-Za-z][\w:.-]*(?: *= *(?:'[^']*'|\"[^\"]*\"))?)* */?"
        r"|/[A-Za-z][\w:.-]*) *>"
    ).replace(r"\w", "A-Za-z0-9_")
    in_sentence_punct = "[,;:\u3001]"
    hyphen = "[-_\u058a\u2010\u2011]"
    thing_part = f"(?:[dDoOlL]{apos_any}{LD})?{LD}+"
    # Abbreviations: followed by lower-case words (months, days, states, companies, ...), by anything, or by numbers.
    months_days = "jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri"
    states = (
        "ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|wisc?"
        "|wyo"
    )
    companies = "inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys"
    other_lower = r"tel|est|ext|sq|jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq|bldg"
    # These states are also words: only with a capital first letter.
    capital_states = "A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash)"
    abbrev_lower = f"(?:(?i:{months_days}|{states}|{companies}|{other_lower})|{capital_states})\\."
    titles = (
        "mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|ste?|ave|pres"
        "|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc"
    )
    titles += "|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph|invt|elec|natl|m[ft]g|dept"
    abbrev_upper_stem = f"(?:(?i:{titles})|M(?i:iss)|{acro})"
    sentence_starts = (
        "A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)|I(?i:f|n|t)"
        "|L(?i:ast)|M(?i:any|ore|r\\.|s\\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)|S(?i:he|ince|o|ome|uch)"
        "|T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)|Y(?i:et|ou)"
    )
    url_end = '[^ \t\n\f\r"<>|.!?(){},-]'
    url_host = "[^ \t\n\f\r\"`'<>|.!?(){},-_$]"  # `,-_` is a range in the jar's class: no digits or capitals
    email_part = '[^ \t\n\f\r"<>|(){}.\u00a0]+'
    phone = (
        r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])[0-9]{3,4}[- \u00a0]?"
        r"[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
    )
    misc_symbol = (
        "+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0\u05c3"
        "\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8"
        "\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f"
        "\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40"
        "\uff5b-\uff65"
    )
    file_types = (
        "bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps"
        "|py|sql|tar|txt|wav|x|xml|zip"
    )

    table: list[tuple[str, str, Emit]] = [
        # (token, right context, emit)
        (r"(?i:c\+\+|[cf]#)", "", _keep),
        ("(?i:cannot)", "", _split_last(3)),
        ("(?i:'twas)", "", _split_last(3)),
        ("(?i:'tis)", "", _split_last(2)),
        ("(?i:gonna|gotta|lemme|gimme|wanna)", "", _split_last(2)),
        (sgml, "", _spaces_to_nbsp),
        ("(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", "", _as("--")),
        ("(?i:&amp;)", "", _as("&")),
        ("(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)", "", _keep),
        (word, clitic, _no_soft_hyphens),
        ("[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", nt, _no_soft_hyphens),
        (word, "", _no_soft_hyphens),
        # Words with an apostrophe kept whole.
        (f"{apos}(?i:n){apos}?", "", _keep),
        (f"[lLdDjJ]{apos}", "", _keep),
        (f"(?i:dunkin|somethin|ol){apos}", "", _keep),
        (f"{apos}(?i:em)", "", _keep),
        (f"[A-HJ-XZn]{apos_any}{L}{{2,}}", "", _keep),
        (f"{apos}[2-9]0(?i:s)", "", _keep),
        (f"{apos}(?i:till?)", "", _keep),
        (f"{L}+[aeiouyAEIOUY]{apos_any}[aeiouA-Z]{L}*", "", _keep),
        (f"{apos}(?i:cause)", "", _keep),
        (r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", "", _keep),
        (f"(?i:o){apos_any}(?i:o)", "", _keep),
        (f"(?i:y){apos}", L, _keep),
        (f"(?i:https?)://[^ \t\n\f\r\"<>|(){{}}]+{url_end}", "", _keep),
        (
            f"(?:(?i:www)\\.(?:[^ \t\n\f\r\"<>|.!?(){{}},]+\\.)+[a-zA-Z]{{2,4}}"
            f"|(?:{url_host}+\\.)+(?i:com|net|org|edu))(?:/[^ \t\n\f\r\"<>|()]+{url_end})?",
            "",
            _keep,
        ),
        (f"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{{}}]*@(?:{email_part}\\.)*{email_part}(?:(?i:&gt;)|>)?",
         "", _keep),
        (f"@[a-zA-Z_][a-zA-Z_0-9]*|#{word_letter}+", "", _keep),
        (clitic, "[^A-Za-z]", _quote(False)),
        (nt, "[^A-Za-z]", _quote(False)),
        (f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}", "", _keep),
        (f"[-+]?(?:{D}*(?:[.:,\u00ad\u066b\u066c]{D}+)+|{D}+)", "", _no_soft_hyphens),
        ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", "", _keep),
        (f"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\\\?/|\u2044){D}{{1,4}}", "", _spaces_to_nbsp),
        ("[\u00bc\u00bd\u00be\u2153-\u215e]", "", _fraction),
        (f"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\\.d\\.s|pro-|anti-|s(?:&|&amp;)(?:p-500|ls)|cap{apos}n|c{apos}est)",
         "", _ampersand),
        (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", "", _keep),
        (r"[A-Z]*\$|#", "", _keep),
        ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", "", _currency),
        (f"(?:{acro})\\.", f"{space_nl}+(?:{sentence_starts}|{sgml}){space_nl}", _acronym_ending_sentence),
        (r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\.", f"{space_nl}?{D}", _keep),
        (r"(?i:pt[ey]|co)\.", f"{space}(?i:ltd|lim)", _keep),
        (abbrev_lower, f"{space_nl}(?:{space_nl}|[{upper}]|{sgml})", _period_again),
        (abbrev_lower, "[\\s\\S]{2}", _keep),
        (abbrev_lower, "", _period_again),
        (f"{abbrev_upper_stem}\\.", "", _keep),
        (abbrev_upper_stem, space, _keep),
        (f"(?:{acro})", space_nl, _keep),
        (f"{apos}[0-9][0-9]", space_nl, _keep),
        (f"{LD}+(?:\\.{LD}+)*\\.(?i:{file_types})", f"(?:{space_nl}|[.?!,])", _keep),
        (f"{word}\\.", in_sentence_punct, _no_soft_hyphens),
        (phone, "", _phone_number),
        ('"|(?i:&quot;)', "[A-Za-z0-9$]", _quote(True)),
        ('"|(?i:&quot;)', "", _quote(False)),
        ("\x7f", "", _skip),
        ("<|(?i:&lt;)", "", _as("<")),
        (">|(?i:&gt;)", "", _as(">")),
        ("[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]]", "[^A-Za-z0-9]", _parentheses),
        (
            r"[\^x=~<>]\.\[\^x=~<>]|[-\^x=~<>']_[-\^x=~<>']|\([-\^x=~<>'][_.]?[-\^x=~<>']\)"
            r"|\([\^x=~<>']-[\^x=~<>'`]\)",
            "",
            _parentheses,
        ),
        (r"[{}\[\]()]", "", _bracket),
        ("-+", "", _hyphens),
        ("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", "", _as("...")),
        ("@+|#+|_+", "", _keep),
        (r"\*+|(?:\\\*){1,3}", "", _keep),
        (in_sentence_punct, "", _keep),
        ("[?!]+", "", _keep),
        ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", "", _keep),
        ("[=/]", "", _keep),
        (f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:(?:{acro2})\\.|[A-Za-z0-9\u00ad]+))+\\.", in_sentence_punct,
         _no_soft_hyphens),
        (f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:(?:{acro2})\\.|[A-Za-z0-9\u00ad]+))+", "", _no_soft_hyphens),
        (f"{thing_part}(?:{hyphen}{thing_part})*\\.", in_sentence_punct, _keep),
        (f"{thing_part}(?:{hyphen}{thing_part})*", "", _keep),
        (r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+\.", in_sentence_punct, _ampersand),
        (r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+", "", _ampersand),
        ("'", "[A-Za-z][^ \t\n\r\u00a0]", _quote(True)),
        (clitic, "", _quote(False)),
        (nt, "", _quote(False)),
        (f"''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{{1,2}}|{apos}",
         "", _quote(False)),
        ("<<|>>", "", _keep),
        (f"[{misc_symbol}]", "", _keep),
        (f"\x00|{space}+|[\u200b\u200e\u200f\ufeff]|(?i:&nbsp;)", "", _skip),
        (f"\r\n|[{_LINE_BREAKS}]", "", _as("\n")),
    ]  # fmt: skip
    return _Lexer(table)
