"""The one training loop every engine's training plugs into: a ``Recipe`` (its parameter groups, its loss on a batch,
its trained state) run by ``run_loop`` with AdamW and a one-cycle cosine schedule, seeded batches, atomic
checkpoints every ``ckpt_every`` steps with resume, progress, an optional early stop on a validation score,
optional bf16 autocast of each step's forward pass and loss (weights, gradients and optimiser state stay float32) and
optional clipping of the gradient norm.
Checkpoints are plain dicts of tensors and numbers, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..engines.contract import autocast, check_precision
from ..errors import InputError
from ..progress import Progress
from .datasets import collate


def _cosine(opt, steps):
    # 5% warm-up; short runs warm up for 30% (OneCycleLR divides by zero when the warm-up is exactly one step)
    pct = 0.05 if steps >= 60 else 0.3
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps,
                                               pct_start=pct, anneal_strategy="cos")


def check_grad_norm(limit: float | None) -> float | None:
    """A gradient-norm limit (``--max-grad-norm``) or None -> itself; InputError unless a finite number above 0."""
    if limit is not None and not (math.isfinite(limit) and limit > 0):
        raise InputError(f"--max-grad-norm {limit:g}: give a finite limit above 0 (e.g. 1.0), or leave it out")
    return limit


def _save(path: Path, **state):
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _batches(dataset, batch_size: int, seed: int):
    """Endless shuffled batches; shuffling seeded so a run is repeatable. Only full batches are used, so a dataset
    smaller than one batch is an error (it would otherwise wait forever for a batch)."""
    if len(dataset) < batch_size:
        raise InputError(f"the training data has {len(dataset)} samples, fewer than one batch of {batch_size}; "
                         f"add images (or phantoms with --phantoms) or lower the batch size")
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(dataset), generator=g).split(batch_size):
            if len(idx) == batch_size:
                yield collate([dataset[int(i)] for i in idx])


@dataclass
class Recipe:
    """What an engine plugs into the one training loop (``run_loop``).

    ``param_groups``: the optimiser's groups (AdamW; each may set its own ``lr``); ``loss(batch) -> scalar tensor``
    for one batch of ``datasets.collate`` (images ``[B,C,S,S]``, phrases (N), masks ``[N,S,S]``, pair_index
    ``[N]``); ``state()`` / ``load(state)``: the trained weights a checkpoint holds; ``train(mode)``: switch the
    modules between training and evaluation; ``name``: the progress stage."""

    name: str
    param_groups: list
    loss: Callable
    state: Callable[[], dict]
    load: Callable[[dict], None]
    train: Callable[[bool], None]
    weight_decay: float = 0.0
    # what a checkpoint must have been made with to be resumed (schedule length, batch, learning rates,
    # architecture): a checkpoint of other settings is refused instead of silently continued
    fingerprint: dict | None = None


def run_loop(recipe: Recipe, dataset, steps: int, ckpt: Path, batch_size: int, seed: int = 0, resume: bool = True,
             ckpt_every: int = 100, progress: Progress | None = None, stop_after: int | None = None,
             validate: Callable[[], float] | None = None, validate_every: int = 100,
             patience: int | None = None, precision: str = "fp32",
             max_grad_norm: float | None = None) -> list[float]:
    """The one training loop: AdamW with a one-cycle cosine schedule over ``steps``, seeded batches, a checkpoint
    (weights, optimiser, schedule, step, best validation) every ``ckpt_every`` steps and at the end (atomic rename),
    resumed from ``ckpt`` when ``resume``; progress with the loss.

    ``stop_after`` ends this call early (a checkpoint is written), e.g. to split a long run. ``validate()`` (lower is
    better, e.g. a validation loss) runs every ``validate_every`` steps; with ``patience``, training stops once that
    many validations in a row did not improve on the best (early stop; the schedule is not stretched).
    ``precision`` bf16: each step's ``recipe.loss`` runs under bf16 autocast on the device of the recipe's first
    parameter (``engines.contract.effective_precision`` says where that pays off). Returns the loss of every step run
    in this call.

    ``max_grad_norm``: each step's gradients (all parameter groups together) are scaled down to that L2 norm when
    larger (``torch.nn.utils.clip_grad_norm_``); the progress shows each step's norm before clipping and the run ends
    saying how many steps were clipped. A step whose gradient is not finite (NaN or inf) is then skipped, not taken
    (scaling would spread the NaN to every weight), and counted apart. Part of the checkpoint's fingerprint when
    set."""
    check_precision(precision)
    check_grad_norm(max_grad_norm)
    progress = progress or Progress("none")
    params = [p for g in recipe.param_groups for p in g["params"]]
    device_type = params[0].device.type
    recipe.train(True)
    opt = torch.optim.AdamW(recipe.param_groups, weight_decay=recipe.weight_decay)
    sched = _cosine(opt, steps)
    step, best, stale = 0, float("inf"), 0
    clip = {"max_grad_norm": max_grad_norm} if max_grad_norm is not None else {}  # old checkpoints still resume
    fingerprint = json.dumps({"steps": steps, "batch_size": batch_size, **clip, **(recipe.fingerprint or {})},
                             sort_keys=True, default=str)
    if resume and ckpt.is_file():
        ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        if ck.get("fingerprint", fingerprint) != fingerprint:
            raise InputError(f"the checkpoint {ckpt} was made by a {recipe.name} run with other settings "
                             f"({ck['fingerprint']}) than this one ({fingerprint}); resume it with the same settings, "
                             f"or start over (--no-resume) or use another --work-dir")
        recipe.load(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step, best, stale = int(ck["step"]), float(ck.get("best", best)), int(ck.get("stale", 0))
    torch.manual_seed(seed + step)
    batches = _batches(dataset, batch_size, seed + step)
    losses = []
    end = steps if stop_after is None else min(steps, step + stop_after)
    stopped, clipped, skipped = False, 0, 0
    while step < end and not stopped:
        batch = next(batches)  # data preparation (augmentation) stays outside autocast
        with autocast(precision, device_type):
            loss = recipe.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()
        info = f"loss {value:.3f}"
        finite = True
        if max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            finite = math.isfinite(norm)
            clipped += finite and norm > max_grad_norm
            skipped += not finite
            info += f", gradient norm {norm:.3g}" + ("" if finite else " (step skipped)")
        if finite:
            opt.step()
        sched.step()
        step += 1
        losses.append(value)
        if validate is not None and (step % validate_every == 0 or step == steps):
            recipe.train(False)
            with torch.no_grad():
                score = float(validate())
            recipe.train(True)
            best, stale = (score, 0) if score < best else (best, stale + 1)
            info += f", validation {score:.3f} (best {best:.3f})"
            stopped = patience is not None and stale >= patience
        progress.update(recipe.name, step, end, info)
        if step % ckpt_every == 0 or step == end or stopped:
            _save(ckpt, step=step, model=recipe.state(), opt=opt.state_dict(), sched=sched.state_dict(), best=best,
                  stale=stale, fingerprint=fingerprint)
    if stopped:
        progress.message(f"{recipe.name}: stopped early at step {step} of {steps}: the validation score did not "
                         f"improve for {patience} checks in a row (best {best:.4f})")
    if max_grad_norm is not None and losses:
        progress.message(f"{recipe.name}: the gradient norm was clipped to {max_grad_norm:g} in {clipped} of the "
                         f"{len(losses)} steps run" + (f"; {skipped} step(s) with a non-finite gradient were skipped"
                                                       if skipped else ""))
    recipe.train(False)
    return losses


def check_stage_list(stages, known: tuple, recipe: str | None, example: str | None = None) -> tuple:
    """``stages`` (names) -> a tuple of them, stripped; InputError naming an unknown one (or none given) and the
    ``known`` stages of ``recipe`` (e.g. "medclipsam"; None: just "the stages"), with an ``example`` list if given."""
    stages = tuple(s.strip() for s in stages if s.strip())
    unknown = [s for s in stages if s not in known]
    if unknown or not stages:
        whose = f"{recipe} stages" if recipe else "stages"
        hint = f"; e.g. --stages {example}" if example else ""
        raise InputError(f"--stages {','.join(stages)}: unknown stage {unknown[0] if unknown else '(none)'!r}; the "
                         f"{whose} are {','.join(known)} (in that order{hint})")
    return stages


def check_calibrated_with(presence: dict, key: str, wanted, default, work_dir: Path, describe) -> None:
    """InputError when a staged rule (``staged_presence``) was calibrated with another ``presence["calibration"][key]``
    (``default`` when not recorded) than this run's ``wanted``, so a spec never holds a setting its rules were not
    fitted to; ``describe(value)`` says a value as the flag that sets it (e.g. "with --slice-vote 3")."""
    got = presence["calibration"].get(key, default)
    if got != wanted:
        raise InputError(f"the rules in {Path(work_dir) / 'presence.json'} were calibrated {describe(got)}, this run "
                         f"asks {describe(wanted)}; run the calibrate stage again with the same setting "
                         f"(--stages calibrate,export)")


def staged_presence(work_dir: Path, stages, calibrate: Callable[[], dict]) -> dict | None:
    """The presence rule of a staged training run: with the "calibrate" stage, ``calibrate()`` computes it and it is
    kept as ``work_dir/presence.json``; with the "export" stage it is read back from there (-> the rule), else None.
    Raises InputError when export finds no calibrated rule."""
    path = Path(work_dir) / "presence.json"
    if "calibrate" in stages:
        path.write_text(json.dumps(calibrate(), indent=2), encoding="utf-8")
    if "export" not in stages:
        return None
    if not path.is_file():
        raise InputError(f"no calibrated rule {path}: run the 'calibrate' stage first (--stages calibrate,export) or "
                         f"give the --work-dir that holds it")
    return json.loads(path.read_text(encoding="utf-8"))

