"""MLM head warm-up curves: held-out masked-LM loss of the offline e5-small's fresh MLM head while
it is trained alone (body frozen), starting from the model's zero output bias and from the unigram
prior (``language_sft.head_bias_init``), against the unigram prior by itself.

    python benchmarks/head_warmup.py [--langs ind jav sun bbc] [--steps 300] [--checkpoints 4]
                                     [--inits zero unigram] [--lr 1e-3] [--max-lines 256]

Text and held-out sets as in the NusaX experiments' ``mlm_loss`` diagnostics: each language's
bundled text (``language_sft.text: [all]``) minus a 2% held-out slice (``--held-out``); the head
trains on the other 98% of all languages' text together, batch 16, 15% masking, AdamW with a
linear decay over ``--steps``; the loss is the mean cross-entropy per masked token on fixed masks
(``deftx.held_out_mlm``), every ``steps / checkpoints`` steps.

Printed: per init and checkpoint, each language's held-out loss and the time; first the loss of
the unigram prior alone (its log-probabilities as logits, no model) and of a uniform guess.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _common import machine_info, table

from deftx.config import SFTConfig
from deftx.core.roles import parameter_roles
from deftx.held_out_mlm import held_out_loss, held_out_set
from deftx.models import load_masked_lm, load_tokenizer, resolve_model_path
from deftx.tasks import task_spec
from deftx.training.batches import IGNORE_INDEX, masked_lm_stream
from deftx.training.head_init import initialise_mlm_head, output_bias, unigram_log_prior
from deftx.training.objectives import masked_lm_loss


def prior_loss(prior: torch.Tensor, data) -> float:
    total = sum(float(-prior[b["labels"][b["labels"] != IGNORE_INDEX]].sum()) for b in data.batches)
    return total / data.predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--langs", nargs="+", default=["ind", "jav", "sun", "bbc"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--inits", nargs="*", default=["zero", "unigram"], choices=["zero", "unigram"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--held-out", type=float, default=0.02)
    parser.add_argument("--max-lines", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    print(machine_info())
    path = resolve_model_path("offline:multilingual-e5-small", log=lambda line: None)
    tokenizer = load_tokenizer(path)
    spec = task_spec("nusax_senti")
    settings = SFTConfig(text=["all"], held_out=args.held_out)
    train: list[str] = []
    sets = {}
    for lang in args.langs:
        train += spec.adaptation_text(lang, "bundled", settings, "train")
        sets[lang] = held_out_set(tokenizer, lang, spec.adaptation_text(lang, "bundled", settings, "held_out"),
                                  max_length=128, max_lines=args.max_lines)
    stream = masked_lm_stream(tokenizer, train, batch_size=16, seed=args.seed, max_length=128, mlm_probability=0.15)
    print(f"{len(train)} training lines; held-out masked tokens: "
          + ", ".join(f"{lang} {data.predicted}" for lang, data in sets.items()))

    model, _ = load_masked_lm(path, seed=args.seed)
    size = output_bias(model).numel()
    prior = unigram_log_prior(stream.sequences, size, special_ids=stream.special_ids)
    rows = [["uniform guess", "-", *[f"{math.log(size):.3f}"] * len(sets), "-"],
            ["unigram prior alone", "-", *[f"{prior_loss(prior, d):.3f}" for d in sets.values()], "-"]]
    every = max(args.steps // args.checkpoints, 1)
    for how in args.inits:
        model, _ = load_masked_lm(path, seed=args.seed)
        initialise_mlm_head(model, stream, how)
        roles = parameter_roles(model, "language")
        for p in roles.maskable.values():
            p.requires_grad_(False)
        params = list(roles.head.values())
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / args.steps))
        start = time.perf_counter()
        model.eval()
        rows.append([how, 0, *[f"{held_out_loss(model, d):.3f}" for d in sets.values()], "0"])
        for step in range(args.steps):
            model.train()
            loss = masked_lm_loss(model, stream.batch_at(step))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            if (step + 1) % every == 0 or step + 1 == args.steps:
                model.eval()
                rows.append([how, step + 1, *[f"{held_out_loss(model, d):.3f}" for d in sets.values()],
                             f"{time.perf_counter() - start:.0f}"])
                print(f"[{how}] step {step + 1}: " + " ".join(rows[-1][2:]), flush=True)
    print(table(["head", "steps", *sets, "seconds"], rows))


if __name__ == "__main__":
    main()
