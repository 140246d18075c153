#!/usr/bin/env bash
# The paper's SAM-B/L/H tables (COCO val2017, detector box prompts, W4A4 and W6A6, every recipe) as
# SLURM job arrays (cluster=slurm; site settings in the untracked conf/local/default.yaml). Needs the
# official checkpoints and COCO, named by environment variables:
#   SAM_CKPT_DIR  folder with sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth
#   COCO_DIR      folder with val2017/, train2017/, annotations/instances_{val,train}2017.json
#   DETECTIONS    detector boxes for val2017 (COCO results JSON), e.g. the DINO boxes the papers use
#   DRY_RUN=1     print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
run() { if [[ -n "${DRY_RUN:-}" ]]; then echo "$*"; else "$@"; fi; }
for var in SAM_CKPT_DIR COCO_DIR DETECTIONS; do
  if [[ -z "${!var:-}" && -z "${DRY_RUN:-}" ]]; then
    echo "experiments/paper_tables.sh: set $var (see the header of this script)" >&2; exit 2
  fi
done
SAM_CKPT_DIR=${SAM_CKPT_DIR:-/path/to/checkpoints}; COCO_DIR=${COCO_DIR:-/path/to/coco}
DETECTIONS=${DETECTIONS:-/path/to/detections.json}
DATA="data=coco data.images=$COCO_DIR/val2017 data.annotations=$COCO_DIR/annotations/instances_val2017.json"
DATA="$DATA prompts=detector prompts.path=$DETECTIONS calib.num_images=32 calib.prompts={source:gt}"
DATA="$DATA calib.data={name:coco_train2017,images:$COCO_DIR/train2017,annotations:$COCO_DIR/annotations/instances_train2017.json}"
for spec in vit_b:sam_vit_b_01ec64 vit_l:sam_vit_l_0b3195 vit_h:sam_vit_h_4b8939; do
  model=${spec%%:*}; ckpt=$SAM_CKPT_DIR/${spec#*:}.pth
  run $PY -m saq.ptq -m cluster=slurm model=$model model.checkpoint=$ckpt $DATA quant=w6a6,w4a4 \
    ptq=minmax,percentile,omse,ptq4sam_s,saq_star,brecq,qdrop,ptq4sam_l,saq_sam,saq_rc,saq_rc_gelu seed=0,1,2 \
    logger=none hydra.sweep.dir=outputs/paper_tables/$model
done
