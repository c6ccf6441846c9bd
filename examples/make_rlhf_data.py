"""Writes the toy RLHF data shipped in configs/rlhf/ (no download): polite vs rude replies.

    python3 examples/make_rlhf_data.py [--out configs/rlhf] [--count 256]

sft.jsonl    {"prompt", "response"}: requests answered politely.
pairs.jsonl  {"prompt", "chosen", "rejected"}: the polite reply chosen over a rude one, for
             the reward model and DPO. Deterministic (seeded), short enough for the byte
             tokenizer and a 128-token context.
prompts.jsonl {"prompt", "target_len"}: requests for a number, for PPO and GRPO with the
             programmatic rewards of examples/rlhf_rewards.py (digits; a target length).
"""
from __future__ import annotations

import argparse
import json
import os
import random

TASKS = ["open the window", "pass the salt", "check my code", "book a table", "call a taxi", "find my keys",
         "water the plants", "read this page", "fix the printer", "send the report", "feed the cat",
         "lock the door", "charge my phone", "print the map", "clean the desk", "bring some tea"]
ASKS = ["Could you {t}?", "Please {t}.", "Can you {t} for me?", "I need you to {t}.", "Would you {t}?"]
POLITE = ["Of course, I will {t} right away.", "Sure, happy to {t} for you.", "Certainly! I will {t} now.",
          "Gladly, let me {t}."]
RUDE = ["No. {T} yourself.", "Ugh, go {t} on your own.", "Not my problem, {t} alone.", "Whatever. No."]


def examples(count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        task = rng.choice(TASKS)
        prompt = "User: " + rng.choice(ASKS).format(t=task) + "\nBot:"
        theirs = task.replace("my ", "your ")          # the reply speaks of the user's things
        polite = " " + rng.choice(POLITE).format(t=theirs)
        rude = " " + rng.choice(RUDE).format(t=theirs, T=theirs.capitalize())
        yield prompt, polite, rude


NUMBER_ASKS = ["Give me a number to {t}.", "How many tries to {t}?", "Pick a code to {t}.",
               "Write the count to {t}."]


def number_prompts(count: int, seed: int = 1):
    rng = random.Random(seed)
    for _ in range(count):
        yield "User: " + rng.choice(NUMBER_ASKS).format(t=rng.choice(TASKS)) + "\nBot:", rng.choice([4, 8, 12])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "configs", "rlhf"))
    parser.add_argument("--count", type=int, default=256)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = list(examples(args.count))
    with open(os.path.join(args.out, "sft.jsonl"), "w") as f:
        for prompt, polite, _ in rows:
            f.write(json.dumps({"prompt": prompt, "response": polite}) + "\n")
    with open(os.path.join(args.out, "pairs.jsonl"), "w") as f:
        for prompt, polite, rude in rows:
            f.write(json.dumps({"prompt": prompt, "chosen": polite, "rejected": rude}) + "\n")
    with open(os.path.join(args.out, "prompts.jsonl"), "w") as f:
        for prompt, target_len in number_prompts(64):
            f.write(json.dumps({"prompt": prompt, "target_len": target_len}) + "\n")
    print(f"wrote {len(rows)} SFT examples, {len(rows)} preference pairs and 64 prompts to "
          f"{os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
