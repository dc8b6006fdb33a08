"""Sampled soft labels (RS-KD) beside top-k, and FKD's marginal smoothing (issue 21).

A small sampled store (every view keeps its full fp16 logits too, so every draw can be checked) is
precomputed once; its bytes are recomputed here with an independent implementation of the draws.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FMNIST_RECIPE, TRAIN_FLAGS, kdlib_cli, one_line, snapshot

from kdlib import losses
from kdlib.errors import ConfigError, CorruptStoreError
from kdlib.inspect import format_report, inspect_store
from kdlib.precompute import PrecomputeConfig, precompute
from kdlib.softlabel import encode, marginal_target, reconstruct, sampled_target, target_logits
from kdlib.store import open_store
from kdlib.store.codecs import decode_chunk, draw_sampled
from kdlib.targets import StoreTargets

S, T, LIMIT, CHUNK = 5, 2.0, 64, 32


def _flags(teacher: str, out: Path | str, epochs: int = 2) -> dict:
    return dict(
        teacher=teacher,
        data="fashion-mnist",
        out=str(out),
        recipe=FMNIST_RECIPE,
        epochs=epochs,
        limit=LIMIT,
        chunk_views=CHUNK,
        workers=0,
        cpu=True,
        labels="sampled",
        samples=S,
        sample_temperature=T,
        full_sample=1.0,
    )


@pytest.fixture(scope="module")
def sampled_store(teacher_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("sampled") / "store"
    precompute(PrecomputeConfig(**_flags(teacher_dir, out)))
    return str(out)


def _reference_draws(full16: np.ndarray, seed: int, epoch: int, views: int) -> tuple[np.ndarray, np.ndarray]:
    """The draws as the format spec states them, written independently of kdlib: one PCG64 stream per
    (seed, epoch, 7) read in view order, inverse CDF of softmax(logits16 / T), distinct ids + counts padded
    with the highest-logit classes not drawn, sorted by descending logit then id."""
    u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 7]))).random((views, S))
    ids, counts = np.zeros((views, S), np.int64), np.zeros((views, S), np.int64)
    for v in range(views):
        logit = full16[v].astype(np.float64)
        p = np.exp(logit / T - (logit / T).max())
        cdf = np.cumsum(p) / p.sum()
        got = Counter(min(int(np.argmax(cdf > x)) if (cdf > x).any() else len(p) - 1, len(p) - 1) for x in u[v])
        by_logit = sorted(range(len(p)), key=lambda c: (-float(full16[v, c]), c))
        chosen = list(got) + [c for c in by_logit if c not in got][: S - len(got)]
        chosen.sort(key=lambda c: (-float(full16[v, c]), c))
        ids[v], counts[v] = chosen, [got.get(c, 0) for c in chosen]
    return ids, counts


def test_sampled_column_bytes_are_exact(sampled_store):
    store = open_store(sampled_store)
    meta = store.meta
    assert meta.k == S and meta.codecs == [f"sampled:T={T!r}"] and meta.sample_views == CHUNK
    assert {k: v for k, v in meta.fields.items() if k in ("ids", "logits", "counts", "lse")} == {
        "ids": ("uint8", (S,)),
        "logits": ("float16", (S,)),
        "counts": ("uint8", (S,)),
        "lse": ("float32", ()),
    }
    for epoch in range(meta.epochs_done):
        raw = [store.read_chunk(epoch, c) for c in range(meta.chunks_per_epoch)]
        cols = {k: np.concatenate([r[k] for r in raw]) for k in raw[0]}
        ids, counts = _reference_draws(cols["full"], meta.recipe["seed"], epoch, meta.views_per_epoch)
        assert cols["ids"].tobytes() == ids.astype(np.uint8).tobytes()
        assert cols["counts"].tobytes() == counts.astype(np.uint8).tobytes()
        assert cols["logits"].tobytes() == np.take_along_axis(cols["full"], ids, 1).tobytes()
        assert (counts.sum(1) == S).all() and (counts[:, 0] >= 0).all()
        lse = np.log(np.exp(cols["full"].astype(np.float64)).sum(1))
        np.testing.assert_allclose(cols["lse"], lse, atol=2e-3)  # lse of the fp32 logits; full is their fp16
    assert (cols["counts"] > 1).any() and (cols["counts"] == 0).any()  # repeats and padding both exercised


def test_other_batches_and_a_resume_write_the_same_bytes(sampled_store, teacher_dir, tmp_path):
    """The draws are keyed by (seed, epoch, view), so neither the teacher's batches nor which process writes
    a chunk (a rank owns whole chunks: tests/test_distributed.py) nor a resume can move them."""
    other = tmp_path / "other"
    precompute(PrecomputeConfig(**_flags(teacher_dir, other), batch_size=12, test=False))  # 32-view chunks in 12s
    assert open_store(str(other)).content_digest() == open_store(sampled_store).content_digest()

    # a chunk lost before its commit is drawn again, byte for byte, on resume
    before = snapshot(other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "epochs_done": 1}))
    (other / "commits" / "e00001" / "c000001.json").unlink()
    precompute(PrecomputeConfig(**_flags(teacher_dir, other), batch_size=12, test=False))
    after = snapshot(other)
    epoch1 = [k for k in before if "e00001" in k and not k.startswith("logs/")]  # the log has a line more
    assert epoch1 and {k: after[k] for k in epoch1} == {k: before[k] for k in epoch1}
    assert {k for k in after if "e00001" in k and not k.startswith("logs/")} == set(epoch1)


def test_verify_inspect_and_train(sampled_store, teacher_dir, tmp_path):
    from kdlib.verify import verify

    report = verify(sampled_store, teacher_dir, views=32, cpu=True)
    assert report["ok"] and report["top1_in_stored_ids"] > 0 and report["logits_within_tolerance"]

    r = inspect_store(sampled_store, temperature=T)
    assert "re-drawn  128 of 128 sample views reproduce their draws" in format_report(r)
    assert r["sampled"] == {"samples": S, "temperature": T, "draws_checked": 128, "draws_match": 128}
    (kind,) = r["label_kinds"]
    assert kind["kind"] == "sampled" and kind["raw_bytes_per_view"] == S + 2 * S + S + 4
    assert kind["kl_mean"] is None and kind["kl_infinite_share"] > 0  # no mass off the draws
    assert kind["grad_bias"] < 3 * kind["grad_bias_stderr"] + 1e-9  # within noise: unbiased
    assert 0 < r["bytes_per_view"]["labels"] < 2 * kind["raw_bytes_per_view"]

    out = tmp_path / "run"
    p = kdlib_cli("train", "--shards", sampled_store, "--out", out, "--epochs", "1", "-T", str(T), *TRAIN_FLAGS)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "model.safetensors").is_file()


def test_train_api_and_resume(sampled_store, tmp_path, capsys):
    from kdlib.train import TrainConfig, train

    kw = dict(shards=sampled_store, student="resnet8", batch_size=32, workers=0, eval=False, cpu=True)
    kw |= dict(temperature=T, epochs=1, out=str(tmp_path / "run"))
    assert train(TrainConfig(**kw))["steps"] == 2
    steps = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(np.isfinite(x["loss"]) for x in steps)
    capsys.readouterr()
    assert train(TrainConfig(resume=True, **kw))["steps"] == 2  # the checkpoint of a sampled-store run resumes
    assert "resumed from" in capsys.readouterr().out


def test_estimator_is_unbiased_and_top_k_is_not():
    g = torch.Generator().manual_seed(3)
    c, draws = 12, 4000
    teacher = (torch.randn(1, c, generator=g) * 2).half()
    student = torch.randn(1, c, generator=g)

    def grad(target_logits_: torch.Tensor, t: float, loss: str = "kl") -> torch.Tensor:
        s = student.expand(len(target_logits_), c).clone().requires_grad_(True)
        fn = losses.get_loss(loss, **({"temperature": t} if loss == "kl" else {"gamma": 1 / t}))
        (fn(s, target_logits_) * len(s)).backward()
        return s.grad

    full16 = teacher.numpy().repeat(draws, 0)
    u = np.random.default_rng(0).random((draws, S))
    for loss in ("kl", "ttm"):
        d = draw_sampled(full16, u, T)
        y = sampled_target(
            torch.from_numpy(d["ids"]), torch.from_numpy(d["counts"]), torch.from_numpy(d["logits"]), c, T, T
        )
        assert torch.allclose(y.sum(1), torch.ones(draws))
        each = grad(target_logits(y, T), T, loss)
        mean, stderr = each.mean(0), each.std(0) / draws**0.5
        exact = grad(teacher.float(), T, loss)[0]
        assert ((mean - exact).abs() <= 5 * stderr + 1e-6).all(), (loss, mean - exact, stderr)
        # the top-S + lse target, with the same bytes, is off by far more than the noise
        top = encode(teacher.float(), S)
        recon = reconstruct(top["ids"], top["logits"], top["lse"], c)
        assert ((grad(recon, T, loss)[0] - exact).abs() > 10 * stderr).any()


def test_marginal_target_is_fkds_formula(store_dir):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 10, generator=g) * 3
    k = 3
    top = encode(logits, k)
    p = torch.softmax(logits, 1)
    values, idx = p.topk(k, 1)
    fkd = ((1 - values.sum(1, keepdim=True)) / (10 - k)).expand(6, 10).clone().scatter_(1, idx, values)
    y = marginal_target(top["ids"], top["logits"], top["lse"], 10)
    assert torch.allclose(y, fkd, atol=2e-3)  # fp16 storage of the top-k logits
    for t in (1.0, 4.0):  # what train hands a loss: the same distribution whatever the temperature
        assert torch.allclose(torch.softmax(target_logits(y, t) / t, 1), y, atol=1e-6)

    targets = StoreTargets(open_store(store_dir), None, None)
    targets.use("marginal", "kl", 4.0)
    cols = decode_chunk(targets.store.read_chunk(0, 0), targets.store.meta)
    item = {k: torch.from_numpy(np.asarray(cols[k]).astype(np.int64 if k == "ids" else cols[k].dtype)) for k in cols}
    got = torch.softmax(targets.logits(item, torch.device("cpu")) / 4.0, 1)
    want = marginal_target(item["ids"], item["logits"], item["lse"], targets.num_classes)
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ConfigError, match="holds top-3 labels"):
        targets.use("sampled", "kl", 1.0)


def test_bad_input_one_line(sampled_store, teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"--samples 11: .* 1 <= S <= 10 \(the class count\)"):
        precompute(PrecomputeConfig(**{**_flags(teacher_dir, tmp_path / "a"), "samples": 11}))
    topk = {**_flags(teacher_dir, tmp_path / "k"), "labels": "topk", "k": 11}
    with pytest.raises(ConfigError, match=r"--k 11: .* 1 <= k <= 10; .*--k 10 keeps them all"):
        precompute(PrecomputeConfig(**topk))
    p = kdlib_cli(
        "precompute",
        "--teacher",
        teacher_dir,
        "--data",
        "fashion-mnist",
        "--limit",
        "64",
        "--k",
        "11",
        "--out",
        tmp_path / "kcli",
    )
    one_line(p, 2, "--k 11", "1 <= k <= 10")
    assert not (tmp_path / "k").exists() and not (tmp_path / "kcli").exists()
    with pytest.raises(ConfigError, match="sample-temperature"):
        precompute(PrecomputeConfig(**{**_flags(teacher_dir, tmp_path / "b"), "sample_temperature": 0.0}))
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="drop --logits q8"):
        precompute(PrecomputeConfig(**{**_flags(teacher_dir, tmp_path / "c"), "logit_codec": "q8"}))
    from kdlib.targets import choose_targets
    from kdlib.train import TrainConfig

    for loss in ("dist", "wttm", "dih"):
        with pytest.raises(ConfigError, match=f"--loss {loss} needs the teacher's full distribution"):
            choose_targets(TrainConfig(out="x", shards=sampled_store, loss=loss), torch.device("cpu"))

    # a counts column rewritten with valid checksums (not a flipped byte, which crc32 catches)
    bad = tmp_path / "bad"
    shutil.copytree(sampled_store, bad)
    store = open_store(str(bad))
    cols = store.read_chunk(0, 1)
    cols["counts"] = cols["counts"].copy()
    cols["counts"][3, 0] += 1
    store.write_chunk(0, 1, cols)
    with pytest.raises(CorruptStoreError, match="counts add up to"):
        decode_chunk(open_store(str(bad)).read_chunk(0, 1), store.meta)
    one_line(kdlib_cli("inspect", bad), 2, "sampled labels are corrupt", "view row 3", "epoch 0 chunk 1", str(bad))


def test_inspect_top_k_store_reports_both_kinds(store_dir):
    r = inspect_store(store_dir, temperature=4.0)
    kinds = {k["kind"]: k for k in r["label_kinds"]}
    assert set(kinds) == {"topk", "marginal"} and r["sampled"] is None
    for k in kinds.values():
        assert k["kl_mean"] > 0 and k["grad_bias"] > 3 * k["grad_bias_stderr"]  # top-k is biased
