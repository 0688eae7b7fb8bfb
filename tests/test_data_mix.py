"""Calibration data from several sources (``--data A:0.75 --data dir/:0.25``): each source's share
of the windows, windows drawn from one source each, the same windows for the same seed, the
one-source windows unchanged, bad shares refused in one sentence, and the checkpoint's metadata."""

from __future__ import annotations

import pytest
import torch

from calibration.data import DataError, calibration_mix, calibration_windows, parse_sources, token_windows
from conftest import corpus, save_tiny_model_dir

SEQ = 16


class CharTokenizer:
    """One token per character (its code point): a window's tokens say which text it came from."""

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) for c in text]}


@pytest.fixture
def texts(tmp_path):
    """Source A: lowercase letters only; source B, a folder of two files: digits only."""
    g = torch.Generator().manual_seed(1)
    a = tmp_path / "a.txt"
    a.write_text("".join(chr(97 + i) for i in torch.randint(0, 26, (3000,), generator=g).tolist()))
    b = tmp_path / "digits"
    b.mkdir()
    for name in ("1.txt", "2.txt"):
        (b / name).write_text("".join(str(i) for i in torch.randint(0, 10, (800,), generator=g).tolist()))
    return a, b


def source_of(window: torch.Tensor) -> str:
    chars = "".join(map(chr, window.tolist()))
    if chars.isalpha():
        return "a"
    assert all(c.isdigit() or c == "\n" for c in chars), f"window mixes sources: {chars!r}"
    return "digits"


def test_shares_are_respected(texts):
    a, b = texts
    windows, record = calibration_mix(CharTokenizer(), [f"{a}:0.75", f"{b}/:0.25"], 16, SEQ, seed=0)
    assert windows.shape == (16, SEQ)
    kinds = [source_of(w) for w in windows]
    assert kinds.count("a") == 12 and kinds.count("digits") == 4
    assert kinds[:12] != ["a"] * 12  # shuffled: a batch of 8 mixes the sources
    text_a, text_b = a.read_text(), "\n\n".join(p.read_text() for p in sorted(b.iterdir()))
    for w in windows:  # every window is a contiguous piece of its own source
        chars = "".join(map(chr, w.tolist()))
        assert chars in (text_a if source_of(w) == "a" else text_b)
    assert record == [{"source": "a.txt", "share": 0.75, "windows": 12, "source_tokens": 3000},
                      {"source": "digits", "share": 0.25, "windows": 4, "source_tokens": 1602}]


def test_uneven_shares_round_to_the_window_count(texts):
    a, b = texts
    _, record = calibration_mix(CharTokenizer(), [f"{a}:0.7", f"{b}:0.3"], 6, SEQ)
    assert [r["windows"] for r in record] == [4, 2]  # 4.2 / 1.8: the largest remainder takes the 6th
    windows, record = calibration_mix(CharTokenizer(), [str(a), str(b)], 6, SEQ)  # no shares: equal
    assert [r["share"] for r in record] == [0.5, 0.5] and [source_of(w) for w in windows].count("a") == 3


def test_same_seed_same_windows(texts):
    a, b = texts
    values = [f"{a}:0.5", f"{b}:0.5"]
    first = calibration_mix(CharTokenizer(), values, 12, SEQ, seed=3)[0]
    assert torch.equal(first, calibration_mix(CharTokenizer(), values, 12, SEQ, seed=3)[0])
    assert not torch.equal(first, calibration_mix(CharTokenizer(), values, 12, SEQ, seed=4)[0])


def test_one_source_draws_as_before(texts):
    """A single --data keeps the windows of earlier releases (token_windows with the seed)."""
    a, _ = texts
    ids = torch.tensor([ord(c) for c in a.read_text()])
    assert torch.equal(calibration_windows(CharTokenizer(), str(a), 8, SEQ, seed=5), token_windows(ids, 8, SEQ, 5))
    assert torch.equal(calibration_windows(CharTokenizer(), [f"{a}:1"], 8, SEQ, seed=5), token_windows(ids, 8, SEQ, 5))


@pytest.mark.parametrize("values,message", [
    (["{a}:0", "{b}:1"], "share 0 is not in (0, 1]"),
    (["{a}:1.5"], "share 1.5 is not in (0, 1]"),
    (["{a}:-0.5", "{b}:1.5"], "share -0.5 is not in (0, 1]"),
    (["{a}:nan"], "share nan is not in (0, 1]"),
    (["{a}:half", "{b}"], "share 'half' is not a number"),
    (["{a}:0.5", "{b}:0.4"], "the shares sum to 0.9, not 1"),
    (["{a}:0.5", "{b}"], "give a share to every source or to none (no share: {b})"),
    (["{a}:0.95", "{b}:0.05"], "a share of 0.05 of 8 windows is no window"),
    (["{a}:0.5", "{a}x:0.5"], "{a}x: no such file or folder"),
])
def test_bad_shares_are_refused(texts, values, message):
    a, b = texts
    with pytest.raises(DataError) as e:
        calibration_mix(CharTokenizer(), [v.format(a=a, b=b) for v in values], 8, SEQ)
    assert message.format(a=a, b=b) in str(e.value)


def test_colons_that_are_not_shares(tmp_path):
    from calibration.data import Source

    odd = tmp_path / "notes:0.5"  # a path that exists is never split
    odd.write_text("x")
    assert Source.parse(str(odd)) == Source(str(odd))
    assert Source.parse(f"{odd}:0.25") == Source(str(odd), 0.25)
    assert Source.parse("hf:wikitext:wikitext-2-raw-v1:train") == Source("hf:wikitext:wikitext-2-raw-v1:train")
    assert Source.parse("hf:c4:en:train:0.5") == Source("hf:c4:en:train", 0.5)


def test_checkpoint_records_the_mix(tmp_path):
    """`vllm-dpq quantize --data A:0.75 --data B:0.25`: the checkpoint says what was drawn from where."""
    from calibration.cli import quantize_main
    from vllm_dpq.format import read_checkpoint

    sense = corpus("austen_sensesensibility.txt")
    model = save_tiny_model_dir(tmp_path / "tiny", layers=1, text=sense.read_text()[:50_000])
    other = tmp_path / "spare"
    other.mkdir()
    (other / "part.txt").write_text(sense.read_text()[-60_000:])
    out = tmp_path / "ck"
    assert quantize_main([str(model), str(out), "--data", f"{sense}:0.75", "--data", f"{other}:0.25",
                          "--num-samples", "8", "--seq-len", "64", "--method", "rtn"]) == 0
    cal = read_checkpoint(out).config.calibration
    assert cal["data"] == "austen_sensesensibility.txt:0.75 + spare:0.25"
    assert [(s["source"], s["share"], s["windows"]) for s in cal["sources"]] == \
        [("austen_sensesensibility.txt", 0.75, 6), ("spare", 0.25, 2)]
    assert cal["num_samples"] == 8 and cal["seed"] == 0
    assert cal["bos"] is False  # this tokenizer does not start a text with its BOS token <s>
    assert quantize_main([str(model), str(out), "--data", str(sense), "--num-samples", "4", "--seq-len", "64",
                          "--method", "rtn", "--bos", "--overwrite"]) == 0
    assert read_checkpoint(out).config.calibration["bos"] is True


class BosCharTokenizer(CharTokenizer):
    """CharTokenizer that, like Gemma's, starts every text it encodes with its BOS token (id 1)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [1] * add_special_tokens + super().__call__(text)["input_ids"]}


def test_windows_start_with_bos_where_the_tokenizer_adds_it(texts):
    """Default: a tokenizer that adds BOS to a text gets windows of BOS + seq_len - 1 text tokens
    (the draw of windows that long), from one source or several; --no-bos gives the plain windows."""
    a, b = texts
    ids = torch.tensor([ord(c) for c in a.read_text()])
    windows = calibration_windows(BosCharTokenizer(), str(a), 8, SEQ, seed=5)
    assert windows.shape == (8, SEQ) and (windows[:, 0] == 1).all()
    assert torch.equal(windows[:, 1:], token_windows(ids, 8, SEQ - 1, 5))
    assert torch.equal(calibration_windows(BosCharTokenizer(), str(a), 8, SEQ, seed=5, bos=False),
                       token_windows(ids, 8, SEQ, 5))
    mixed, _ = calibration_mix(BosCharTokenizer(), [str(a), str(b)], 12, SEQ, seed=3)
    assert (mixed[:, 0] == 1).all() and {source_of(w[1:]) for w in mixed} == {"a", "digits"}


def test_bos_without_a_bos_token_is_refused(texts):
    a, _ = texts
    assert torch.equal(calibration_windows(CharTokenizer(), str(a), 4, SEQ), calibration_windows(
        CharTokenizer(), str(a), 4, SEQ, bos=False))  # no BOS token: plain windows by default
    with pytest.raises(DataError, match="this tokenizer has no BOS token"):
        calibration_windows(CharTokenizer(), str(a), 4, SEQ, bos=True)
