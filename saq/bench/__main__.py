"""``python -m saq.bench <command> [arguments]``: dispatch to one benchmark's own command line."""

import importlib
import sys

COMMANDS = {
    "recipe": ("saq.bench.recipe", "a recipe's time and memory per stage and unit type, extrapolated"),
    "deploy": ("saq.bench.deploy", "an exported run on onnxruntime / OpenVINO: speed and agreement"),
    "profile": ("saq.bench.profile", "OpenVINO per-kernel times of an exported graph"),
    "memory": ("saq.bench.memory", "peak CPU memory of a recipe's reconstruction"),
    "recon-step": ("saq.bench.recon_step", "ms per reconstruction step per unit type, eager and compiled"),
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        lines = [f"  {name:11s} {about}" for name, (_, about) in COMMANDS.items()]
        print("usage: python -m saq.bench <command> [arguments] (<command> -h for its own)\n" + "\n".join(lines),
              file=sys.stderr)
        return 2
    command = sys.argv[1]
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"python -m saq.bench {command}", *sys.argv[2:]]
    result = module.main()
    return result if isinstance(result, int) else 0


raise SystemExit(main())
