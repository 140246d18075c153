"""Time reconstruction steps eager against ``runtime.compile=true``, interleaved round by round.

    python -m saq.bench recon-step outputs/vit_t_coco/w4a4_saq_base_i20_s0/quantized.pt \
        --rounds 3 --out outputs/bench/recon_step_vit_t_w4a4.json

One training step (forward, backward, Adam) of each unit type on a quantized checkpoint: the SAQ-SAM
decoder layer (CLM loss, 16 box prompts, the undropped pass for the final-token term) and every encoder
stage (stage-output MSE, QDrop-mixed input), QDrop probability 0.5 as in the saq recipes. The image and
the boxes are random (cost only): what is timed is the arithmetic of a step, which does not depend on
the values. Eager and compiled steps alternate on the same unit, so both see the same machine load.
Before timing, each unit takes ``--agree-steps`` steps in each mode from the same state and seed, and the
losses, gradients and learned parameters are compared bit for bit (the compiled kernels are meant to
change the speed of a run, not its result).
Writes JSON (per unit: ms per step of each mode, median, speedup, agreement) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from saq.config.schema import ReconConfig
from saq.engine.reconstruction import UnitReconstruction
from saq.export.checkpoint import load_quantized
from saq.models.units import ReconUnit, decoder_clm_units, encoder_units
from saq.ptq.capture import _detach
from saq.quant.fused import use_fused_kernels_
from saq.quant.quantizer import QuantMode, quant_mode
from saq.utils.run_files import write_json

CPU = torch.device("cpu")


def captured_input(model: torch.nn.Module, entry: str, forward: Callable[[], Any]) -> tuple[tuple, dict]:
    """(args, kwargs) of the module ``entry`` during ``forward()``."""
    seen: dict[str, Any] = {}
    handle = model.get_submodule(entry).register_forward_pre_hook(
        lambda module, args, kwargs: seen.setdefault("input", (_detach(args, CPU, None), _detach(kwargs, CPU, None))),
        with_kwargs=True)
    try:
        with torch.no_grad(), quant_mode(model, QuantMode.OFF):
            forward()
    finally:
        handle.remove()
    return seen["input"]


def unit_batches(model: torch.nn.Module, prompts: int, generator: torch.Generator, *, decoder: bool = True,
                 stages: int | None = None) -> list[tuple[ReconUnit, dict]]:
    """A step's batch for the first CLM decoder layer (unless ``decoder=False``) and for the first ``stages``
    encoder stages (all when None). The generator draws the same numbers whichever are built."""
    encoder = model.image_encoder
    image = torch.randn(1, 3, encoder.img_size, encoder.img_size, generator=generator)
    embed = torch.randn(1, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size,
                        generator=generator)
    corners = torch.rand(prompts, 2, 2, generator=generator).sort(dim=1).values * encoder.img_size
    boxes = corners.reshape(prompts, 4)

    def decode() -> None:
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        model.mask_decoder(image_embeddings=embed, image_pe=model.prompt_encoder.get_dense_pe(),
                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)

    batches = []
    if decoder:
        decoder_unit = decoder_clm_units(model)[0]
        args, kwargs = captured_input(model, decoder_unit.entry, decode)
        with torch.no_grad():  # CLM targets: the FP later layers on the quantized embedding's path
            target = decoder_unit.run(model, args, kwargs)
        batches.append((decoder_unit, {"index": 0, "q": (args, kwargs), "fp": None, "target": target,
                                       "head_target": None}))
    for unit in [u for u in encoder_units(model, "stage") if u.kind == "stage"][:stages]:
        args, kwargs = captured_input(model, unit.entry, lambda: encoder(image))
        with torch.no_grad(), quant_mode(model, QuantMode.OFF):
            target = unit.run(model, args, kwargs)
        noisy = ((args[0] + 0.01 * torch.randn(args[0].shape, generator=generator),), kwargs)
        batches.append((unit, {"index": 0, "q": noisy, "fp": (args, kwargs), "target": target, "head_target": None}))
    return batches


def steps_agree(model: torch.nn.Module, unit: ReconUnit, batch: dict, steps: int, seed: int = 0) -> dict[str, Any]:
    """``steps`` training steps eager and compiled from the same start and seed (the same QDrop draws):
    are the losses, each step's gradients and the final learned parameters the same bit for bit?"""
    runs = []
    for compiled in (False, True):
        module = UnitReconstruction(model, unit, ReconConfig(iters=steps, qdrop_prob=0.5, reg_weight=0.0, a_lr=2e-3))
        module.make_trainable()  # what a fit's setup does
        start = module.snapshot()
        optimizers, _ = module.configure_optimizers()
        losses, grads = [], []
        use_fused_kernels_(model, compiled)
        torch.manual_seed(seed)
        try:
            for _ in range(steps):
                loss = module.reconstruction_loss(batch)
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                losses.append(loss.item())
                grads.append([None if p.grad is None else p.grad.clone() for p in [*module.alphas, *module.scales]])
                for optimizer in optimizers:
                    optimizer.step()
                module.keep_steps_positive_()
            runs.append((losses, grads, module.snapshot()))
        finally:
            module.restore(start)
            use_fused_kernels_(model, False)
            module.finalize()
    (eager_losses, eager_grads, eager_params), (losses, grads, params) = runs
    pairs = [(a, b) for step_a, step_b in zip(eager_grads, grads) for a, b in zip(step_a, step_b)]
    return {"steps": steps, "losses_equal": eager_losses == losses,
            "gradients_equal": sum(a is b is None or (a is not None and b is not None and torch.equal(a, b))
                                   for a, b in pairs), "gradients": len(pairs),
            "parameters_equal": sum(torch.equal(a, b) for a, b in zip(eager_params, params)),
            "parameters": len(params)}


def train_step(module: UnitReconstruction, optimizers: list, batch: dict) -> None:
    """One training step as the run takes it: loss, backward, every optimizer, steps kept positive."""
    loss = module.reconstruction_loss(batch)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    module.keep_steps_positive_()


def time_unit(model: torch.nn.Module, unit: ReconUnit, batch: dict, rounds: int, steps: int) -> dict[str, Any]:
    """ms per step, eager and compiled alternating (which goes first alternates too, so neither always
    runs on caches the other warmed); the unit's quantizers are finalized afterwards, whatever happens."""
    module = UnitReconstruction(model, unit, ReconConfig(iters=steps * rounds * 2, qdrop_prob=0.5,
                                                           reg_weight=0.0, a_lr=2e-3))
    module.make_trainable()  # what a fit's setup does
    optimizers, _ = module.configure_optimizers()  # the run's optimizers: rounding and steps, own rates

    def step() -> None:
        train_step(module, optimizers, batch)

    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    try:
        for compiled in (True, False):  # warm-up: the compiled kernels compile on their first calls
            use_fused_kernels_(model, compiled)
            step()
        for round_index in range(rounds):
            order = ("eager", "compiled") if round_index % 2 == 0 else ("compiled", "eager")
            for mode in order:
                use_fused_kernels_(model, mode == "compiled")
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                times[mode].append(1000 * (time.perf_counter() - start) / steps)
    finally:
        use_fused_kernels_(model, False)
        module.finalize()
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"unit": unit.name, "kind": unit.kind, "ms_per_step": times, "eager_median_ms": eager,
            "compiled_median_ms": compiled, "speedup": eager / compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run's quantized.pt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="steps per round and mode")
    parser.add_argument("--prompts", type=int, default=16, help="box prompts per image (the reconstruction cap)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--agree-steps", type=int, default=2, help="steps of the eager/compiled agreement check "
                        "(0: skip it)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, payload = load_quantized(args.checkpoint)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for unit, batch in unit_batches(model, args.prompts, generator):
        agreement = steps_agree(model, unit, batch, args.agree_steps) if args.agree_steps else None
        rows.append({**time_unit(model, unit, batch, args.rounds, args.steps), "agreement": agreement})
    result = {"checkpoint": str(args.checkpoint), "model": payload["model_name"], "threads": torch.get_num_threads(),
              "rounds": args.rounds, "steps": args.steps, "prompts": args.prompts, "machine": platform.processor()
              or platform.machine(), "torch": torch.__version__, "units": rows,
              "note": "random image and boxes: step cost only"}
    print("| unit | kind | eager ms/step | compiled ms/step | speedup | same parameters after the check |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        agree = r["agreement"]
        same = f"{agree['parameters_equal']}/{agree['parameters']}" if agree else "-"
        print(f"| {r['unit']} | {r['kind']} | {r['eager_median_ms']:.0f} | {r['compiled_median_ms']:.0f} | "
              f"{r['speedup']:.2f}x | {same} |")
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
