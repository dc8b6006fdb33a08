"""`make demo`: what kdlib is for, on Fashion-MNIST, through the real CLI, in a few minutes on 2 cores.

Each step is printed as the exact command a user would type, and run as one:

1. the teacher is paid for **once**: trained on labels, then `precompute` stores its soft labels for a
   few epochs of augmented views (and its predictions on the test split), and `verify` re-checks them;
2. several students are distilled **from that one store**, no teacher in memory (two losses here);
3. the same student is distilled **online** (teacher in memory, same recipe and epochs): the cost the
   cache saves on every student after the first;
4. the same student trained on **labels only** (CE), same recipe and epochs: the control.

Then a table (test top-1, agreement with the teacher, seconds) is printed and written to
``<out>/demo.md`` and ``<out>/demo.json``, and one picture, ``<out>/demo.png``: each student's test
top-1 after every epoch against its training seconds (matplotlib is optional: without it, no picture).

How the settings were chosen (never on the test split) is in README.md, "Results".
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._demo_plot import save_demo_plot  # matplotlib itself is imported there, when it is there

__all__ = ["Settings", "run_demo", "DEMO_SETTINGS", "QUICK_SETTINGS"]

RECIPE = "precompute/fmnist.yaml"


@dataclass(frozen=True)
class Settings:
    """The demo's sizes: images, teacher and student architectures and epochs, losses."""

    limit: int  # first N images of the train split (and of the test split: the store's test predictions)
    teacher: str
    teacher_epochs: int
    stored_epochs: int  # epochs of views the teacher labels once
    student: str
    epochs: int  # student epochs; more than stored_epochs cycles the stored ones (the trainer says so)
    losses: tuple[str, ...]  # one cached student per loss; the first is also trained online
    batch_size: int = 128
    verify_views: int = 256
    extra: dict = field(default_factory=dict)  # loss -> extra train flags (e.g. a temperature)


# Chosen on a validation range of the *training* split (images 55,000-59,999, never trained on), from the
# fidelity table's evidence (README.md): see README.md "Results" and benchmarks/demo_settings.py.
DEMO_SETTINGS = Settings(
    limit=4000,
    teacher="resnet20x2",
    teacher_epochs=3,
    stored_epochs=2,
    student="resnet8",
    epochs=4,
    losses=("kl", "dist"),
)
QUICK_SETTINGS = Settings(
    limit=384,
    teacher="resnet14",
    teacher_epochs=1,
    stored_epochs=1,
    student="resnet8",
    epochs=2,
    losses=("kl", "dist"),
    verify_views=32,
)


def _env() -> dict:
    # One intra-op thread per process: on a small shared machine two OpenMP threads that wait on each other
    # while the DataLoader workers (and other users) hold the cores made every step several times slower
    # (measured on the 2-core box under load: resnet20x2 training 30 vs 131 views/s). A value set by the user wins.
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(args: list[str], log: list) -> tuple[str, float]:
    print(f"\n$ kdlib {shlex.join(args)}", flush=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "kdlib", *args], stdout=subprocess.PIPE, text=True, env=_env())
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        raise SystemExit(f"demo step failed (exit {proc.returncode}): kdlib {shlex.join(args)}")
    seconds = time.time() - t0
    print(f"  ({seconds:.0f} s)", flush=True)
    log.append({"command": "kdlib " + shlex.join(args), "seconds": round(seconds, 1)})
    return proc.stdout, seconds


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def _verify_summary(text: str) -> dict:
    """The headline of `kdlib verify`'s JSON report (top-1 agreement, logit error, ok)."""
    try:
        report = json.loads(text[text.index("{") :])
    except ValueError:
        return {"output": text.strip()[-500:]}
    return {k: report.get(k) for k in ("views", "top1_agreement", "max_logit_error", "ok")}


def _metrics(run: str) -> tuple[list[dict], dict | None]:
    """Per-epoch records and the final evaluation of a run's metrics.jsonl."""
    recs = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    final = next((r["final_eval"] for r in recs if "final_eval" in r), None)
    return [r for r in recs if "epoch" in r], final


def _curve(run: str) -> list[tuple[float, float]]:
    """(cumulative training seconds, test top-1) after every epoch; the last point is the final evaluation."""
    epochs, final = _metrics(run)
    points, total = [], 0.0
    for r in epochs:
        total += r["seconds"]
        if "eval" in r:
            points.append((total, r["eval"]["top1"]))
    if final is not None:
        points.append((total, final["top1"]))
    return points


def run_demo(
    out: str = "runs/demo", shards: str = "shards/demo", quick: bool = False, settings: Settings | None = None
) -> dict:
    """Run the demo through the real CLI (teacher once, students from its store, online KD and CE); -> its table as a dict."""
    s = settings or (QUICK_SETTINGS if quick else DEMO_SETTINGS)
    common = ["--data", "fashion-mnist", "--limit", str(s.limit)]
    recipe = RECIPE if Path(RECIPE).exists() else str(Path(__file__).resolve().parent.parent / RECIPE)
    batch = ["--batch-size", str(s.batch_size)]
    teacher = f"{out}/teacher"
    log: list = []
    t_start = time.time()
    print(
        f"kdlib demo: Fashion-MNIST, first {s.limit} training images (test: first {s.limit} test images); "
        f"runs in {out}, store in {shards}; OMP_NUM_THREADS={_env()['OMP_NUM_THREADS']}"
    )

    # 1. The teacher, paid once.
    _, t_train = _run(
        [
            "train",
            *common,
            "--model",
            s.teacher,
            "--loss",
            "ce",
            "--recipe",
            recipe,
            "--epochs",
            str(s.teacher_epochs),
            *batch,
            "--no-eval",
            "--overwrite",
            "--out",
            teacher,
        ],
        log,
    )
    _, t_pre = _run(
        [
            "precompute",
            "--teacher",
            teacher,
            *common,
            "--recipe",
            recipe,
            "--epochs",
            str(s.stored_epochs),
            "--out",
            shards,
        ],
        log,
    )
    t_train, t_pre = round(t_train, 1), round(t_pre, 1)  # the table, the JSON and the picture show the same numbers
    verify, t_verify = _run(["verify", "--shards", shards, "--teacher", teacher, "--views", str(s.verify_views)], log)

    # 2. Students from the one store (no teacher in memory); 3. online KD; 4. labels only.
    runs = []
    student_flags = ["--student", s.student, "--epochs", str(s.epochs), *batch, "--eval-every", "1"]
    for loss in s.losses:
        runs.append(
            {
                "name": f"{s.student}, {loss.upper()} from the store",
                "kind": "cached",
                "loss": loss,
                "out": f"{out}/{s.student}-{loss}-cached",
                "args": ["train", "--shards", shards, *student_flags, "--loss", loss, *s.extra.get(loss, [])],
            }
        )
    loss0 = s.losses[0]
    runs.append(
        {
            "name": f"{s.student}, {loss0.upper()} online (teacher in memory)",
            "kind": "online",
            "loss": loss0,
            "out": f"{out}/{s.student}-{loss0}-online",
            "args": [
                "train",
                "--teacher",
                teacher,
                *common,
                "--recipe",
                recipe,
                *student_flags,
                "--loss",
                loss0,
                *s.extra.get(loss0, []),
            ],
        }
    )
    runs.append(
        {
            "name": f"{s.student}, CE on labels",
            "kind": "ce",
            "loss": "ce",
            "out": f"{out}/{s.student}-ce",
            "args": ["train", *common, "--recipe", recipe, *student_flags, "--loss", "ce"],
        }
    )
    for r in runs:
        _, r["command_s"] = _run([*r["args"], "--overwrite", "--out", r["out"]], log)
        epochs, final = _metrics(r["out"])
        r["train_s"] = sum(e["seconds"] for e in epochs)
        if final is None or "agreement" not in final:  # online and CE runs: agreement from the store's test predictions
            final = _last_json(
                _run(
                    ["eval", "--model", r["out"], "--split", "test", "--limit", str(s.limit), "--shards", shards], log
                )[0]
            )
        r.update(
            top1=final["top1"],
            agreement=final["agreement"],
            teacher_top1=final.get("teacher_top1"),
            test_images=final["images"],
            curve=_curve(r["out"]),
        )
        r.pop("args")

    teacher_top1 = next(r["teacher_top1"] for r in runs if r.get("teacher_top1") is not None)
    online = next(r for r in runs if r["kind"] == "online")
    table = _table(s, runs, teacher_top1, t_train, t_pre, online, _verify_summary(verify))
    total = time.time() - t_start
    print("\n" + table)
    result = {
        "settings": asdict(s),
        "recipe": RECIPE,
        "teacher": {
            "arch": s.teacher,
            "top1": teacher_top1,
            "train_s": round(t_train, 1),
            "precompute_s": round(t_pre, 1),
            "verify_s": round(t_verify, 1),
            "verify": _verify_summary(verify),
        },
        "students": runs,
        "total_s": round(total, 1),
        "load_average": list(os.getloadavg()),
        "steps": log,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "demo.md").write_text(table + "\n")
    (Path(out) / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    png = save_demo_plot(result, Path(out) / "demo.png")
    print(
        f"\ntable: {out}/demo.md, numbers: {out}/demo.json"
        + (f", picture: {png}" if png else "")
        + f"; runs in {out}, store in {shards}; total {total:.0f} s (load average {os.getloadavg()[0]:.1f})"
    )
    return result


def _table(
    s: Settings, runs: list[dict], teacher_top1: float, t_train: float, t_pre: float, online: dict, verify: dict
) -> str:
    n_test = runs[0]["test_images"]
    lines = [
        f"Fashion-MNIST, first {s.limit} training images, {s.epochs} student epochs ({s.stored_epochs} stored "
        f"epochs, cycled), recipe {RECIPE}; test top-1 and agreement with the teacher on the first {n_test} "
        f"test images. Seconds: training only (sum of the epochs; start-up and evaluations not counted).",
        "",
        "| run | test top-1 | agreement with teacher | seconds | vs online KD |",
        "| --- | --- | --- | --- | --- |",
        f"| teacher {s.teacher}, CE, {s.teacher_epochs} epochs (once) | {teacher_top1:.4f} | - | "
        f"{t_train:.0f} train + {t_pre:.0f} precompute | - |",
    ]
    for r in runs:
        ratio = f"{r['train_s'] / online['train_s']:.2f}x" if r["kind"] != "online" else "1x"
        lines.append(f"| {r['name']} | {r['top1']:.4f} | {r['agreement']:.4f} | {r['train_s']:.1f} | {ratio} |")
    cached = [r for r in runs if r["kind"] == "cached"]
    ce = next(r for r in runs if r["kind"] == "ce")
    best = max(cached, key=lambda r: r["top1"])
    verdict = ("beats" if best["top1"] > ce["top1"] else "does NOT beat") + " CE on labels"
    lines += [
        "",
        f"Best student from the store ({best['loss'].upper()}): {best['top1']:.4f} top-1, {verdict} "
        f"({ce['top1']:.4f}, {100 * (best['top1'] - ce['top1']):+.2f} points); every student from the store "
        f"against CE: "
        + ", ".join(f"{r['loss'].upper()} {100 * (r['top1'] - ce['top1']):+.2f} points" for r in cached)
        + ". "
        f"Each student from the store costs {cached[0]['train_s']:.0f} s against {online['train_s']:.0f} s online "
        f"(the teacher's {t_pre:.0f} s precompute is paid once, for all of them; the {t_train:.0f} s of its "
        f"training are paid by online KD too).",
        f"`kdlib verify`: top-1 agreement {verify.get('top1_agreement')} over {verify.get('views')} re-rendered "
        f"stored views, max logit error {verify.get('max_logit_error') or 0:.2g}, ok: {verify.get('ok')}.",
    ]
    return "\n".join(lines)
