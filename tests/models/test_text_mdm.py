"""The bundled masked diffusion language model's pieces: the character corpus and its split, the time-agnostic
transformer (shapes, bad input), the MDLM objective and its masked-count form against a closed form, the files,
and scripts/train_text_mdm.py end to end with an interrupted and resumed run."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from diffsamplers.artifacts import ArtifactError
from diffsamplers.data.text import (
    CharVocab,
    corpus_topics,
    corpus_vocab,
    fixed_windows,
    load_text_corpus,
    random_windows,
    split_text,
    split_topics,
)
from diffsamplers.models.text_mdm import (
    TextMDM,
    TextMDMConfig,
    load_text_mdm,
    low_discrepancy_times,
    masked_count_nelbo,
    mdlm_loss,
    save_text_mdm,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(vocab_size: int = 11, context_length: int = 16) -> TextMDM:
    torch.manual_seed(0)
    return TextMDM(TextMDMConfig(vocab_size, context_length, d_model=32, n_layers=2, n_heads=2, mlp_ratio=2))


# ---------------------------------------------------------------------------------------------- corpus and split


def test_vocabulary_round_trips_the_whole_corpus():
    topics = corpus_topics()
    vocab = corpus_vocab()
    symbols = set("".join(topics.values()))
    assert vocab.size == len(symbols) == len(vocab) and vocab.mask_id == vocab.size
    assert list(vocab.symbols) == sorted(symbols)
    for key, text in topics.items():
        ids = vocab.encode(text)
        assert ids.dtype == torch.long and ids.shape == (len(text),), key
        assert vocab.decode(ids) == text, key
    assert vocab.decode([0, vocab.mask_id, 1], mask_char="_") == vocab.symbols[0] + "_" + vocab.symbols[1]
    assert vocab.decode_batch(torch.tensor([[0, 1], [1, 0]])) == [vocab.symbols[:2], vocab.symbols[1::-1]]


def test_vocabulary_errors_name_the_value():
    vocab = CharVocab("abc")
    with pytest.raises(ValueError, match=r"character 'é' \(U\+00E9\) at position 2"):
        vocab.encode("abéc")
    with pytest.raises(ValueError, match=r"token id 4 is outside \[0, 3\]"):
        vocab.decode([0, 4])
    with pytest.raises(ValueError, match=r"token id -1"):
        vocab.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="sorted"):
        CharVocab("ba")
    with pytest.raises(ValueError, match="distinct"):
        CharVocab("aab")


def test_split_is_deterministic_disjoint_and_by_sorted_key():
    train, held = split_topics()
    assert (train, held) == split_topics()
    keys = sorted(corpus_topics())
    assert not set(train) & set(held) and sorted(train + held) == keys
    assert held == keys[-len(held) :] and len(held) == round(0.1 * len(keys))
    assert split_text("all") == split_text("train") + split_text("held_out")
    corpus = load_text_corpus()
    assert corpus.train.numel() + corpus.held_out.numel() == len(split_text("all"))
    assert corpus.vocab.decode(corpus.held_out[:200]) == split_text("held_out")[:200]
    with pytest.raises(ValueError, match="held_out_fraction must lie in \\(0, 1\\), got 1.5"):
        split_topics(1.5)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        split_text("test")


def test_windows():
    ids = torch.arange(100)
    w = random_windows(ids, 10, 7, torch.Generator().manual_seed(1))
    assert w.shape == (7, 10)
    assert torch.equal(w - w[:, :1], torch.arange(10).expand(7, 10))  # contiguous slices of the text
    assert torch.equal(w, random_windows(ids, 10, 7, torch.Generator().manual_seed(1)))
    f = fixed_windows(ids, 30)
    assert torch.equal(f, ids[:90].view(3, 30)) and fixed_windows(ids, 30, max_windows=2).shape == (2, 30)
    with pytest.raises(ValueError, match="shorter than the window length 101"):
        random_windows(ids, 101, 1, torch.Generator())


# ---------------------------------------------------------------------------------------------- the network


def test_shapes_time_agnostic_and_bidirectional():
    model = tiny().eval()
    x = torch.randint(0, 12, (3, 16), generator=torch.Generator().manual_seed(0))  # mask id 11 included
    logits = model(x)
    assert logits.shape == (3, 16, 11) and logits.dtype == torch.float32
    assert torch.equal(model(x, torch.rand(3)), logits) and torch.equal(model(x, 0.3), logits)
    assert model(x[:, :5]).shape == (3, 5, 11)  # shorter than the context
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % 11
    assert not torch.allclose(model(changed)[:, 0], logits[:, 0])  # the first position sees the last one
    real = x.clamp(max=10)
    masked = real.clone()
    masked[:, 3] = model.mask_id  # the mask has its own embedding
    assert not torch.allclose(model(masked)[:, 0], model(real)[:, 0])


def test_bad_inputs_are_named():
    model = tiny()
    ok = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token id 12 is outside \[0, 11\]"):
        model(torch.cat([ok[:, :15], torch.full((2, 1), 12)], dim=1))
    with pytest.raises(ValueError, match="token id -3"):
        model(torch.full((1, 4), -3))
    with pytest.raises(ValueError, match="length 17 is longer than the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids, got torch.float32"):
        model(ok.float())
    with pytest.raises(ValueError, match=r"\(B, L\) token ids"):
        model(ok[0])
    with pytest.raises(ValueError, match=r"d_model \(30\) must be an even multiple of n_heads \(4\)"):
        TextMDMConfig(10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match=r"d_model \(12\) must be an even multiple of n_heads \(4\)"):
        TextMDMConfig(10, d_model=12, n_heads=4)
    with pytest.raises(ValueError, match="vocab_size must be a positive integer, got 0"):
        TextMDMConfig(0)


def test_default_network_is_a_few_megabytes():
    model = TextMDM(TextMDMConfig(corpus_vocab().size))
    assert model.context_length == 128 and model.mask_id == corpus_vocab().size
    assert 4 * sum(p.numel() for p in model.parameters()) < 4_000_000


# ---------------------------------------------------------------------------------------------- the objective


class Oracle:
    """A model of known cross-entropy: the true token's logit is a · (fraction of unmasked tokens), others 0, so
    with n of L tokens masked every masked position costs CE(n) = log(1 + (V − 1) e^{−a (L − n)/L})."""

    def __init__(self, x0: torch.Tensor, vocab_size: int, a: float = 4.0):
        self.x0, self.v, self.a, self.mask_id = x0, vocab_size, a, vocab_size

    def __call__(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        b, n = x.shape
        score = self.a * (x != self.mask_id).double().mean(dim=1)
        logits = torch.zeros(b, n, self.v, dtype=torch.float64)
        return logits.scatter(2, self.x0[:, :, None], score[:, None, None].expand(b, n, 1))

    def exact_nelbo_per_char(self, length: int) -> float:
        """(1/L) Σ_{n=1}^{L} CE(n): the continuous-time NELBO per character of the linear schedule."""
        ce = [math.log1p((self.v - 1) * math.exp(-self.a * (length - n) / length)) for n in range(1, length + 1)]
        return sum(ce) / length


def test_mdlm_loss_and_masked_count_form_match_the_closed_form():
    """The 1/t ELBO weight (Sahoo et al. 2024 Eq. 10–11) and the masked-count form (Zheng et al. 2024 Prop. 3.1)
    both estimate Σ_n CE(n) / L; another weight (none, 1/t², …) would miss it by far more than the tolerance."""
    v, length, batch = 5, 8, 4096
    x0 = torch.randint(0, v, (batch, length), generator=torch.Generator().manual_seed(0))
    oracle = Oracle(x0, v)
    exact = oracle.exact_nelbo_per_char(length)
    gen = torch.Generator().manual_seed(1)
    estimates = torch.tensor([float(mdlm_loss(oracle, x0, gen)) for _ in range(40)])
    se = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - exact) < 4 * se + 2e-3 * exact  # ε = 1e-3 drops ≤ ε · CE per char
    assert se < 0.02 * exact
    # masked-count form: stratified counts visit every n exactly batch / L times, so it is exact here
    nelbo = masked_count_nelbo(oracle, x0, torch.Generator().manual_seed(2))
    assert nelbo.shape == (batch,) and float(nelbo.mean()) == pytest.approx(exact, rel=1e-6)  # float32 cross-entropy
    counts = torch.full((batch,), 3)
    ce3 = math.log1p((v - 1) * math.exp(-4.0 * 5 / 8))
    assert torch.allclose(
        masked_count_nelbo(oracle, x0, torch.Generator(), counts=counts), torch.tensor(ce3), atol=1e-6
    )
    with pytest.raises(ValueError, match="counts must be"):
        masked_count_nelbo(oracle, x0, torch.Generator(), counts=torch.zeros(batch))


def test_low_discrepancy_times_cover_the_interval():
    t = low_discrepancy_times(64, torch.Generator().manual_seed(0), eps=0.1)
    assert t.shape == (64,) and float(t.min()) >= 0.1 and float(t.max()) <= 1.0
    strata = torch.floor((t - 0.1) / 0.9 * 64).long().sort().values
    assert torch.equal(strata, torch.arange(64))  # one time in each of 64 equal strata


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    model = tiny().train()
    x0 = torch.randint(0, 11, (16, 16), generator=torch.Generator().manual_seed(3))
    before = mdlm_loss(model, x0, torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = mdlm_loss(model, x0, torch.Generator().manual_seed(4))  # the same times and masks
    assert float(after) < float(before.detach()) - 0.01  # measured: 2.291 → 2.257 nats per character


# ---------------------------------------------------------------------------------------------- files


def test_save_load_round_trip_and_errors(tmp_path):
    model, vocab = tiny(vocab_size=4), CharVocab("\nabc")
    save_text_mdm(model, vocab, tmp_path / "m", {"metrics": {"held_out_bpc": 1.5}})
    loaded, vocab2, meta = load_text_mdm(tmp_path / "m")
    assert vocab2 == vocab and meta["metrics"]["held_out_bpc"] == 1.5 and meta["vocab"] == "\nabc"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.tensor([[0, 1, 4, 3]])
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing .*scripts/train_text_mdm.py"):
        load_text_mdm(tmp_path / "nothing")
    with pytest.raises(ValueError, match="the vocabulary has 3 symbols, the model 4"):
        save_text_mdm(model, CharVocab("abc"), tmp_path / "bad", {})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architecture"]["d_model"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="does not match"):
        load_text_mdm(tmp_path / "m")


# ---------------------------------------------------------------------------------------------- the training script


def _train(*args) -> int:
    main = runpy.run_path(str(ROOT / "scripts" / "train_text_mdm.py"), run_name="script")["main"]
    return main([str(a) for a in args])


TINY = (
    "--iterations", 4, "--batch-size", 4, "--context-length", 16, "--d-model", 16, "--layers", 1, "--heads", 2,
    "--mlp-ratio", 2, "--warmup", 2, "--eval-every", 2, "--eval-windows", 4, "--final-eval-draws", 1,
    "--device", "cpu",
)  # fmt: skip


def test_training_script_runs_and_resumes_to_the_same_weights(tmp_path, capsys):
    straight = tmp_path / "straight"
    assert _train(*TINY, "--ngram-order", 2, "--output", straight, "--checkpoint", tmp_path / "a.pt") == 0
    model, vocab, meta = load_text_mdm(straight)
    assert vocab == corpus_vocab() and meta["training"]["iterations"] == 4 and meta["time_conditioned"] is False
    assert [row["iteration"] for row in meta["log"]] == [2, 4]
    metrics = meta["metrics"]
    assert math.isfinite(metrics["held_out_bpc"]) and 0 < metrics["held_out_bpc"] < 2 * math.log2(vocab.size)
    assert metrics["held_out_windows"] == load_text_corpus().held_out.numel() // 16
    assert 0 < metrics["ngram2_held_out_bpc"] < math.log2(vocab.size)

    resumed = tmp_path / "resumed"
    common = (*TINY, "--ngram-order", 0, "--output", resumed, "--checkpoint", tmp_path / "b.pt")
    assert _train(*common, "--stop-at", 2) == 0
    assert not resumed.exists() and torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 2
    assert _train(*common) == 0
    assert "resumed from" in capsys.readouterr().out
    again, _, meta2 = load_text_mdm(resumed)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert meta2["metrics"]["held_out_bpc"] == metrics["held_out_bpc"]
    with pytest.raises(SystemExit, match=r"other settings .*'lr': \(0.002, 0.001\)"):
        _train(*common, "--lr", 1e-3)
