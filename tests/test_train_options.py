"""Training options (issue 19): optimizers, schedules, norm/bias decay, label smoothing, gradient
accumulation, EMA, trackers, best checkpoint, timm students, compile's refusal; the FKD and DeiT-style
configs run; bad settings get one line before anything is written."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CLI_ENV, TRAIN_FLAGS, kdlib_cli, one_line
from safetensors.torch import load_file

from kdlib.checkpoint import LEGACY_TRAINING, training_settings
from kdlib.ema import WeightsEma
from kdlib.errors import ConfigError
from kdlib.optim import Lamb, build_optimizer, param_groups
from kdlib.schedule import lr_schedule, warmup_cosine, warmup_steps
from kdlib.train import TrainConfig, resolve_config, train

REPO = Path(__file__).resolve().parents[1]


# -- the pieces ---------------------------------------------------------------------------------
def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_lamb_matches_timms_step_for_step():
    timm_optim = pytest.importorskip("timm.optim")
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    nets = [_net(), _net()]
    ours = Lamb(param_groups(nets[0], 0.05, decay_norm_bias=False), lr=0.01, weight_decay=0.05)
    theirs = timm_optim.Lamb(
        param_groups(nets[1], 0.05, decay_norm_bias=False), lr=0.01, weight_decay=0.05, max_grad_norm=None
    )
    for _ in range(5):
        for net, opt in zip(nets, (ours, theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    moved = False
    for (name, a), b, start in zip(nets[0].named_parameters(), nets[1].parameters(), _net().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(a, start)
    assert moved
    json.dumps(ours.state_dict()["param_groups"])  # the per-group step is plain JSON for the checkpoint


def test_norm_and_bias_parameters_are_kept_out_of_weight_decay():
    net = _net()
    decay, plain = param_groups(net, 0.1, decay_norm_bias=False)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "3.weight"]
    assert sorted(names[id(p)] for p in plain["params"]) == ["0.bias", "1.bias", "1.weight", "3.bias"]
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    (one,) = param_groups(net, 0.1, decay_norm_bias=True)
    assert len(one["params"]) == 6
    timm = pytest.importorskip("timm")
    vit = timm.create_model("test_vit3", num_classes=3, in_chans=1, img_size=28)
    _, plain = param_groups(vit, 0.05, decay_norm_bias=False)
    vit_names = {id(p): n for n, p in vit.named_parameters()}
    assert vit.pos_embed.ndim == 3 and "pos_embed" in vit.no_weight_decay()
    assert "pos_embed" in {vit_names[id(p)] for p in plain["params"]}  # listed by the model's no_weight_decay()


def test_sgd_settings_reach_torch():
    opt = build_optimizer("sgd", _net(), lr=0.1, weight_decay=1e-4, decay_norm_bias=True, momentum=0.8, nesterov=True)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["nesterov"] is True


def test_schedules():
    assert [lr_schedule("cosine", 100, 10)(s) for s in range(100)] == [warmup_cosine(100, 0.1)(s) for s in range(100)]
    floor = lr_schedule("cosine", 100, 10, min_factor=0.1)
    assert floor(9) == 1.0 and abs(floor(100) - 0.1) < 1e-12 and abs(floor(55) - 0.55) < 1e-12
    step = lr_schedule("step", 100, 5, milestones=[30, 60], gamma=0.5)
    assert [step(s) for s in (0, 4, 29, 30, 59, 60, 99)] == [0.2, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    const = lr_schedule("constant", 50, 4)
    assert [const(s) for s in (0, 3, 49)] == [0.25, 1.0, 1.0]
    assert warmup_steps(1000, epochs=2.5, per_epoch=10) == 25 and warmup_steps(1000, 0.05) == 50
    assert warmup_steps(1000, epochs=0, per_epoch=10) == 1


def test_ema_is_the_exponential_average_of_the_weights():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightsEma(net, 0.9)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        net(torch.randn(4, 2))  # moves the BatchNorm statistics
        ema.update(net)
    want = start["0.weight"] * 0.9**3 + sum(0.1 * 0.9 ** (2 - i) * (start["0.weight"] + i + 1) for i in range(3))
    torch.testing.assert_close(ema.module[0].weight, want)
    assert int(ema.module[1].num_batches_tracked) == 3 and not ema.module[0].weight.requires_grad


def test_defaults_train_as_runs_did_before_the_options():
    """A default config records what checkpoints written before issue 19 trained with (their resume check)."""
    assert training_settings(TrainConfig(out="x")) == LEGACY_TRAINING


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"momentum": 0.9}, ["--momentum", "sgd only", "adamw"]),
        ({"optimizer": "lamb", "nesterov": True}, ["--nesterov", "sgd only", "lamb"]),
        ({"optimizer": "sgd", "nesterov": True, "momentum": 0.0}, ["--nesterov needs momentum"]),
        ({"milestones": [2]}, ["--milestones", "step only", "cosine"]),
        ({"step_gamma": 0.5}, ["--step-gamma", "step only"]),
        ({"schedule": "step"}, ["--schedule step needs --milestones"]),
        ({"schedule": "step", "milestones": [1, 5], "epochs": 4}, ["milestone epoch 5", "--epochs 4"]),
        ({"schedule": "constant", "min_lr": 1e-5}, ["--min-lr", "cosine only"]),
        ({"min_lr": 0.1}, ["--min-lr 0.1 is above the run's lr"]),
        ({"warmup": 0.1, "warmup_epochs": 1}, ["--warmup", "--warmup-epochs", "not both"]),
        ({"ema": 1.0}, ["--ema 1", "(0, 1)"]),
        ({"ema": 0.0}, ["ema=0.0", "> 0"]),
        ({"loss": "kl", "label_smoothing": 0.1}, ["--label-smoothing", "--ce-weight"]),
        ({"keep_best": "top1"}, ["--keep-best top1", "--eval-every"]),
        ({"keep_best": "ema_top1", "eval_every": 1}, ["--ema"]),
        ({"grad_accum": 0}, ["grad_accum=0"]),
        ({"optimizer": "adam"}, ["--optimizer 'adam'", "sgd, adamw, lamb"]),
    ],
)
def test_settings_that_do_not_apply_are_refused(settings, words):
    with pytest.raises(ConfigError) as err:
        TrainConfig(out="x", **settings)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


# -- end to end ---------------------------------------------------------------------------------
def test_options_end_to_end_and_resume_refused_when_they_change(store_dir, tmp_path):
    """SGD + Nesterov, a step schedule, 3 global batches per step (an epoch of 4: a short last step), EMA,
    label smoothing, best by the EMA's top-1, tensorboard: what each writes, and a resume that changes one."""
    out = tmp_path / "run"
    cfg = dict(
        out=str(out),
        shards=store_dir,
        student="resnet8",
        batch_size=64,
        epochs=2,
        workers=0,
        cpu=True,
        optimizer="sgd",
        nesterov=True,
        schedule="step",
        milestones=[1],
        step_gamma=0.5,
        grad_accum=3,
        ema=0.9,
        label_smoothing=0.1,
        ce_weight=0.5,
        keep_best="ema_top1",
        eval_every=1,
        log_with="tensorboard",
        log_every=1,
    )
    result = train(TrainConfig(**cfg))
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert result["steps"] == len(steps) == 4  # 4 global batches of 64 views per epoch: steps of 3 and 1
    assert [r["lr"] for r in steps] == [0.002, 0.001, 0.001, 0.001]  # the lr of the next step; x0.5 at epoch 1
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["training"]["momentum"] == 0.9 and saved["training"]["decay_norm_bias"] is False
    assert saved["views_per_step"] == 192 and json.loads((out / "config.json").read_text())["training"]["nesterov"]
    assert "ema.safetensors" in os.listdir(out / "checkpoint")
    ema_weights = load_file(str(out / "ema" / "model.safetensors"))
    raw = load_file(str(out / "model.safetensors"))
    assert set(ema_weights) == set(raw) and not torch.equal(ema_weights["net.fc.weight"], raw["net.fc.weight"])
    assert result["eval_ema"]["model"] == str(out / "ema") and 0 <= result["eval_ema"]["top1"] <= 1
    best = json.loads((out / "best" / "config.json").read_text())["best"]
    assert best["metric"] == "ema_top1" and best == {k: result["best"][k] for k in best}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "kdlib"))
    events.Reload()
    logged = events.Tags()["scalars"]
    assert "train/loss" in logged and "test_ema/top1" in logged
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps])

    with pytest.raises(ConfigError, match=r"training.ema 0.9 -> 0.99"):
        train(TrainConfig(**{**cfg, "ema": 0.99, "resume": True}))
    assert [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()] == steps  # nothing lost


def _run_until(cmd: list[str], log: Path, n: int) -> bool:
    proc = subprocess.Popen(cmd, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


def test_killed_and_resumed_equals_a_run_without_a_stop(store_dir, tmp_path):
    """LAMB, accumulation and the EMA resume bitwise from the checkpoint of a run killed mid-epoch (CPU)."""
    settings = dict(shards=store_dir, student="resnet8", epochs=2, batch_size=32, grad_accum=3, optimizer="lamb")
    settings.update(ema=0.8, checkpoint_every=1, log_every=1, seed=2, workers=0, eval=False, cpu=True)
    train(TrainConfig(out=str(tmp_path / "whole"), **settings))  # 8 global batches an epoch: steps of 3, 3, 2
    out = tmp_path / "stopped"
    flags = [*TRAIN_FLAGS, "--shards", store_dir, "--epochs", "2", "--batch-size", "32", "--grad-accum", "3"]
    flags += ["--optimizer", "lamb", "--ema", "0.8", "--checkpoint-every", "1", "--log-every", "1", "--seed", "2"]
    cmd = [sys.executable, "-m", "kdlib", "train", *flags, "--out", str(out)]
    assert _run_until(cmd, out / "steps.jsonl", 2), "the run finished before the kill"
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert 1 <= state["step"] < 6
    result = train(TrainConfig(out=str(out), resume=True, **settings))
    assert result["steps"] == 6
    for name in ("model.safetensors", "ema/model.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(out / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    losses = [json.loads(x)["loss"] for x in (out / "steps.jsonl").read_text().splitlines()]
    assert losses == [json.loads(x)["loss"] for x in (tmp_path / "whole" / "steps.jsonl").read_text().splitlines()]


def test_a_setting_that_does_not_apply_is_one_line_before_anything_is_written(store_dir, tmp_path):
    out = tmp_path / "never"
    p = kdlib_cli("train", *TRAIN_FLAGS, "--shards", store_dir, "--momentum", "0.9", "--out", out)
    one_line(p, 2, "--momentum", "sgd only", "adamw")
    assert not out.exists()


def test_compile_is_refused_where_it_cannot_run(store_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers"))  # no C++ compiler to build CPU kernels
    monkeypatch.delenv("CXX", raising=False)
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"--compile cannot run here: .* no C\+\+ compiler"):
        train(TrainConfig(out=str(out), shards=store_dir, compile=True, workers=0, eval=False, cpu=True))
    assert not out.exists()


# -- the configs in train/ --------------------------------------------------------------------------
def _config(name: str, store_dir: str, out: Path, **over) -> TrainConfig:
    path = REPO / "train" / name
    assert f"train/{name}" in "".join(path.read_text().splitlines()[:3]), "a config opens with its command"
    flags = {"out": str(out), "shards": store_dir, "workers": 0, "eval": False, "cpu": True, **over}
    return resolve_config(flags, set(flags), str(path))


def test_fkd_imagenet_resnet50_config_runs(store_dir, tmp_path):
    cfg = _config("fkd_imagenet_resnet50.yaml", store_dir, tmp_path / "r", epochs=1, batch_size=128)
    file = yaml.safe_load((REPO / "train" / "fkd_imagenet_resnet50.yaml").read_text())
    assert (cfg.optimizer, cfg.momentum, cfg.student, cfg.weight_decay) == ("sgd", 0.9, "resnet50", 1e-4)
    assert file["lr"] * file["batch_size"] / file["lr_base_batch"] == pytest.approx(0.2)  # FKD: 0.1 x 1024 / 512
    result = train(cfg)
    steps = [json.loads(x) for x in (tmp_path / "r" / "steps.jsonl").read_text().splitlines()]
    assert result["steps"] == len(steps) >= 2 and all(math.isfinite(r["loss"]) for r in steps)
    saved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert saved["run_lr"] == pytest.approx(0.1 * 128 / 512) and saved["training"]["decay_norm_bias"] is True


def test_deit_style_config_runs_a_timm_student(store_dir, tmp_path):
    pytest.importorskip("timm")
    from kdlib.resolve import load_model

    cfg = _config(
        "deit_style.yaml",
        store_dir,
        tmp_path / "r",
        epochs=1,
        batch_size=64,
        student="timm:test_vit3",
        warmup_epochs=0.5,
    )
    assert (cfg.optimizer, cfg.label_smoothing, cfg.ema, cfg.min_lr) == ("adamw", 0.1, 0.99996, 1e-5)
    result = train(cfg)
    assert result["steps"] >= 2
    model = load_model(str(tmp_path / "r"))  # a timm student's run dir builds again, at the size it trained at
    assert model.arch == "timm:test_vit3" and model.build == {"img_size": 28}
    assert model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, 10)
    assert (tmp_path / "r" / "ema" / "model.safetensors").is_file()
