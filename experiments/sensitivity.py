"""Sensitivity of a quantized SAM to each quantizer group (``saq.eval.sensitivity.SAM_GROUPS``).

The model is calibrated once with the recipe's statistics stages (default ``ptq=ptq4sam_s``, W4A4), with
the parts the paper rules keep FP quantized too (so that their cost can be measured; they stay off in
every other row). Then, on a fixed subset of the evaluation set:
  only <group>: that group quantized, everything else FP;
  all but <group>: every group of the protocol quantized except that one.
Each row is appended to the JSON as it finishes; a rerun with the same --out skips the rows it holds.

    python experiments/sensitivity.py --out results/vit_t_coco/sensitivity.json \
        experiment=vit_t_coco quant=w4a4 ptq=ptq4sam_s seed=0 data.max_images=32

With --from-run <run dir>, the model is the run's finished ``quantized.pt`` (after reconstruction and
compensation) instead of a fresh calibration, and only the "all but" rows are measured: where the loss
sits in the model a recipe delivers. Its weights are stored on their grid, so switching a weight
quantizer off changes nothing; groups of weight quantizers alone are left out.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path

import torch

from saq.eval import evaluate
from saq.eval.metrics import fidelity
from saq.eval.sensitivity import SAM_GROUPS, check_partition, set_groups_quantized
from saq.nn import quantize_
from saq.nn.quantize import QuantRule
from saq.ptq.recipe import rules_from_config

from run_setup import compose_run, run_inputs, run_recipe_stages

# Kept FP by the paper's protocol; quantized here only for their own rows.
PROTOCOL_FP_GROUPS = {"enc_patch_embed", "dec_heads"}
EXTRA_PATTERNS = ("image_encoder.patch_embed*", "mask_decoder.output_hypernetworks_mlps*",
                  "mask_decoder.iou_prediction_head*")


def sensitivity_rules(config: dict) -> list[QuantRule]:
    """The recipe's rules, with the protocol's FP parts given the encoder's (patch embed) or decoder's bits."""
    rules = rules_from_config(config["quant"], config["ptq"])
    enc = next(r for r in rules if r.pattern == "image_encoder*")
    dec = next(r for r in rules if r.pattern == "mask_decoder*")
    extra = [QuantRule(p, enc.weight, enc.act, enc.softmax) if p.startswith("image_encoder")
             else QuantRule(p, dec.weight, dec.act, dec.softmax) for p in EXTRA_PATTERNS]
    return extra + [r for r in rules if r.pattern not in EXTRA_PATTERNS]


def finished_model(run_dir: Path, config: dict) -> torch.nn.Module:
    """The quantized model a run saved, after checking it is the model and bits this study composes."""
    from saq.export.checkpoint import load_quantized

    model, payload = load_quantized(run_dir / "quantized.pt")
    saved = payload["config"]
    for key in ("model", "quant"):
        if saved[key].get("name") != config[key].get("name"):
            raise SystemExit(f"{run_dir} holds {key}={saved[key].get('name')} but the overrides compose "
                             f"{key}={config[key].get('name')}: pass the run's own {key}")
    return model


def plot(record: dict, path: Path) -> Path:
    """Two bar charts per group: AP lost when only it is quantized, AP regained when only it is FP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fp_ap = record["rows"], record["fp"]["mask_AP"]
    all_ap = rows["all (protocol)"]["mask_AP"]
    groups = [g for g in record["groups"] if f"only {g}" in rows or f"all but {g}" in rows]
    panels = []  # (label, color, AP per group); a study of a finished run has no "only" rows
    if any(f"only {g}" in rows for g in groups):
        panels.append(("AP lost: only this group quantized", "tab:red",
                       [fp_ap - rows[f"only {g}"]["mask_AP"] if f"only {g}" in rows else float("nan") for g in groups]))
    panels.append(("AP regained: only this group FP", "tab:green",
                   [rows[f"all but {g}"]["mask_AP"] - all_ap if f"all but {g}" in rows else float("nan") for g in groups]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.32 * len(groups) + 1.5), sharey=True,
                             squeeze=False)
    for ax, (label, color, values) in zip(axes[0], panels):
        ax.barh(groups, values, color=color)
        ax.set_xlabel(label)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{record['eval_images']} images: FP {fp_ap:.1f} AP, all quantized {all_ap:.1f} AP\n"
                 + "\n".join(textwrap.wrap(" ".join(record["overrides"]), 90 * len(panels))), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file (rows are appended; reruns resume)")
    parser.add_argument("--from-run", type=Path, help="a finished run dir: study its quantized.pt (no calibration)")
    parser.add_argument("--plot-only", action="store_true", help="redraw <out>.png from the JSON and stop")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ptq.yaml")
    args = parser.parse_args()
    if args.plot_only:
        print(f"wrote {plot(json.loads(args.out.read_text()), args.out.with_suffix('.png'))}")
        return

    cfg, config = compose_run(args.overrides)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(out.read_text()) if out.is_file() else {}
    if record and record.get("overrides") != args.overrides:
        raise SystemExit(f"{out} holds rows of other overrides ({record.get('overrides')}): pass another --out")
    record.update(overrides=args.overrides, rows=record.get("rows", {}))

    inputs = run_inputs(cfg, config)
    model, eval_set, eval_prompts, calib_items = inputs.model, inputs.eval_set, inputs.eval_prompts, inputs.calib_items

    def run_eval(label: str):
        start = time.perf_counter()
        result = evaluate(model, eval_set, eval_prompts, label, int(cfg.eval.prompt_batch), bool(cfg.runtime.progress), 0)
        return result, time.perf_counter() - start

    fp, _ = run_eval("eval fp")
    record["fp"] = {"mask_AP": fp.metrics["mask_AP"], "mIoU": fp.metrics["mIoU"]}
    record["eval_images"] = len(eval_set.images)

    if args.from_run:
        model = finished_model(args.from_run, config)
        record["from_run"] = args.from_run.as_posix()
    else:
        quantize_(model, sensitivity_rules(config))
        start = time.perf_counter()
        with torch.no_grad():
            run_recipe_stages(inputs, cfg, config, recon_items=calib_items, progress=True)
        record["calibration_s"] = round(time.perf_counter() - start, 1)
    members = check_partition(model)
    if args.from_run:  # weights already on their grid: a group of weight quantizers alone has nothing to switch
        members = {g: names for g, names in members.items()
                   if any(not n.endswith("weight_quantizer") for n in names)}
    record["groups"] = {g.name: {"description": g.description, "quantizers": len(members[g.name])}
                        for g in SAM_GROUPS if members.get(g.name)}
    present = [g for g in record["groups"] if g != "other"]
    protocol = {g for g in present if g not in PROTOCOL_FP_GROUPS}
    model.eval()

    plan = [("all (protocol)", protocol)]
    if not args.from_run:
        plan += [(f"only {g}", {g}) for g in present]
    plan += [(f"all but {g}", protocol - {g}) for g in sorted(protocol)]
    for label, groups in plan:
        if label in record["rows"]:
            continue
        set_groups_quantized(model, groups)
        result, seconds = run_eval(label)
        record["rows"][label] = {"groups": sorted(groups), "mask_AP": result.metrics["mask_AP"],
                                 "mIoU": result.metrics["mIoU"],
                                 "fidelity_mIoU": fidelity(result.masks(), fp.masks()), "eval_s": round(seconds, 1)}
        out.write_text(json.dumps(record, indent=1))
        print(f"{label:32s} AP {result.metrics['mask_AP']:6.2f}  mIoU {result.metrics['mIoU']:.3f}", flush=True)
    print(f"wrote {out} and {plot(record, out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
