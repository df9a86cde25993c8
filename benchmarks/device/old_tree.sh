#!/usr/bin/env bash
# For the device A/B scripts: /tmp/old = this tree with the files under .devold/ (their previous
# versions, carried) put back.  The carried chunks and data (.devcarry, .devdata) are left out,
# and so are this tree's build outputs (build/, the in-place extension): a failed old build
# must not leave /tmp/old importing the new one.
set -eo pipefail
rm -rf /tmp/old && mkdir -p /tmp/old
tar --exclude=./.devold --exclude=./.devcarry --exclude=./.devdata --exclude=./build \
  --exclude='./vllm_qoq/*.so' -cf - . | (cd /tmp/old && tar -xf -)
(cd .devold && find . -type f | while read -r f; do cp "$f" "/tmp/old/$f"; done)
