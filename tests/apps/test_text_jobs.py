"""The bundled text model in the jobs: ``sample --model text`` prints samples with the first-hitting or the ancestral
sampler, ``eval --model text`` prints the sampler table; continuous jobs refuse the masked model, and masked samplers
refuse continuous models, each in one line."""

from __future__ import annotations

import pytest

from diffsamplers.apps.cli import main
from diffsamplers.apps.recipes import parse_solver
from diffsamplers.apps.registry import MaskedModelBundle, load_model
from diffsamplers.apps.text_jobs import format_text_table, run_text_eval, sample_text

from .test_cli import one_line_error

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def text():
    return load_model("text", masked_ok=True)


def test_the_text_model_is_registered_and_loads(text):
    assert isinstance(text, MaskedModelBundle) and text.sequence_length == 128
    assert text.diffusion.mask_id == text.vocab.size == 103 and not text.diffusion.time_conditioned
    with pytest.raises(ValueError, match="masked \\(discrete\\) diffusion model"):
        load_model("text")  # a continuous job
    metrics = text.metadata["metrics"]
    assert metrics["held_out_bpc"] < 3.0  # the model learned the corpus (unigram entropy ≈ 4.4 bits)


def test_samples_are_text_of_the_vocabulary(text):
    texts, nfe, seconds = sample_text(text, "first-hitting:k=32", 0, 3, seed=1)
    assert len(texts) == 3 and all(len(t) == 128 for t in texts) and nfe == 4 and seconds > 0
    assert set("".join(texts)) <= set(text.vocab.symbols)  # no mask left
    again, _, _ = sample_text(text, "first-hitting:k=32", 0, 3, seed=1)
    assert again == texts
    ancestral, nfe, _ = sample_text(text, "ancestral", 4, 2, seed=1)
    assert nfe <= 4 and all(len(t) == 128 for t in ancestral)
    with pytest.raises(ValueError, match="unknown categorical dtype 'float16'"):
        sample_text(text, "first-hitting", 0, 1, dtype="float16")


def test_eval_rows(text):
    methods = [("fhs", "first-hitting:k=32", 0, "float64"), ("anc", "ancestral", 8, "float32")]
    report = run_text_eval(text, num_samples=4, methods=methods)
    fhs, anc = report["rows"]
    assert (fhs["nfe"], fhs["dtype"], anc["dtype"]) == (4, "float64", "float32") and anc["nfe"] <= 8
    held = report["held_out"]
    assert 1.0 < held["ngram_bits_per_char"] < 2.5 and 4.0 < held["unigram_entropy"] < 5.0
    assert all(row["ngram_bits_per_char"] > held["ngram_bits_per_char"] for row in report["rows"])
    assert format_text_table(report).count("\n") == 4


def test_cli_sample_and_eval(capsys):
    assert main(["sample", "--model", "text", "--per-class", "2", "--solver", "first-hitting:k=64"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "2 samples from text with first-hitting:k=64 (2 model calls" in out
    assert main(["eval", "--model", "text", "--num-samples", "2", "--methods", "4 tokens"]) == 0
    out = capsys.readouterr().out
    assert "| first-hitting, 4 tokens per call | float64 | 32 |" in out and "held-out text" in out


def test_samplers_and_models_do_not_mix(capsys):
    line = one_line_error(["sample", "--model", "text", "--solver", "sde-dpm++2m"], capsys)
    assert "samples continuous models; a masked model takes first-hitting, ancestral" in line
    line = one_line_error(["sample", "--model", "digits", "--solver", "first-hitting"], capsys)
    assert "samples masked (discrete) models" in line
    line = one_line_error(["sample", "--model", "text", "--classes", "3"], capsys)
    assert "takes no --classes" in line
    with pytest.raises(ValueError, match="bad option"):
        parse_solver("first-hitting:q=2").build_masked(1)


def test_text_reward_and_guided_samples(text):
    from diffsamplers.apps.recipes import parse_reward
    from diffsamplers.guidance.rewards import TextCharacterShare

    digit = parse_reward("text-chars:digit", text)
    ids = text.vocab.encode("a1b2").view(1, -1)
    masked = ids.clone()
    masked[0, 1] = text.vocab.mask_id  # a mask never counts
    assert digit(ids).tolist() == [0.5] and digit(masked).tolist() == [0.25] and digit.__name__ == "text-chars:digit"
    assert TextCharacterShare(text.vocab.symbols, "ab")(ids).tolist() == [0.5]
    with pytest.raises(ValueError, match="no symbol of the vocabulary"):
        TextCharacterShare(text.vocab.symbols, "\u00e9\u00e8")
    with pytest.raises(ValueError, match="character-level masked model"):
        parse_reward("text-chars:digit", load_model("gmm"))
    plain, _, _ = sample_text(text, "first-hitting:k=4", 0, 4, seed=2)
    steered, _, _ = sample_text(text, "first-hitting:k=4", 0, 4, seed=2, guidance="svdd:m=8,reward=text-chars:digit")

    def share(texts):
        return sum(c.isdigit() for t in texts for c in t) / sum(len(t) for t in texts)

    assert share(steered) > share(plain) + 0.02
    with pytest.raises(ValueError, match="one fk-steering or svdd guidance"):
        sample_text(text, "first-hitting", 0, 2, guidance="2+svdd:m=2,reward=text-chars:digit")


def test_guidance_sweep_script(tmp_path):
    import json
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "text_guidance.py"
    out = tmp_path / "guided.json"
    main_fn = runpy.run_path(str(script), run_name="script")["main"]
    assert main_fn(["--samples", "4", "--counts", "1", "4", "--json", str(out)]) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["SVDD-PM M=4"]["reward"] > rows["SVDD-PM M=1"]["reward"]
    assert rows["FK steering K=4"]["rows_per_sample"] == 4 * rows["FK steering K=4"]["model_calls"]
