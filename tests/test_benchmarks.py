"""Benchmarks: the result-line format parses, benchmarks.flops prints its four ratio lines for the
tiny shape (dual tower about one tower, the naive reference about two), and the measuring helpers
(encoder-call counting, CPU tensor-memory peak) measure what they claim."""

from __future__ import annotations

import torch

from benchmarks import common, flops
from benchmarks.vae_calls import EncoderCalls


def test_result_lines_parse_and_other_lines_do_not():
    assert common.parse_line("ratio flops.tiny.dual_tower/single_tower 0.997") == (
        "ratio", "flops.tiny.dual_tower/single_tower", 0.997)
    assert common.parse_line("count vae_encoder_calls_in_training 0") == (
        "count", "vae_encoder_calls_in_training", 0.0)
    for line in ("# ratio a 1", "ratio a", "ratio a b", "speed a 1.0", "ratio a 1 2", ""):
        assert common.parse_line(line) is None, line
    text = "# note\nratio a 1.5\nnoise\ncount b 3\n"
    assert [r.name for r in common.parse_lines(text)] == ["a", "b"]


def test_emit_writes_a_line_the_parser_reads(capsys):
    common.emit("ratio", "step_time.tiny.dual_tower/single_tower", 1.0412)
    common.note("a note")
    out = capsys.readouterr().out
    assert common.parse_lines(out) == [("ratio", "step_time.tiny.dual_tower/single_tower", 1.041)]
    assert out.splitlines()[1] == "# a note"


def test_flops_prints_a_ratio_line_per_variant_for_the_tiny_shape(capsys, monkeypatch):
    monkeypatch.setattr(flops, "SHAPES", {"tiny": flops.SHAPES["tiny"]})  # skip the 1B shape
    flops.main()
    out = capsys.readouterr().out
    lines = common.parse_lines(out)
    n = len(flops.VARIANTS) + 1
    assert len(out.strip().splitlines()) == len(lines) == n  # nothing but result lines
    assert [(r.kind, r.name) for r in lines] == [
        *(("ratio", f"flops.tiny.{v}/single_tower") for v in flops.VARIANTS),
        ("ratio", "flops.tiny.x_fuse_dit/dual_tower")]
    ratio = {r.name.split(".")[2].split("/")[0]: r.value for r in lines[:-1]}
    # config/tiny.yaml's DiT tower (2 blocks of 64 beside 4 Llama layers of 128) is cheaper
    # than the copied tower, X-Fuse on image queries adds the text layer's answers
    assert 0.5 <= lines[-1].value <= 1.5
    assert 0.9 <= ratio["dual_tower"] <= 1.1  # each tower asks queries for its own tokens only
    assert 1.7 <= ratio["naive_dual_tower"] <= 2.3  # both towers on every token


def test_encoder_calls_counts_every_codec_and_restores_it():
    from xfusion.codec import ImageCodec, build_codec
    from xfusion.config import ImageCodecConfig

    codec = build_codec(ImageCodecConfig())
    original = ImageCodec.encode
    with EncoderCalls() as calls:
        codec.encode(torch.zeros(2, 3, 8, 8))
        codec.encode(torch.zeros(1, 3, 8, 8))
    assert calls.n == 2
    assert ImageCodec.encode is original


def test_cpu_peak_memory_sees_the_tensors_a_function_allocates():
    def step():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # +4 MiB live at once
        del a, b
        torch.ones(256, 1024)  # 1 MiB, after the peak

    peak = common.peak_allocated_bytes(step, torch.device("cpu"))
    assert 8 * 2**20 <= peak < 9 * 2**20
