"""PTQ stages (calibration, later bimodal fold, PCC, reconstruction) and the pipeline that runs them.

``python -m saq.ptq`` runs the Hydra entry point (see saq/cli/ptq.py).
"""
