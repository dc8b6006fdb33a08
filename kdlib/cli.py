"""The `kdlib` command line: click commands only; each parses flags and calls one library function.

Each command imports its library function when it runs, so that `kdlib --help` and a refused flag
answer at once instead of after torch, accelerate and zarr have loaded (nothing here is a cycle:
every import points down, see .importlinter)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys

import click

from ._checks import ENV_ERRNOS, TRAIN_NUMBERS, Number, describe_os_error
from .errors import KdlibError, StorageError, StoreBusyError

LIMIT = click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Use only the first N images of each split (quick tries, tests).",
)
WORKERS = click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="DataLoader worker processes that read and decode (and render, on a CPU-only machine).",
)
RENDER = click.option(
    "--render",
    type=click.Choice(["auto", "device", "workers"]),
    default="auto",
    help="Where views are rendered: on the model's device (default with a GPU) or in the "
    "DataLoader workers (default on a CPU-only machine); same pixels on one kind of device.",
)
PRECISION = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "tf32", "bf16"]),
    default="auto",
    help="Teacher forward: auto is bf16 + channels_last on CUDA, fp32 on the CPU.",
)
MEAN = click.option(
    "--mean",
    default=None,
    help="Input mean in [0,1] units, e.g. 0.485,0.456,0.406 or 'imagenet', "
    "for weights that do not define their preprocessing (default: the weights' own; the data's "
    "statistics only for a model trained from scratch).",
)
STD = click.option("--std", default=None, help="Input std, e.g. 0.229,0.224,0.225 or 'imagenet' (see --mean).")
CLASS_MAP = click.option(
    "--class-map",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON {data class: teacher index or class name} for a teacher whose classes are not "
    "the data's (default: by the teacher's class names, else refused).",
)
# verify and eval --shards: what the store's teacher was given stands in for a flag not given
STORE_MEAN = click.option(
    "--mean",
    default=None,
    help="Input mean in [0,1] units, as precompute's --mean [default: the weights' own, else the one the "
    "store's teacher was given, when it is that teacher].",
)
STORE_STD = click.option("--std", default=None, help="Input std, as precompute's --std (see --mean).")
STORE_CLASS_MAP = click.option(
    "--class-map",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON {data class: teacher index or class name}, as precompute's [default: the store's mapping "
    "when it is the store's teacher, else by the teacher's class names]; verify refuses one other than the "
    "store's.",
)
TRUST_CODE = click.option(
    "--trust-code", is_flag=True, help="Allow a run dir's config.json to name a package.module:factory to import."
)
CPU = click.option("--cpu", is_flag=True, help="Run on the CPU even when a GPU is present.")


def _set_storage_options(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check the JSON object and hand it to every process of the run (DataLoader workers, accelerate ranks)
    through the environment, where kdlib's object-storage layer reads it."""
    if value is None:
        return None
    try:
        opts = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"not JSON ({exc.msg} at character {exc.pos}); write e.g. '{{\"anon\": true}}'"
        ) from None
    if not isinstance(opts, dict):
        raise click.BadParameter("must be a JSON object of fsspec options, e.g. '{\"anon\": true}'")
    os.environ["KDLIB_STORAGE_OPTIONS"] = json.dumps(opts)
    return value


STORAGE_OPTIONS = click.option(
    "--storage-options",
    default=None,
    expose_value=False,
    callback=_set_storage_options,
    help="JSON object of fsspec options for s3://, gs://, ... stores and data, e.g. "
    '\'{"endpoint_url": "http://host:9000"}\' [default: the standard variables, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...].',
)


# what libraries that do their own I/O (safetensors' Rust writer) say instead of raising OSError
_FOREIGN_ERRNOS = {
    "(os error 28)": errno.ENOSPC,
    "(os error 30)": errno.EROFS,
    "(os error 13)": errno.EACCES,
    "(os error 122)": errno.EDQUOT,
}


@contextlib.contextmanager
def _disk_faults(out: str, todo_full: str):
    """Turn a full or read-only disk under `out` into one StorageError line (exit 1) that says what to do."""
    try:
        yield
    except KdlibError:
        raise
    except OSError as exc:
        if exc.errno not in ENV_ERRNOS:
            raise
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise StorageError(describe_os_error(exc, where=out, todo=todo_full if full else None)) from exc
    except Exception as exc:
        code = next((c for tag, c in _FOREIGN_ERRNOS.items() if tag in str(exc)), None)
        if code is None:
            raise
        os_exc = OSError(code, os.strerror(code))
        full = code in (errno.ENOSPC, errno.EDQUOT)
        raise StorageError(describe_os_error(os_exc, where=out, todo=todo_full if full else None)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--debug", is_flag=True, help="On an error, show the full traceback (also: KDLIB_DEBUG=1).")
def cli(debug: bool) -> None:
    """kdlib: pay for the teacher once, distill many students from its stored soft labels."""
    if debug:
        os.environ["KDLIB_DEBUG"] = "1"  # DataLoader workers and `main` see it too


@cli.command()
@click.option(
    "--teacher",
    required=True,
    help="Run directory, architecture name, package.module:factory, "
    "torchvision:<model>:<TAG> (e.g. torchvision:resnet50:IMAGENET1K_V2) or timm:<model> (needs kdlib[timm]).",
)
@click.option(
    "--weights",
    default=None,
    help="Weights file (.safetensors, or .pt loaded weights_only) for an "
    "architecture; for torchvision:/timm: names, default: the local hub caches (nothing downloads).",
)
@click.option(
    "--data",
    default="fashion-mnist",
    help="fashion-mnist, an ImageFolder directory, a .npz file, wds:PATTERN[?test=PATTERN] (webdataset tars, "
    "local or s3://...) or hf:PATH[?image=COL&label=COL] (a Hugging Face dataset on disk).",
)
@click.option("--recipe", default=None, type=click.Path(dir_okay=False), help="Recipe YAML (see precompute/).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Override the recipe's seed.")
@click.option(
    "--epochs", type=click.IntRange(min=1), default=1, help="Epochs of views to store (more extends a store)."
)
@click.option("--out", required=True, help="Store directory or fsspec URL, e.g. shards/run.")
@click.option(
    "--k",
    "k",
    type=click.IntRange(min=1),
    default=None,
    help="Top-k logits kept per view, at most the class count [default: 10, or every class when fewer].",
)
@click.option(
    "--format",
    "backend",
    type=click.Choice(["zarr", "wds"]),
    default="zarr",
    help="Store backend: zarr (random access, fsspec URLs) or wds (webdataset tars, streaming).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Teacher batch, in views.")
@click.option("--chunk-views", type=click.IntRange(min=1), default=4096, help="Views per chunk (write/resume unit).")
@click.option(
    "--params",
    "param_packing",
    type=click.Choice(["none", "packed"]),
    default="none",
    help="packed: uint16 boxes and lambda on a 1/65535 grid, 24 -> 16 bytes of params per view.",
)
@click.option(
    "--logits",
    "logit_codec",
    type=click.Choice(["fp16", "q8"]),
    default="fp16",
    help="How top-k logits are stored: fp16, or q8 (8-bit, 1/16 nat steps below the top-1).",
)
@click.option(
    "--full-sample",
    type=click.FloatRange(0, 1),
    default=None,
    help="Fraction of views that also keep all logits (fp16), to measure what top-k costs "
    "[default: 1%, less with many classes: at most a tenth of the top-k bytes, min(0.01, 0.1 k / classes)].",
)
# issue 21: sampled soft labels (RS-KD) beside top-k
@click.option(
    "--labels",
    type=click.Choice(["topk", "sampled"]),
    default="topk",
    help="Soft labels: topk (top-k logits + lse), or sampled: --samples draws per view from the teacher's "
    "softmax at --sample-temperature, stored as ids + counts (unbiased in expectation; RS-KD).",
)
@click.option(
    "--samples", type=click.IntRange(min=1), default=10, help="--labels sampled: draws S per view (<= classes)."
)
@click.option(
    "--sample-temperature",
    type=float,
    default=1.0,
    help="--labels sampled: the draws' temperature T (> 0); train's loss at the same T is unbiased.",
)
@click.option("--no-test", is_flag=True, help="Do not cache the teacher's predictions on the test split.")
@click.option(
    "--decode",
    type=click.Choice(["pil", "pil-draft"]),
    default="pil",
    help="pil-draft: decode a JPEG 2-8x smaller in the DCT domain when all its boxes shrink that much "
    "(fast for photos; changes pixels, so it is recorded and replayed).",
)
@PRECISION
@RENDER
# issue 13: attention maps (a teacher with DIH heads stores each head's labels by itself)
@click.option(
    "--attention",
    default=None,
    help="Teacher layers whose attention maps are stored per view, "
    "comma-separated: stage1,stage2,... or net submodule paths (opt-in; bytes reported by inspect).",
)
@click.option("--attention-grid", type=click.IntRange(1, 64), default=8, help="Maps are pooled to G x G.")
@click.option(
    "--attention-codec",
    type=click.Choice(["fp16", "q8"]),
    default="fp16",
    help="Stored map values: fp16, or q8 (8 bits per value, relative to the map's max).",
)
@MEAN
@STD
@CLASS_MAP
@TRUST_CODE
@CPU
@LIMIT
@WORKERS
@STORAGE_OPTIONS
def precompute(**kw) -> None:
    """Run the teacher once over seeded views and store its soft labels."""
    from .precompute import PrecomputeConfig
    from .precompute import precompute as run

    test = not kw.pop("no_test")
    with _disk_faults(
        kw["out"], "free some space and rerun the same command: it resumes from the chunks committed so far"
    ):
        run(PrecomputeConfig(**kw, test=test))  # the main process prints what it wrote


@cli.command()
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Train config YAML (see train/); flags given on the command line override it.",
)
@click.option("--out", default=None, help="Run directory for model.safetensors, config.json, metrics.jsonl (required).")
@click.option(
    "--students",
    default=None,
    type=click.Path(dir_okay=False),
    help="Several students from one pass over the store: a YAML file with shared settings at the top and a "
    "`students:` list, each with its own `out` and settings (see README); instead of --out.",
)
@click.option(
    "--student", "--model", "student", default="resnet8", help="Architecture name, or package.module:factory."
)
@click.option("--shards", default=None, help="Distill from this store (the teacher is never loaded).")
@click.option("--data", default=None, help="Source for supervised or online training (default: the store's).")
@click.option("--teacher", default=None, help="Online distillation baseline: teacher in memory, same plan.")
@click.option("--recipe", default=None, type=click.Path(dir_okay=False), help="Recipe YAML without --shards.")
@click.option(
    "--loss",
    type=click.Choice(["kl", "ttm", "wttm", "dist", "dih", "ce"]),
    default=None,
    help="Default: kl with --shards/--teacher, ce otherwise. dih: the cohort of a teacher with heads.",
)
@click.option(
    "--temperature",
    "-T",
    type=Number(*TRAIN_NUMBERS["temperature"]),
    default=1.0,
    help="KL/DIST temperature [kdlib 1; references: big_vision FunMatch KL 1, FunMatch TF2 port 2, "
    "CIFAR-100 harnesses (RepDistiller, zkxufo/TTM --kd_T) 4, fasterai SoftTarget 5; DIST: its loss class 1, "
    "zkxufo/TTM's CIFAR harness --dist_tau 4].",
)
@click.option(
    "--gamma",
    type=Number(*TRAIN_NUMBERS["gamma"]),
    default=0.5,
    help="TTM/WTTM power gamma (= 1/T) [kdlib 0.5; the TTM reference code, zkxufo/TTM --ttm_l, defaults to 1 "
    "= plain KL].",
)
@click.option(
    "--soft-target",
    type=click.Choice(["topk", "marginal", "sampled"]),
    default=None,
    help="A store's labels as: topk (top-k + a flat tail carrying the lse's mass), marginal (FKD: top-k "
    "probabilities, the rest spread evenly), sampled (RS-KD, unbiased) [default: the store's kind].",
)
@click.option(
    "--ce-weight",
    type=Number(*TRAIN_NUMBERS["ce_weight"]),
    default=0.0,
    help="Add CE on (mixed) ground-truth labels: KD + w * CE [fasterai's (1 - a) CE + a KD, a = 0.5 by default, is "
    "--ce-weight (1 - a) / a, times a].",
)
@click.option("--epochs", type=click.IntRange(min=1), default=1)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, help="Global batch, in views.")
@click.option("--lr", type=Number(*TRAIN_NUMBERS["lr"]), default=2e-3)
@click.option("--weight-decay", type=Number(*TRAIN_NUMBERS["weight_decay"]), default=5e-4)
@click.option(
    "--warmup",
    type=Number(*TRAIN_NUMBERS["warmup"]),
    default=None,
    help="Warmup, fraction of all steps [default: 0.05, unless --warmup-epochs].",
)
@click.option("--clip", type=Number(*TRAIN_NUMBERS["clip"]), default=1.0, help="Gradient norm clip (0: off).")
# issue 19: the optimizer, its schedule, and what users expect of a trainer
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "adamw", "lamb"]),
    default="adamw",
    show_default=True,
    help="lamb: You et al. 2020, as timm's Lamb (no timm needed).",
)
@click.option(
    "--momentum", type=Number(*TRAIN_NUMBERS["momentum"]), default=None, help="SGD momentum [default: 0.9]; sgd only."
)
@click.option("--nesterov", is_flag=True, help="Nesterov momentum; sgd only.")
@click.option(
    "--decay-norm-bias/--no-decay-norm-bias",
    default=None,
    help="Weight decay on norm weights and biases too [default: no for sgd and lamb (timm, DeiT), "
    "yes for adamw (kdlib's default before the choice, kept so its runs do not change)].",
)
@click.option(
    "--lr-base-batch",
    type=click.IntRange(min=1),
    default=None,
    help="--lr is the rate for this many views per optimizer step; the run's lr scales linearly to "
    "--batch-size x --grad-accum (FKD, DeiT: 512).",
)
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True)
@click.option(
    "--warmup-epochs",
    type=Number(*TRAIN_NUMBERS["warmup_epochs"]),
    default=None,
    help="Warmup in epochs (may be fractional), instead of --warmup.",
)
@click.option(
    "--min-lr", type=Number(*TRAIN_NUMBERS["min_lr"]), default=None, help="Cosine only: the lr it ends at [default: 0]."
)
@click.option(
    "--milestones", default=None, help="Step only: epochs at which the lr is multiplied by --step-gamma, e.g. 30,60,90."
)
@click.option("--step-gamma", type=Number(*TRAIN_NUMBERS["step_gamma"]), default=None, help="Step only [default: 0.1].")
@click.option(
    "--label-smoothing",
    type=Number(*TRAIN_NUMBERS["label_smoothing"]),
    default=0.0,
    help="Smooth the labels of the CE terms (--loss ce, --ce-weight, DIH's) by eps, e.g. 0.1.",
)
@click.option(
    "--grad-accum",
    type=click.IntRange(min=1),
    default=1,
    help="Global batches per optimizer step: a step sees --batch-size x N views (as accelerate and timm).",
)
@click.option(
    "--ema",
    type=Number(*TRAIN_NUMBERS["ema"]),
    default=None,
    metavar="DECAY",
    help="Keep an EMA of the weights (e.g. 0.9999), evaluated and saved beside them in --out/ema.",
)
@click.option("--compile", is_flag=True, help="torch.compile the student (refused where it cannot run).")
@click.option(
    "--log-with",
    default=None,
    help="Also send the losses and metrics to these accelerate trackers, e.g. tensorboard (files in --out/logs), wandb.",
)
@click.option(
    "--keep-best",
    default=None,
    metavar="METRIC",
    help="Keep the best model so far in --out/best by top1, top5, agreement (the evaluations of --eval-every), "
    "ema_top1, ema_top5, ema_agreement, or loss (the epoch's training loss).",
)
@click.option(
    "--mixed-precision",
    type=click.Choice(["no", "fp16", "bf16"]),
    default=None,
    help="Student autocast [default: what accelerate's config says, else no].",
)
@PRECISION
@RENDER
@click.option(
    "--log-every",
    type=click.IntRange(min=1),
    default=50,
    help="Steps between reads of the loss on the host (steps.jsonl still has every step).",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Student initialisation seed.")
@click.option("--weights", default=None, help="Initial student weights file.")
@click.option(
    "--stored-epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Cycle only the first N stored epochs (default: all the store holds).",
)
@click.option(
    "--resume", is_flag=True, help="Continue from --out/checkpoint (refused if a flag that changes the math differs)."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace the run in an existing --out (without it, a used --out is refused)."
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    default=100,
    help="Steps between checkpoints (0: epoch ends only).",
)
@click.option("--no-eval", is_flag=True, help="Skip the test-split evaluation at the end.")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, help="Also evaluate every N epochs (0: end only).")
@CPU
# issue 13: DIH cohort loss and attention transfer
@click.option(
    "--dih-alpha",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.1,
    help="DIH: weight of each cohort member's KD term (CE gets 1 - alpha per member).",
)
@click.option("--dih-temperature", type=click.FloatRange(0, min_open=True), default=5.0, help="DIH: KD temperature.")
@click.option(
    "--attention-student",
    default=None,
    help="Add attention transfer on these student layers (stage1,... or net paths), paired in order "
    "with the store's maps (or --attention-teacher online).",
)
@click.option(
    "--attention-teacher", default=None, help="Online AT: the teacher's layers [default: the student's names]."
)
@click.option(
    "--attention-weight",
    type=click.FloatRange(min=0),
    default=1e3,
    help="beta of the AT term (the reference: 1e3; fasterai's weight w maps to w / (1 - w) with --loss ce).",
)
@click.option(
    "--attention-grid",
    type=click.IntRange(1, 64),
    default=None,
    help="Online AT: pool maps to G x G [default 8]; with --shards the store's grid.",
)
@MEAN
@STD
@click.option("--teacher-weights", default=None, help="Online teacher: weights file for an architecture name.")
@click.option("--teacher-mean", default=None, help="Online teacher: input mean, as precompute's --mean.")
@click.option("--teacher-std", default=None, help="Online teacher: input std, as precompute's --std.")
@CLASS_MAP
@TRUST_CODE
@LIMIT
@WORKERS
@STORAGE_OPTIONS
def train(config_file: str | None, **kw) -> None:
    """Train a student: from a store, online from a teacher, or on labels; or several students from one
    pass over a store (--students FILE)."""
    from .train import resolve_config
    from .train import train as run

    ctx = click.get_current_context()
    given = {k for k in kw if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    kw["eval"] = not kw.pop("no_eval")
    if "no_eval" in given:
        given.add("eval")
    students = kw.pop("students")
    if students:  # several students, one pass (kdlib.students)
        from .students import read_students, train_students

        with _disk_faults(students, "free some space and rerun with --resume: the last checkpoints are kept"):
            result = train_students(read_students(students, kw, given, config_file))
        if result["failed"]:  # each said why in its own error line, and the others finished
            sys.exit(1)
        return
    if not kw["out"]:
        raise click.UsageError("Missing option '--out' (or --students FILE for several students).")
    with _disk_faults(kw["out"], "free some space and rerun with --resume: the last checkpoint is kept"):
        run(resolve_config(kw, given, config_file))


@cli.command()
@click.option("--shards", required=True)
@click.option("--teacher", required=True, help="The teacher that wrote the store (its digest must match).")
@click.option("--weights", default=None)
@click.option("--views", type=click.IntRange(min=1), default=256, help="How many stored views to re-check.")
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    default=None,
    help="Fail below this top-1 agreement [default: 1.0 on the kind of device and in fp32 that wrote the "
    "store, else 0.99].",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where to replay [default: the GPU when there is one]; a store written on the other kind is "
    "checked within the measured cross-device bounds.",
)
@click.option(
    "--data",
    default=None,
    help="The store's source, when the path its meta.json names is not where "
    "the images are here (its fingerprint must match).",
)
@STORE_MEAN
@STORE_STD
@STORE_CLASS_MAP
@TRUST_CODE
@CPU
@LIMIT
@STORAGE_OPTIONS
def verify(
    shards: str,
    teacher: str,
    weights: str | None,
    views: int,
    min_agreement: float | None,
    device: str | None,
    data: str | None,
    mean: str | None,
    std: str | None,
    class_map: str | None,
    trust_code: bool,
    cpu: bool,
    limit: int | None,
) -> None:
    """Re-render stored views, re-run the teacher, compare pixels and logits; exit 1 when they disagree."""
    from .verify import verify as run

    result = run(
        shards,
        teacher,
        views=views,
        weights=weights,
        data=data,
        min_agreement=min_agreement,
        device=device,
        mean=mean,
        std=std,
        class_map=class_map,
        trust_code=trust_code,
        cpu=cpu,
        limit=limit,
    )
    click.echo(json.dumps(result, indent=1))
    if not result["ok"]:
        pixels = result.get("pixels")
        click.echo(
            f"verify FAILED: top-1 agreement {result['top1_agreement']:.4f} (min {result['min_agreement']}), "
            f"max logit error {result['max_logit_error']:.3g}"
            + (
                f", pixels: max difference {pixels['max_pixel_diff']} on {pixels['pixels_differing']:.4%}"
                if pixels
                else ""
            ),
            err=True,
        )
        sys.exit(1)


@cli.command(name="eval")
@click.option(
    "--model",
    required=True,
    help="Run directory, or (with --data) an architecture, package.module:factory, "
    "torchvision:<model>:<TAG> or timm:<model>.",
)
@click.option("--weights", default=None, help="Weights file for a named model.")
@click.option("--data", default=None, help="Default: what the model was trained on.")
@click.option("--split", default="test")
@click.option(
    "--shards",
    default=None,
    help="Store with cached teacher predictions (default: the one trained from); agreement is measured "
    "on the views they were made on.",
)
@click.option(
    "--size",
    type=click.IntRange(min=1),
    default=None,
    help="View size [default: a run dir's input_size; for a named model its input contract's, else the "
    "--shards store's recipe's, and required when neither says].",
)
@STORE_MEAN
@STORE_STD
@STORE_CLASS_MAP
@TRUST_CODE
@CPU
@LIMIT
@WORKERS
@STORAGE_OPTIONS
def eval_(
    model: str,
    weights: str | None,
    data: str | None,
    split: str,
    shards: str | None,
    size: int | None,
    mean: str | None,
    std: str | None,
    class_map: str | None,
    trust_code: bool,
    cpu: bool,
    limit: int | None,
    workers: int,
) -> None:
    """Print JSON with top1, top5 and, when cached, agreement with the teacher."""
    from .evaluate import evaluate

    click.echo(
        json.dumps(
            evaluate(
                model,
                data,
                split,
                limit,
                shards,
                workers=workers,
                weights=weights,
                mean=mean,
                std=std,
                class_map=class_map,
                trust_code=trust_code,
                cpu=cpu,
                size=size,
            )
        )
    )


@cli.command()
@click.argument("shards")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--temperature",
    "-T",
    type=Number(0.0, open=True),
    default=1.0,
    help="KL/DIST temperature the target error is measured at.",
)
@click.option(
    "--loss",
    type=click.Choice(["kl", "ttm", "wttm", "dist"]),
    default="kl",
    help="Loss whose teacher target the full-logit sample is compared at.",
)
@click.option(
    "--gamma", type=Number(0.0, open=True), default=0.5, help="TTM/WTTM power the target error is measured at."
)
@click.option(
    "--max-chunks",
    type=click.IntRange(min=1),
    default=None,
    help="Label statistics from the first N chunks of each epoch only (the digest reads everything).",
)
@STORAGE_OPTIONS
def inspect(shards: str, as_json: bool, temperature: float, loss: str, gamma: float, max_chunks: int | None) -> None:
    """Format, size per view, digest, label statistics and the cost of top-k of a store."""
    from .inspect import format_report, inspect_store

    report = inspect_store(shards, temperature=temperature, loss=loss, gamma=gamma, max_chunks=max_chunks)
    click.echo(json.dumps(report, indent=1) if as_json else format_report(report), nl=as_json)


@cli.command()
@click.option("--out", default="runs/demo", help="Where the demo's runs go.")
@click.option("--shards", default="shards/demo", help="Where the demo's store goes.")
@click.option("--quick", is_flag=True, help="A tiny version (a few hundred images), for a smoke test.")
def demo(out: str, shards: str, quick: bool) -> None:
    """The teacher paid once, several students from its one store, online KD and CE beside them: a table and a picture."""
    from .demo import run_demo

    run_demo(out, shards, quick)


# -- DIH heads (issue 13) ----------------------------------------------------------------------
@cli.command()
@click.option("--teacher", required=True, help="The teacher's run directory (or an architecture with --weights).")
@click.option("--weights", default=None, help="Weights file for an architecture name.")
@click.option("--data", default="fashion-mnist", help="Source the heads are fitted on (its train split).")
@click.option("--recipe", default=None, type=click.Path(dir_okay=False), help="Recipe YAML of the fitting views.")
@click.option("--epochs", type=click.IntRange(min=1), default=1)
@click.option("--out", required=True, help="Run directory of the teacher with heads.")
@click.option(
    "--head-layers",
    default=None,
    help="Comma-separated layers to mount heads on: stage1,stage2,... or net submodule paths "
    "[default: every stage of a kdlib CIFAR ResNet or torchvision ResNet].",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--lr", type=float, default=1e-3, help="AdamW learning rate of the heads.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Heads' initialisation seed.")
@click.option("--no-eval", is_flag=True, help="Skip the per-head test-split top-1.")
@CPU
@LIMIT
@WORKERS
@STORAGE_OPTIONS
def heads(**kw) -> None:
    """Fit DIH classifier heads on a frozen teacher; the backbone's weights stay bit-identical."""
    from .heads import HeadsConfig, fit_heads

    kw["eval"] = not kw.pop("no_eval")
    result = fit_heads(HeadsConfig(**kw))
    click.echo(
        f"teacher with {len(result['layers'])} heads on {result['layers']} saved to {result['out']} "
        f"(backbone digest {result['backbone_digest'][:12]}, unchanged)"
    )


def _worker_message(exc: BaseException) -> str:
    """The original message of an error re-raised by a DataLoader worker (torch prepends
    "Caught X in DataLoader worker process N." and the worker's traceback to it)."""
    msg = str(exc)
    first = msg.split("\n", 1)[0]
    if not (first.startswith("Caught ") and "DataLoader worker process" in first):
        return msg
    t = type(exc)
    for name in (f"{t.__module__}.{t.__qualname__}: ", f"{t.__qualname__}: "):
        at = msg.rfind("\n" + name)
        if at >= 0:
            return msg[at + 1 + len(name) :].strip()
    return msg.strip().splitlines()[-1]


def _one_line(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for an error the user can act on; None for a bug (traceback)."""
    if isinstance(exc, (StorageError, StoreBusyError)):  # the disk, or another process: not the input
        return 1, _worker_message(exc)
    if isinstance(exc, KdlibError):
        return 2, _worker_message(exc)
    if isinstance(exc, FileNotFoundError):
        return 2, _worker_message(exc)
    if isinstance(exc, OSError) and exc.errno in ENV_ERRNOS:
        return 1, describe_os_error(exc)
    from .store.objectstore import fault  # (here: the store's imports are not `kdlib --help`'s)

    found = fault(exc, None)  # botocore's own error, met outside the store's calls: the endpoint it named
    return None if found is None else _one_line(found)


def _close_progress_bars() -> None:
    """Close the bars an error left open now, so that their last refresh comes before the error line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _exit(code: int) -> None:
    """Exit on an error: a process group is then not destroyed gracefully (`runtime.exit_failed`)."""
    runtime = sys.modules.get("kdlib.runtime")  # not imported: no group was joined
    if runtime is not None:
        runtime.exit_failed()
    sys.exit(code)


def main() -> None:
    """The console entry point: every error the user can act on ends in one line, never a traceback
    (unless --debug / KDLIB_DEBUG=1): exit 2 for bad input, exit 1 for the disk or filesystem."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        _exit(130)
    except click.ClickException as exc:
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            click.echo(f"error: {exc.format_message()} (see '{exc.ctx.command_path} -h')", err=True)
        else:
            click.echo(f"error: {exc.format_message()}", err=True)
        _exit(exc.exit_code)
    except Exception as exc:
        found = _one_line(exc)
        if found is None or os.environ.get("KDLIB_DEBUG", "") not in ("", "0"):
            raise
        code, line = found
        _close_progress_bars()
        click.echo(f"error: {line}", err=True)
        _exit(code)
