"""DPO: zerojax.rlhf.dpo vs TRL's DPOTrainer, same tiny Llama weights, same pairs, one run.

    python3 benchmarks/rlhf.py                 # 30 steps each (~3 minutes on 2 cores)
    python3 benchmarks/rlhf.py --steps 10

Both sides start from one HF directory (the ~1M-param Llama of `_hf_llama`'s "tiny" shape,
random weights, with a character-level `tokenizer.json` both load, EOS appended to
responses on both), train on the shipped toy pairs (configs/rlhf/pairs.jsonl) with the same
batch of pairs, AdamW (lr 1e-4, no weight decay, torch's betas and eps), gradient clipping
1.0, constant lr, beta 0.1, sigmoid loss, fp32, 2 threads, the reference model in memory
(no precomputed log-probs). Each side runs in a process of its own, so its peak RSS is its
own. Reported: median step time over the steps after the first (which compiles / warms
up), pairs/s, the ratio, peak RSS, and the first steps' losses (both start at log 2: policy
= reference; the data orders differ, so later steps drift apart).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAIRS = os.path.join(ROOT, "configs", "rlhf", "pairs.jsonl")
THREADS, BATCH, MAX_LEN, LR = 2, 8, 128, 1e-4


def make_model_dir(directory: str) -> None:
    """The tiny Llama plus a character-level tokenizer (pad 0, EOS 1) in a HF directory."""
    import tokenizers
    import torch
    import transformers

    from _hf_llama import MODELS

    chars = sorted({c for line in open(PAIRS) for value in json.loads(line).values() for c in value})
    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("[\\s\\S]"), "isolated")
    backend.decoder = tokenizers.decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, max_position_embeddings=256, bos_token_id=None,
                                      eos_token_id=1, pad_token_id=0, tie_word_embeddings=False, **MODELS["tiny"])
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def run_zerojax(model_dir: str, steps: int) -> dict:
    from _devices import set_device_count
    set_device_count(1)
    import zerojax

    out = tempfile.mkdtemp()
    config = {"train_batch_size": BATCH, "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                        "weight_decay": 0.0}},
              "zerojax": {"model": {"init_from": model_dir},
                          "rlhf": {"data": PAIRS, "max_prompt_len": 64, "max_len": MAX_LEN, "beta": 0.1},
                          "train": {"steps": steps, "log_every": 1, "checkpoint_every": 0, "out": out}}}
    zerojax.rlhf.dpo(config, out=out, stream=open(os.devnull, "w"))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    return {"step_times": [r["step_time_s"] for r in records], "losses": [r["loss"] for r in records]}


def run_trl(model_dir: str, steps: int) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(THREADS)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    pairs = datasets.Dataset.from_list([json.loads(line) for line in open(PAIRS)])
    times, losses = [], []

    class Stamps(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=steps,
                         learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, beta=0.1, loss_type="sigmoid", max_length=MAX_LEN, logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                         disable_tqdm=True)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok,
                             callbacks=[Stamps()])
    trainer.train()
    return {"step_times": times, "losses": losses}


def side(name: str, model_dir: str, steps: int) -> None:
    result = (run_zerojax if name == "zerojax" else run_trl)(model_dir, steps)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--side", choices=["zerojax", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args.side, args.model_dir, args.steps)
        return 0
    import _machine
    print(_machine.describe(), flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_model_dir(tmp)
        for name in ("trl", "zerojax"):
            run = subprocess.run([sys.executable, __file__, "--side", name, "--model-dir", tmp, "--steps",
                                  str(args.steps)], capture_output=True, text=True, cwd=HERE)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                print(f"{name} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
                return 1
            results[name] = json.loads(lines[-1][7:])
    import torch
    import transformers
    import trl
    print(f"DPO, {BATCH} pairs/step, max_len {MAX_LEN}, fp32, {THREADS} threads, {args.steps} steps; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"{'who':10s} {'step ms (median, after 1st)':>28s} {'pairs/s':>9s} {'vs TRL':>7s} {'peak RSS MiB':>13s}  "
          f"first losses")
    trl_rate = None
    for name in ("trl", "zerojax"):
        r = results[name]
        step = statistics.median(r["step_times"][1:])
        rate = BATCH / step
        trl_rate = trl_rate or rate
        print(f"{name:10s} {step * 1e3:28.1f} {rate:9.1f} {rate / trl_rate:6.2f}x {r['peak_rss_mib']:13.0f}  "
              + " ".join(f"{x:.4f}" for x in r["losses"][:4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
