"""The `zerojax` command. Bad input exits 2 with one line on stderr (a traceback only with --debug)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from zerojax.config import ConfigError
from zerojax.errors import CheckpointError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError)


def _export(args: argparse.Namespace) -> int:
    if args.hf:
        from zerojax.hf import export_checkpoint_to_hf
        out = export_checkpoint_to_hf(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype)
    else:
        from zerojax.checkpoint import export_safetensors
        out = export_safetensors(args.checkpoint, args.out, tag=args.tag, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from zerojax.launch import launch

    def count(flag: str, raw: str | None) -> int:
        if raw is None:
            raise ValueError(f"{flag} N is required")
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{flag} must be an integer >= 1, got {raw!r}") from None

    return launch(args.launch_command, nproc=count("--nproc", args.nproc),
                  devices_per_process=count("--devices-per-process", args.devices_per_process),
                  bind_cores=args.bind_cores)


def _cpu_devices_default() -> None:
    """On a CPU-only host, one device per core (up to 8) so ZeRO has something to shard over.

    Skipped when the user (XLA_FLAGS) or `zerojax launch` already chose a device count.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") \
            or "ZEROJAX_DEVICES_PER_PROCESS" in os.environ or "ZEROJAX_COORDINATOR" in os.environ:
        return
    import jax
    jax.config.update("jax_num_cpu_devices", max(1, min(os.cpu_count() or 1, 8)))


def _parse_set(pairs: list[str]) -> dict:
    """--set a.b=VALUE: VALUE is JSON when it parses (3, true, [1,2], "x"), a string otherwise."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE with a dotted key, e.g. zero_optimization.stage=2")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _load_config(path: str, overrides: list[str]):
    from zerojax.config import Config
    config = Config.load(path)
    return config.with_overrides(_parse_set(overrides)) if overrides else config


def _train(args: argparse.Namespace) -> int:
    from zerojax import distributed
    _cpu_devices_default()
    distributed.initialize()
    from zerojax.trainer import train
    if args.deepspeed:
        return _train_deepspeed(args)
    if args.config is None:
        raise ValueError("zerojax train needs a config: CONFIG (with a \"zerojax\" section) or "
                         "--deepspeed ds_config.json --model HF_DIR")
    config = _load_config(args.config, args.set)
    summary = train(None, config, steps=args.steps, out=args.out)
    return 0 if summary.get("steps") else 1


def _train_deepspeed(args: argparse.Namespace) -> int:
    """A pure DeepSpeed JSON + a HF model directory, "auto" values filled as HF's Trainer does."""
    import dataclasses

    import jax

    from zerojax import hf_auto
    from zerojax.config import Config
    if args.config is not None:
        raise ValueError(f"pass either CONFIG ({args.config}) or --deepspeed, not both")
    if not args.model:
        raise ValueError("--deepspeed needs --model HF_DIR (a Hugging Face model directory)")
    fields = {f.name for f in dataclasses.fields(hf_auto.TrainerArguments)} - {"explicit"}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    trainer_args = hf_auto.TrainerArguments(**given, explicit=frozenset(given))
    raw, kind, lines = hf_auto.run_config(args.deepspeed, args.model, trainer_args, data=args.data,
                                          seq_len=args.seq_len, steps=args.steps, out=args.out,
                                          devices=jax.device_count())
    if jax.process_index() == 0:
        for line in lines:
            print(line)
    config = Config.load(raw)
    config = config.with_overrides(_parse_set(args.set)) if args.set else config
    if kind == "pairs":
        from zerojax import rlhf
        summary = rlhf.sft(config, steps=args.steps, out=args.out)
    else:
        from zerojax.trainer import train
        summary = train(None, config, steps=args.steps, out=args.out)
    return 0 if summary.get("steps") else 1


def _rlhf(args: argparse.Namespace) -> int:
    from zerojax import distributed
    _cpu_devices_default()
    distributed.initialize()
    from zerojax import rlhf
    config = _load_config(args.config, args.set)
    summary = getattr(rlhf, args.algorithm)(config, steps=args.steps, out=args.out)
    return 0 if summary.get("steps") else 1


def _generate(args: argparse.Namespace) -> int:
    from zerojax import inference
    from zerojax.models import t5
    seq2seq = t5.load_for_generation(args.checkpoint, tag=args.tag)
    if seq2seq is not None:         # encoder-decoder: greedy, encoder once, decoder with a K/V cache
        model, tokenizer = seq2seq
        if tokenizer is None:
            raise ValueError(f"the T5 in {args.checkpoint} has no tokenizer.json; --prompt needs one")
        print("zerojax generate: T5 decodes greedily (sampling options are not used)", file=sys.stderr)
        print(t5.generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens))
        return 0
    pipe = inference.pipeline(args.checkpoint, tag=args.tag, token_budget=64, max_seqs=1)
    if pipe.tokenizer is None:
        raise ValueError(f"the model in {args.checkpoint} has no tokenizer (vocab "
                         f"{pipe.engine.geometry.vocab_size}, no tokenizer.json); --prompt needs one")
    out = pipe(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
               top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)[0]
    print(args.prompt + out.generated_text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.tensor_parallel > 1:
        _cpu_devices_default()
    from zerojax.serve.server import serve
    return serve(args)


def _info(args: argparse.Namespace) -> int:
    from zerojax import distributed
    _cpu_devices_default()
    distributed.initialize()
    import jax
    devices = jax.devices()
    print(f"platform: {devices[0].platform}  devices: {len(devices)} ({devices[0].device_kind})  "
          f"processes: {jax.process_count()} (this is {jax.process_index()})  local devices: {jax.local_device_count()}")
    if not args.config:
        return 0
    import numpy as np
    from zerojax.engine import initialize
    from zerojax.trainer import model_fn_from_config
    config = _load_config(args.config, args.set)
    model_fn, _ = model_fn_from_config(config)
    seq_len = int(config.zerojax.data.get("seq_len", 256))
    example = {"input_ids": np.zeros((1, seq_len), np.int32)}
    engine = initialize(model_fn=model_fn, config=config, abstract=True, example_batch=example)
    sizes = engine.batch_sizes
    print("mesh: " + "  ".join(f"{k} {v}" for k, v in engine.mesh.shape.items()))
    print(f"batch: train_batch_size {sizes.train_batch_size} = micro {sizes.micro_batch_size} × "
          f"gradient_accumulation_steps {sizes.gradient_accumulation_steps} × data-parallel "
          f"{sizes.train_batch_size // (sizes.micro_batch_size * sizes.gradient_accumulation_steps)}; "
          f"ZeRO stage {config.zero_optimization.stage}")
    report = engine.memory_report()
    print("per-device memory plan (MiB): " + "  ".join(
        f"{k} {v / 2**20:,.1f}" for k, v in report.items()))
    return 0


def _device_count(raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"--devices must be an integer >= 1, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"--devices must be an integer >= 1, got {n}")
    return n


def _simulate_cpu_devices(n: int) -> None:
    """N CPU devices for ahead-of-time compiles, when jax has not started its backends yet."""
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized():       # read when the backend starts
        from zerojax.distributed import strip_device_count_flag
        os.environ["XLA_FLAGS"] = (strip_device_count_flag(os.environ.get("XLA_FLAGS", ""))
                                   + f" --xla_force_host_platform_device_count={n}").strip()


def _memory_limits(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """--device-memory and --host-memory in bytes (None where not given)."""
    from zerojax.plan import parse_bytes
    device = parse_bytes(args.device_memory) if args.device_memory is not None else None
    host = parse_bytes(args.host_memory, "--host-memory") if args.host_memory is not None else None
    return device, host


def _plan(args: argparse.Namespace) -> int:
    """Every ZeRO stage x micro-batch x remat x offload candidate, compiled on --devices simulated CPU devices."""
    n = _device_count(args.devices)
    from zerojax.plan import accelerator_named, format_plan, plan
    accelerator_named(args.accelerator)                 # bad flags fail before any compile
    device_memory, host_memory = _memory_limits(args)
    config = _load_config(args.config, args.set)
    _simulate_cpu_devices(n)
    result = plan(config, n, device_memory, host_memory=host_memory, accelerator=args.accelerator,
                  compile=not args.no_compile)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _autotune(args: argparse.Namespace) -> int:
    """Rank candidates with the planner, time the best few on the devices, write the best config."""
    if args.devices is not None:
        _simulate_cpu_devices(_device_count(args.devices))
    else:
        _cpu_devices_default()
    from zerojax.plan import accelerator_named
    if args.accelerator is not None:
        accelerator_named(args.accelerator)
    device_memory, host_memory = _memory_limits(args)
    from zerojax import autotune
    autotune.load(args.config, _parse_set(args.set))     # a bad config fails before anything compiles
    result = autotune.autotune(args.config, None if args.devices is None else int(args.devices),
                               device_memory=device_memory, host_memory=host_memory,
                               accelerator=args.accelerator, overrides=_parse_set(args.set),
                               log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(result, indent=2) if args.json else autotune.format_results(result))
    return 0 if result["best"] else 1


def _add_run_options(parser, example_set: str) -> None:
    """--steps, --out and --set: what every training command takes."""
    parser.add_argument("--steps", type=int, help="train to this many steps (default: zerojax.train.steps)")
    parser.add_argument("--out", help="output directory: checkpoints, metrics.jsonl, loss curve")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key by dotted path, e.g. {example_set}")


def _add_deepspeed_options(parser) -> None:
    """`--deepspeed ds_config.json --model HF_DIR` and the HF Trainer arguments its "auto"s take."""
    group = parser.add_argument_group(
        "DeepSpeed + Hugging Face (instead of CONFIG)",
        'a pure DeepSpeed JSON; its "auto" values are filled from these arguments as HF\'s Trainer '
        "does (HF's spellings with underscores work too)")
    group.add_argument("--deepspeed", metavar="DS_CONFIG", help="DeepSpeed JSON (no \"zerojax\" section needed)")
    group.add_argument("--model", metavar="HF_DIR", help="Hugging Face model directory to fine-tune")
    group.add_argument("--data", help="text file/dir, token file, or prompt/response, source/target or "
                                      "messages JSONL (default: the built-in corpus)")
    group.add_argument("--seq-len", "--max_seq_length", dest="seq_len", type=int,
                       help="tokens per sequence (default: min(256, the model's max positions))")
    for name, kind in (("per_device_train_batch_size", int), ("gradient_accumulation_steps", int),
                       ("learning_rate", float), ("weight_decay", float), ("adam_beta1", float),
                       ("adam_beta2", float), ("adam_epsilon", float), ("max_grad_norm", float),
                       ("warmup_steps", int), ("warmup_ratio", float)):
        group.add_argument("--" + name.replace("_", "-"), "--" + name, dest=name, type=kind,
                           metavar="N" if kind is int else "X")
    group.add_argument("--bf16", action="store_const", const=True)
    group.add_argument("--fp16", action="store_const", const=True)


def _add_train_commands(commands) -> None:
    train = commands.add_parser("train", help="train the model a DeepSpeed JSON config names")
    train.add_argument("config", nargs="?",
                       help="DeepSpeed JSON config; model and data in its \"zerojax\" section")
    _add_run_options(train, "zero_optimization.stage=2")
    _add_deepspeed_options(train)
    train.set_defaults(run=_train)

    rlhf = commands.add_parser("rlhf", help="RLHF on a config's model: sft, reward, ppo (DeepSpeed-Chat's "
                                             "steps), dpo, grpo")
    rlhf.add_argument("algorithm", choices=["sft", "reward", "dpo", "ppo", "grpo"],
                      help="sft: fine-tune on prompt/response or messages JSONL; reward, dpo: on "
                           "prompt/chosen/rejected pairs; ppo, grpo: sample from prompts, score with "
                           "reward_fn or reward_model")
    rlhf.add_argument("config", help='DeepSpeed JSON config; data and settings in "zerojax": {"rlhf": {...}}')
    _add_run_options(rlhf, "zerojax.rlhf.max_len=256")
    rlhf.set_defaults(run=_rlhf)

    generate = commands.add_parser("generate", help="sample text from a trained checkpoint or HF directory (the inference engine)")
    generate.add_argument("checkpoint", help="a run's output directory (the one holding 'latest') or a HF directory")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--tag")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=40)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(run=_generate)

    from zerojax.serve.server import add_arguments
    add_arguments(commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server on the inference engine (completions, chat, streaming)"))
    commands.choices["serve"].set_defaults(run=_serve)

    info = commands.add_parser("info", help="devices, processes, and the mesh and memory plan of a config")
    info.add_argument("config", nargs="?")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    info.set_defaults(run=_info)

    plan = commands.add_parser("plan", help="per-device memory and predicted step time of each ZeRO stage x "
                                            "micro-batch x remat x offload candidate, compiled ahead of time "
                                            "on N simulated devices")
    _add_plan_options(plan, devices_required=True)
    plan.add_argument("--no-compile", action="store_true",
                      help="state columns (params, grads, optimizer, host) only, from the shardings; "
                           "no temp or step time")
    plan.set_defaults(run=_plan)

    autotune = commands.add_parser("autotune", help="rank candidates with the planner, time the best few "
                                                    "with short runs on the devices, write the best config "
                                                    "(DeepSpeed's \"autotuning\" section)")
    _add_plan_options(autotune, devices_required=False)
    autotune.set_defaults(run=_autotune)


def _add_plan_options(parser, devices_required: bool) -> None:
    parser.add_argument("config", help="DeepSpeed JSON config; model in its \"zerojax\" section")
    parser.add_argument("--devices", required=devices_required, metavar="N",
                        help="number of devices to plan for" if devices_required else
                        "use the first N devices (on CPU: N simulated devices; default: all)")
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="memory per device, e.g. 80GiB (default: the accelerator's)")
    parser.add_argument("--host-memory", metavar="SIZE", help="memory per host, e.g. 1TiB (default: no limit)")
    parser.add_argument("--accelerator", metavar="NAME", default="h100" if devices_required else None,
                        help="a100, h100, h200, v5e, v5p or cpu: the peak FLOP/s and bandwidths the "
                             "predicted step time uses (default: " + ("h100" if devices_required else
                             "the devices' own") + ")")
    parser.add_argument("--json", action="store_true", help="print only JSON on stdout")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerojax", description="DeepSpeed-style training on JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export", help="consolidated weights of a checkpoint as safetensors (zero_to_fp32's job)")
    export.add_argument("checkpoint", help="checkpoint directory (the one holding 'latest')")
    export.add_argument("out", help="output .safetensors file, or a directory with --hf")
    export.add_argument("--tag", help="checkpoint tag (default: what 'latest' names)")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    export.add_argument("--hf", action="store_true",
                        help="write a Hugging Face model directory (config.json + safetensors)")
    export.set_defaults(run=_export)
    _add_train_commands(commands)

    launch = commands.add_parser(
        "launch", help="run COMMAND as N local processes of one jax.distributed job",
        usage="zerojax launch --nproc N [--devices-per-process K] [--bind-cores auto|on|off] -- COMMAND...")
    launch.add_argument("--nproc", metavar="N", help="number of processes")
    launch.add_argument("--devices-per-process", metavar="K", default="1",
                        help="CPU devices each process exposes (default 1)")
    launch.add_argument("--bind-cores", choices=["auto", "on", "off"], default="auto",
                        help="give each process its own share of this host's cores (DeepSpeed's "
                             "--bind_cores_to_rank); auto: when the processes compute on the CPU")
    launch.add_argument("launch_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="the program each process runs, after --")
    launch.set_defaults(run=_launch)
    return parser


# Commands that run training or serving steps in this process.
_STEP_COMMANDS = ("train", "rlhf", "generate", "serve", "autotune")


def _restart_with_huge_pages(command: str) -> None:
    """On CPU, exec this command again with malloc's large buffers on transparent huge pages
    (zerojax.host_memory: GLIBC_TUNABLES is read only at process start, and XLA:CPU's
    per-step temp buffer otherwise faults in 4 KB pages every step). Returns where nothing
    is to change."""
    from zerojax import host_memory
    from zerojax.launch import computes_on_cpu

    if command not in _STEP_COMMANDS or not computes_on_cpu(os.environ):
        return
    env = host_memory.with_huge_pages(os.environ)
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:            # the command line (a caller's own argv runs in place)
        _restart_with_huge_pages(args.command)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"zerojax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
