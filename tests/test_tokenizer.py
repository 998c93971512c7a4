"""CLIP tokenizer: token ids equal open_clip's on varied text (cleaning, BPE, truncation)."""
import random

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from model.clip import SimpleTokenizer, tokenize  # noqa: E402
from model.clip.tokenizer import default_bpe_path  # noqa: E402

HAND_WRITTEN = [
    "", " ", "\n\t  ", "a", "A", "I", "person", "Person.", "PERSON!!!",
    "A photo of a X X X X person.", "A photo of a X X X X vehicle.", "a photo of a x x x x person",
    "A photo of a person wearing a red jacket and blue jeans, carrying a backpack.",
    "hello   world", "  leading and trailing  ", "tab\tseparated\nlines\r\nand more",
    "don't can't we're they've I'm you'll he'd it's", "DON'T CAN'T WE'RE", "rock'n'roll", "o'clock",
    "Tom &amp; Jerry", "it&#39;s", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp; double escaped", "&quot;quoted&quot;",
    "&nbsp;nbsp", "&copy; 2021", "&#x27;hex entity&#x27;", "a &unknown; entity",
    "café", "naïve résumé", "Crème brûlée", "Straße", "ÀÉÎÕÜ", "ñandú", "Ångström", "Ærøskøbing",
    "東京", "行人再识别", "これは日本語です", "한국어 문장", "Привет, мир", "Γειά σου Κόσμε", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "😀", "I ❤️ NY", "👍🏽 thumbs", "family: 👨‍👩‍👧‍👦", "🇫🇷 flag", "emoji🙂inside", "★☆✓✗→←",
    "Ã©", "cafÃ©", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "Ãºnico", "â€œquotesâ€\x9d",
    "numbers 1234567890", "3.14159", "1,000,000", "x2 4x4 mp3 h264", "2021-07-15T12:00:00Z",
    "e-mail: someone@example.com", "https://example.com/a/b?c=d&e=f", "C:\\path\\to\\file.txt",
    "#hashtag @mention $money 100% ^caret *star (paren) [bracket] {brace}", "...", "?!?!", "---",
    "<start_of_text>", "<end_of_text>", "a <end_of_text> b", "<|startoftext|>hi<|endoftext|>",
    "ﬁ ligature", "ＦＵＬＬＷＩＤＴＨ text", "zero\u200bwidth", "soft\u00adhyphen", "non\u00a0breaking",
    "combining e\u0301", "\u2163 roman numeral", "superscript x\u00b2", "control\x07bell", "\ufeffBOM",
    "word " * 100, "a" * 300, "supercalifragilisticexpialidocious " * 20, "😀" * 80,
    " ".join(str(i) for i in range(200)), "A photo of a X X X X person. " * 10,
]


def _random_strings(n: int, seed: int = 0) -> list:
    """Random mixtures of ascii, accents, CJK, emoji, entities, mojibake and whitespace."""
    rng = random.Random(seed)
    pieces = [
        "person", "vehicle", "photo", "X", "red", "car", "walking", "bag", " ", "  ", "\n", "\t",
        ".", ",", "!", "?", "'s", "'ll", "-", "_", "/", "&amp;", "&#39;", "&lt;", "é", "ü", "ß", "ç",
        "Ã©", "â€™", "東", "京", "人", "😀", "🚗", "❤️", "0", "42", "7.5", "ǅ", "İ", "ﬀ", "ω", "Ж",
    ]
    out = []
    for _ in range(n):
        k = rng.randint(0, 40)
        s = "".join(rng.choice(pieces) for _ in range(k))
        out.append(s.upper() if rng.random() < 0.2 else s)
    return out


TEXTS = HAND_WRITTEN + _random_strings(200)


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer()


def test_matches_open_clip_on_varied_strings():
    assert len(TEXTS) >= 200
    ours = tokenize(TEXTS)
    ref = open_clip.tokenize(TEXTS)
    assert ours.dtype == torch.long and ours.shape == (len(TEXTS), 77)
    bad = [TEXTS[i] for i in range(len(TEXTS)) if not torch.equal(ours[i], ref[i])]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"


@pytest.mark.parametrize("context_length", [5, 16, 100])
def test_matches_open_clip_other_context_lengths(context_length):
    texts = HAND_WRITTEN[:40]
    assert torch.equal(tokenize(texts, context_length=context_length),
                       open_clip.tokenize(texts, context_length=context_length))


def test_truncation_keeps_end_of_text(tokenizer):
    row = tokenize("word " * 100)[0]
    assert row[0] == tokenizer.sot_token_id == 49406
    assert row[-1] == tokenizer.eot_token_id == 49407
    assert row.argmax() == 76


def test_empty_string_and_template(tokenizer):
    assert tokenize("")[0, :3].tolist() == [49406, 49407, 0]
    row = tokenize("A photo of a X X X X person.")[0]
    n = int(row.argmax()) + 1
    assert row[:n].tolist()[1:-1] == tokenizer.encode("a photo of a x x x x person.")
    assert (row[n:] == 0).all() and n == 12  # the ReID template: 10 text tokens + sot + eot


def test_vocab_and_decode_round_trip(tokenizer):
    assert tokenizer.vocab_size == 49408 and default_bpe_path().is_file()
    for text in ["a photo of a person", "café 東京 😀"]:
        assert tokenizer.decode(tokenizer.encode(text)).strip() == text
    ids = tokenizer.encode(TEXTS[-1])
    assert tokenizer.decode(ids) == open_clip.tokenizer._tokenizer.decode(ids)
    assert tokenizer.encode("<start_of_text>") == [49406]
