#!/usr/bin/env bash
# The colocated and split layouts, one focused bench each, one after the other (outputs under runs/).
set -x
cd "$(dirname "$0")/../../.."  # the repository root
COMMON="--scenarios acde --concurrency 16 --rates none --experts-table none --experts-paged none --hit-rate-requests 0 --no-cross-check"
.venv/bin/mode-cotd bench --output runs/layout-colocated $COMMON -- --layout colocated
.venv/bin/mode-cotd bench --output runs/layout-split $COMMON
