"""PyTorch peers: plain (1 process), DDP, FSDP2 (`fully_shard`), DeepSpeed ZeRO 0-3.

    python3 torch_runner.py --mode plain --work DIR
    torchrun --nproc_per_node 2 torch_runner.py --mode ddp|fsdp2|ds0|ds1|ds2|ds3 --work DIR

Each process takes its own half of every batch's rows (rank r: rows r*8..r*8+7), fp32,
torch.optim.AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every
param), gradient clipping 1.0. The reported loss is the global mean (all-reduced after
the timed loop, so the timing carries no extra collective).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import BETAS, CLIP, DTYPE, EPS, LR, ROWS, WEIGHT_DECAY, report  # noqa: E402
from torch_gpt import GPT, load_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=["plain", "ddp", "fsdp2", "ds0", "ds1", "ds2", "ds3"])
    ap.add_argument("--cpu-adam", action="store_true",
                    help="DeepSpeed's fused C++ Adam (JIT-built into $TORCH_EXTENSIONS_DIR) instead of torch's")
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    torch.manual_seed(0)
    data = np.load(os.path.join(args.work, "data.npy"))[: args.steps]
    rows = ROWS // world
    model = GPT()
    load_weights(model, os.path.join(args.work, "weights.npz"))

    def opt(params):
        if args.cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                    adamw_mode=True)
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    if args.mode.startswith("ds"):
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
        stage = int(args.mode[2])
        config = {
            "train_batch_size": ROWS, "train_micro_batch_size_per_gpu": rows,
            "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
            "bf16": {"enabled": DTYPE == "bf16"},
        }
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt(model.parameters()), config=config)

        def step(ids):
            loss = engine(ids)
            engine.backward(loss)
            engine.step()
            return loss.detach()
    else:
        if world > 1:
            torch.distributed.init_process_group("gloo")
        if args.mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        elif args.mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        optimizer = opt(model.parameters())

        def step(ids):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=DTYPE == "bf16"):
                loss = model(ids)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            if hasattr(norm, "full_tensor"):
                norm.full_tensor()
            optimizer.step()
            return loss.detach()

    times, losses = [], []
    for i in range(args.steps):
        ids = torch.from_numpy(data[i, rank * rows:(rank + 1) * rows].astype(np.int64))
        t0 = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - t0)
    losses = torch.stack(losses)
    if world > 1:
        torch.distributed.all_reduce(losses)
        losses /= world
    report(args.mode, rank, times, losses.tolist(), args.warmup)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
