"""RLHF against TRL, same tiny Llama weights and data, one run: DPO and GRPO.

    python3 benchmarks/rlhf.py                      # both (~3 + ~4 minutes on 2 cores)
    python3 benchmarks/rlhf.py --algorithm dpo      # DPO only, 30 steps
    python3 benchmarks/rlhf.py --algorithm grpo     # GRPO only, 12 steps
    python3 benchmarks/rlhf.py --algorithm dpo --steps 10

Each side runs in a process of its own, so its peak RSS is its own; fp32, 2 threads,
nothing from the network (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE).

DPO: zerojax.rlhf.dpo vs TRL's DPOTrainer. Both sides start from one HF directory (the
~1M-param Llama of `_hf_llama`'s "tiny" shape, random weights, with a character-level
`tokenizer.json` both load, EOS appended to responses on both), train on the shipped toy
pairs (configs/rlhf/pairs.jsonl) with the same batch of pairs, AdamW (lr 1e-4, no weight
decay, torch's betas and eps), gradient clipping 1.0, constant lr, beta 0.1, sigmoid loss,
the reference model in memory (no precomputed log-probs). Reported: median step time over
the steps after the first (which compiles / warms up), pairs/s, the ratio, peak RSS, and
the first steps' losses (both start at log 2: policy = reference; the data orders differ,
so later steps drift apart).

GRPO: zerojax.rlhf.grpo vs TRL's GRPOTrainer (HF `generate`, no vLLM). A second HF
directory: the same "tiny" Llama shape with a character tokenizer over the prompt file's
characters plus the ten digits, its vocabulary exactly the tokenizer's (no id the policy
can sample lacks a character; EOS ends a completion on both). Both train on
configs/rlhf/prompts.jsonl (TRL gets it through `datasets.Dataset.from_list`) with the
reward examples/rlhf_rewards.py:digit_share (the share of digits in a completion), 16
completions per optimizer step (4 prompts x num_generations 4; TRL: per-device batch 16,
generation batch 16, one gradient-accumulation step, one update per generation),
max_new_tokens 32, temperature 1.0, top_p 1.0 (TRL: top_k 0), beta 0 (no reference
model), loss_type "dapo", epsilon 0.2, group-scaled advantages, AdamW (lr 1e-3, torch's
betas and eps, no weight decay), constant lr, clipping 1.0. How each column is measured:

- step s: zerojax: `step_time_s` of metrics.jsonl (the loop's wall time around one
  step: rollout, reward, batch building, train step); TRL: wall time between the
  Trainer's `on_step_begin` and `on_step_end` callbacks (rollout, reward, loss, backward,
  optimizer step).
- generation s: zerojax: `generation_s` (handing the actor's params to the serving
  engine, then sampling and detokenising all completions); TRL: wall time inside the
  trainer's `_generate` (prompt tokenisation, HF `generate`, EOS masking, decoding), the
  same span, timed by wrapping the bound method.
- training s: zerojax: `training_s` (the compiled train step: forward, backward, clip,
  AdamW, to the host); TRL: step time minus the time inside
  `_generate_and_score_completions` (generation, rewards, advantages), i.e. the
  Trainer's loss forward, backward, clip and optimizer step.
- completions/s: 16 / median step s. The medians skip the first step on both sides
  (zerojax compiles there, TRL warms up); that step's time is its own column.
- mean len: completion tokens per completion, averaged over the steps (EOS counted).
- load 1m: the host's 1-minute load average when the side started and ended; above the
  core count, other processes shared the cores and the times are inflated.
- rows zerojax-z3-tp1 / -tp2: the hybrid engine's two layouts on 2 devices: training
  ZeRO-3 over both, generation on one device (the params gathered onto it before each
  rollout) or Megatron TP over both (`rollout_tensor_parallel` 2).
- reward first -> last: the batch's mean digit_share at the first and the last step
  (zerojax `reward_mean`, TRL's logged `reward`); the samples differ (different RNGs),
  so only the trend compares.
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
PROMPTS = os.path.join(ROOT, "configs", "rlhf", "prompts.jsonl")
REWARDS = os.path.join(ROOT, "examples", "rlhf_rewards.py")
THREADS, BATCH, MAX_LEN, LR = 2, 8, 128, 1e-4
# GRPO: completions per optimizer step, samples per prompt, completion tokens, AdamW lr.
GRPO_BATCH, GENERATIONS, NEW_TOKENS, GRPO_LR = 16, 4, 32, 1e-3
DEFAULT_STEPS = {"dpo": 30, "grpo": 12}
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def make_model_dir(directory: str, data: str = PAIRS, extra_chars: str = "", vocab_size: int | None = 128) -> None:
    """The tiny Llama plus a character-level tokenizer (pad 0, EOS 1) in a HF directory.

    The characters are those of `data`'s string fields plus `extra_chars`; `vocab_size`
    None sizes the model's vocabulary to exactly the tokenizer's."""
    import tokenizers
    import torch
    import transformers

    from _hf_llama import MODELS

    chars = sorted({c for line in open(data) for value in json.loads(line).values() if isinstance(value, str)
                    for c in value} | set(extra_chars))
    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("[\\s\\S]"), "isolated")
    backend.decoder = tokenizers.decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size or len(vocab), max_position_embeddings=256,
                                      bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
                                      **MODELS["tiny"])
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


def load_reward():
    """examples/rlhf_rewards.py's digit_share, imported from its file (both sides)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rlhf_rewards", REWARDS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digit_share


def run_zerojax_grpo(model_dir: str, steps: int, devices: int = 1, stage: int = 0, rollout_tp: int = 1) -> dict:
    """zerojax's GRPO; with 2 devices the training layout is ZeRO-3 over both and the rollout
    generates on `rollout_tp` of them (the hybrid engine's two choices)."""
    from _devices import set_device_count
    set_device_count(devices)
    import zerojax

    out = tempfile.mkdtemp()
    config = {"train_batch_size": GRPO_BATCH, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": GRPO_LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                        "weight_decay": 0.0}},
              "zerojax": {"model": {"init_from": model_dir},
                          "rlhf": {"data": PROMPTS, "num_generations": GENERATIONS, "max_prompt_len": 64,
                                   "max_new_tokens": NEW_TOKENS, "temperature": 1.0, "top_p": 1.0, "beta": 0.0,
                                   "loss_type": "dapo", "rollout_tensor_parallel": rollout_tp},
                          "train": {"steps": steps, "log_every": 1, "checkpoint_every": 0, "out": out}}}
    zerojax.rlhf.grpo(config, out=out, stream=open(os.devnull, "w"), reward_fn=load_reward())
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    return {"step_times": [r["step_time_s"] for r in records],
            "generation": [r["generation_s"] for r in records], "training": [r["training_s"] for r in records],
            "rewards": [r["reward_mean"] for r in records], "lengths": [r["response_length"] for r in records]}


def run_trl_grpo(model_dir: str, steps: int) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(THREADS)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = datasets.Dataset.from_list([json.loads(line) for line in open(PROMPTS)])
    times, rewards, lengths = [], [], []
    spans = {"generate": [], "rollout": []}   # per call of _generate, _generate_and_score_completions

    class Stamps(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))
                lengths.append(float(logs.get("completions/mean_length", float("nan"))))

    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=GRPO_BATCH,
                          gradient_accumulation_steps=1, generation_batch_size=GRPO_BATCH,
                          num_generations=GENERATIONS, max_completion_length=NEW_TOKENS, temperature=1.0,
                          top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", epsilon=0.2, scale_rewards="group",
                          num_iterations=1, use_vllm=False, max_steps=steps, learning_rate=GRPO_LR,
                          lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                          adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False, fp16=False,
                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                          dataloader_num_workers=0, disable_tqdm=True)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[load_reward()], args=args, train_dataset=prompts,
                              processing_class=tok, callbacks=[Stamps()])

    def timed(name, method):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                spans[name].append(time.perf_counter() - t)
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)
    trainer.train()
    if not len(times) == len(spans["generate"]) == len(spans["rollout"]) == steps:
        raise RuntimeError(f"TRL: {len(times)} steps, {len(spans['generate'])} generations, "
                           f"{len(spans['rollout'])} rollouts; expected one of each per step ({steps})")
    return {"step_times": times, "generation": spans["generate"],
            "training": [t - r for t, r in zip(times, spans["rollout"])], "rewards": rewards, "lengths": lengths}


RUNNERS = {("dpo", "zerojax"): run_zerojax, ("dpo", "trl"): run_trl,
           ("grpo", "zerojax"): run_zerojax_grpo, ("grpo", "trl"): run_trl_grpo,
           ("grpo", "zerojax-z3-tp1"): lambda d, n: run_zerojax_grpo(d, n, devices=2, stage=3, rollout_tp=1),
           ("grpo", "zerojax-z3-tp2"): lambda d, n: run_zerojax_grpo(d, n, devices=2, stage=3, rollout_tp=2)}
SIDES = {"dpo": ("trl", "zerojax"), "grpo": ("trl", "zerojax", "zerojax-z3-tp1", "zerojax-z3-tp2")}


def side(algorithm: str, name: str, model_dir: str, steps: int) -> None:
    load = os.getloadavg()[0]
    result = RUNNERS[algorithm, name](model_dir, steps)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["load"] = [load, os.getloadavg()[0]]
    print("RESULT " + json.dumps(result), flush=True)


def run_sides(algorithm: str, steps: int) -> dict | None:
    """Each side in a subprocess of its own on one fresh model directory; None if one failed."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if algorithm == "dpo":
            make_model_dir(tmp)
        else:
            make_model_dir(tmp, PROMPTS, extra_chars="0123456789", vocab_size=None)
        for name in SIDES[algorithm]:
            run = subprocess.run([sys.executable, __file__, "--algorithm", algorithm, "--side", name, "--model-dir",
                                  tmp, "--steps", str(steps)], capture_output=True, text=True, cwd=HERE)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                print(f"{algorithm} {name} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
                return None
            results[name] = json.loads(lines[-1][7:])
    return results


def versions() -> str:
    import torch
    import transformers
    import trl
    return f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"


def report_dpo(results: dict, steps: int) -> None:
    print(f"DPO, {BATCH} pairs/step, max_len {MAX_LEN}, fp32, {THREADS} threads, {steps} steps; {versions()}")
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


def report_grpo(results: dict, steps: int) -> None:
    print(f"GRPO, {GRPO_BATCH} completions/step ({GRPO_BATCH // GENERATIONS} prompts x {GENERATIONS}), "
          f"max_new_tokens {NEW_TOKENS}, loss dapo, beta 0, lr {GRPO_LR:g}, fp32, {THREADS} threads, {steps} steps "
          f"(medians after the 1st); {versions()}")
    print(f"{'who':14s} {'step s':>7s} {'gen s':>7s} {'train s':>8s} {'compl/s':>8s} {'vs TRL':>7s} "
          f"{'gen vs TRL':>10s} {'1st step s':>10s} {'peak RSS MiB':>12s} {'mean len':>8s} {'load 1m':>9s}  "
          f"reward first -> last")
    base = None
    for name in SIDES["grpo"]:
        r = results[name]
        step, gen, train = (statistics.median(r[k][1:]) for k in ("step_times", "generation", "training"))
        rate = GRPO_BATCH / step
        base = base or (rate, gen)
        length = statistics.mean(r["lengths"]) if r["lengths"] else float("nan")
        print(f"{name:14s} {step:7.3f} {gen:7.3f} {train:8.3f} {rate:8.1f} {rate / base[0]:6.2f}x "
              f"{base[1] / gen:9.2f}x {r['step_times'][0]:10.2f} {r['peak_rss_mib']:12.0f} {length:8.1f} "
              f"{r['load'][0]:4.1f}-{r['load'][1]:<4.1f}  "
              f"{r['rewards'][0]:.3f} -> {r['rewards'][-1]:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithm", choices=["dpo", "grpo", "all"], default="all")
    parser.add_argument("--steps", type=int, help="steps per side (default: DPO 30, GRPO 12)")
    parser.add_argument("--side", choices=sorted({name for names in SIDES.values() for name in names}),
                        help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args.algorithm, args.side, args.model_dir, args.steps)
        return 0
    import _machine
    print(_machine.describe(), flush=True)
    for algorithm in (["dpo", "grpo"] if args.algorithm == "all" else [args.algorithm]):
        steps = args.steps or DEFAULT_STEPS[algorithm]
        results = run_sides(algorithm, steps)
        if results is None:
            return 1
        (report_dpo if algorithm == "dpo" else report_grpo)(results, steps)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
