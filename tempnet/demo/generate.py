"""The ``tempnet generate`` command: text from a model saved by ``tempnet demo``, with and without
its TempNet temperatures, and the temperature of every generated token."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tempnet.integrations.transformers import TempNetForCausalLM, TempNetLogitsProcessor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``tempnet generate``."""
    parser.add_argument("--model", type=Path, default=Path("tempnet_demo/model"),
                        help="directory written by `tempnet demo` (default: %(default)s)")
    parser.add_argument("--prompt", default="The for statement", help="text to continue (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy search")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both runs (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def _generate(model: TempNetForCausalLM, inputs: dict, args: argparse.Namespace,
              processor: TempNetLogitsProcessor | None) -> torch.Tensor:
    torch.manual_seed(args.seed)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "num_beams": args.num_beams,
               "pad_token_id": model.config.pad_token_id}
    if processor is None:
        return model.generate(**inputs, use_tempnet=False, **options)
    with processor:
        return model.model.generate(**inputs, logits_processor=[processor], **options)


def run_generate(args: argparse.Namespace) -> dict:
    """Generate from ``args.model`` twice (LM alone, LM with TempNet); print both continuations and
    the per-token temperatures; return them as a dict."""
    if args.max_new_tokens < 1 or args.num_beams < 1:
        raise ValueError("--max-new-tokens and --num-beams must be at least 1")
    if not (args.model / "tempnet_config.json").is_file():
        raise ValueError(f"--model {args.model} has no tempnet_config.json; run `tempnet demo --out DIR` first "
                         f"and pass --model DIR/model")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = TempNetForCausalLM.from_pretrained(args.model).to(args.device).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    prompt_length = inputs["input_ids"].shape[1]
    plain = _generate(model, inputs, args, None)[0, prompt_length:]
    processor = TempNetLogitsProcessor(model)
    tempered = _generate(model, inputs, args, processor)[0, prompt_length:]
    # Beam search records one τ per beam; the τ of the first row stands for the step.
    temperatures = [float(step[0]) for step in processor.temperatures][: len(tempered)]
    tokens = [tokenizer.decode([token]) for token in tempered.tolist()]
    result = {"prompt": args.prompt, "without_tempnet": tokenizer.decode(plain),
              "with_tempnet": tokenizer.decode(tempered), "tokens": tokens, "temperatures": temperatures}
    mode = "sampling" if args.sample else (f"beam search ({args.num_beams} beams)" if args.num_beams > 1 else "greedy")
    print(f"prompt: {args.prompt!r}   decoding: {mode}")
    print(f"\nwithout TempNet:\n{args.prompt}{result['without_tempnet']}")
    print(f"\nwith TempNet temperatures:\n{args.prompt}{result['with_tempnet']}")
    print("\nper-token temperature τ (with TempNet):")
    for token, tau in zip(tokens, temperatures, strict=False):
        print(f"  {tau:6.3f}  {'█' * max(1, round(20 * tau / model.tempnet.tau_max)):<20}  {token!r}")
    return result
