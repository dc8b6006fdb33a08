"""Distil from a kdlib store in your own PyTorch loop: your student, your optimizer, no teacher in memory.

python examples/own_loop.py --shards shards/demo --student mobilenet_v3_small --epochs 2
accelerate launch --multi_gpu --num_processes 2 examples/own_loop.py --shards ...   # each rank its share
"""

import argparse
import json

import torch
import torchvision

import kdlib

p = argparse.ArgumentParser()
p.add_argument("--shards", required=True)
p.add_argument("--student", default="mobilenet_v3_small", help="a torchvision model name, or a kdlib arch (resnet8)")
p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--weight-decay", type=float, default=5e-4)
p.add_argument("--warmup", type=float, default=0.05)
p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
p.add_argument("--workers", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--log", default=None, help="JSONL of per-step losses (one file per rank: .rankR appended)")
args = p.parse_args()

replay = kdlib.Replay.from_store(args.shards, batch_size=args.batch_size, epochs=args.epochs, workers=args.workers)
if args.student in torchvision.models.list_models():  # any nn.Module: it gets normalised float inputs
    torch.manual_seed(args.seed)
    student, kdlib_model = torchvision.models.get_model(args.student, num_classes=replay.num_classes), False
else:  # a kdlib Classifier takes the uint8 views and normalises them itself, as `kdlib train` builds it
    student, kdlib_model = kdlib.load_student(args.student, replay.source, replay.num_classes, seed=args.seed), True
student = student.to(replay.device).train()
if torch.distributed.is_available() and torch.distributed.is_initialized():  # under accelerate launch / torchrun
    student = torch.nn.parallel.DistributedDataParallel(student)
if args.optimizer == "sgd":
    opt = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
else:
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
schedule = torch.optim.lr_scheduler.LambdaLR(opt, kdlib.warmup_cosine(replay.total_steps, args.warmup))
log = open(args.log + (f".rank{replay.rank}" if replay.world > 1 else ""), "w") if args.log else None

for batch in replay:  # this rank's share of every global batch, in the store's order
    if kdlib_model:
        x = batch.views
    else:
        x = batch.inputs if batch.views.shape[1] == 3 else batch.inputs.expand(-1, 3, -1, -1)  # gray -> RGB
    loss = kdlib.kl(student(x), batch.teacher_logits)  # KL at T = 1 to the stored soft labels
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.clip:
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip)
    opt.step()
    schedule.step()
    if log:
        log.write(json.dumps({"step": batch.step + 1, "loss": loss.item(), "views": len(batch.views)}) + "\n")
    if args.steps and batch.step + 1 >= args.steps:
        break
if log:
    log.close()
print(f"rank {replay.rank}: {batch.step + 1} steps, last loss {loss.item():.4f}")
