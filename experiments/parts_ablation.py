"""A/B of closed-form compensation settings on one calibrated model (a fixed evaluation subset).

The model is calibrated once with the given overrides (stages up to ``calibrate``); each variant then
starts from that calibrated state, runs ``saq.ptq.compensate.compensate_`` with its settings (an empty
variant ``{}`` with ``"skip": true`` evaluates the calibrated model itself) and is evaluated on the same
images. Rows are appended to the JSON as they finish.

    python experiments/parts_ablation.py --out outputs/parts_subset32_s0.json \
        --variants '{"gptq_own": {"refit": false, "inputs": "own", "images": 4}}' \
        experiment=vit_t_coco quant=w4a4 ptq=saq_rc seed=0 data.max_images=32 'ptq.stages=[bimodal,calibrate]'
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from saq.data.calibration import cap_prompts
from saq.eval import evaluate
from saq.nn import quantize_
from saq.ptq.compensate import compensate_
from saq.ptq.recipe import rules_for_model
from saq.quant import QuantMode, set_quant_mode

from run_setup import compose_run, run_inputs, run_recipe_stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", required=True, help="JSON: name -> compensate_ keywords (+ images, skip)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    variants = json.loads(args.variants)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    cfg, config = compose_run(args.overrides)
    inputs = run_inputs(cfg, config)
    model, eval_set, eval_prompts = inputs.model, inputs.eval_set, inputs.eval_prompts
    recon_items = cap_prompts(inputs.calib_items, cfg.calib.max_prompts_per_image, int(cfg.calib.seed))
    quantize_(model, rules_for_model(model, config["quant"], config["ptq"]))
    stages = run_recipe_stages(inputs, cfg, config, recon_items)
    model.eval()
    calibrated = copy.deepcopy(model.state_dict())
    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    record.setdefault("runs", []).append({"overrides": args.overrides, "stages": {k: v for k, v in stages.items()
                                                                                   if k != "image_source"}})
    rows = record.setdefault("rows", {})
    for name, settings in variants.items():
        settings = dict(settings)
        model.load_state_dict(calibrated)
        info = None
        if not settings.pop("skip", False):
            count = int(settings.pop("images", 8))
            info = compensate_(model, recon_items[:count], show_progress=False, **settings)
        set_quant_mode(model, QuantMode.QUANTIZE)
        result = evaluate(model, eval_set, eval_prompts, name, int(cfg.eval.prompt_batch), False, 0)
        rows[name] = {"overrides": args.overrides, "variant": variants[name], "mask_AP": result.metrics["mask_AP"],
                      "mIoU": result.metrics["mIoU"], "compensate": info}
        args.out.write_text(json.dumps(record, indent=1))
        print(f"{name:24s} AP {result.metrics['mask_AP']:.2f}", flush=True)


if __name__ == "__main__":
    main()
