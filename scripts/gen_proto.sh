#!/usr/bin/env bash
# Regenerate the generated half of wire/ from proto/ (the one way generated code is made).
#   scripts/gen_proto.sh           write wire/monitor_pb2*.py
#   scripts/gen_proto.sh --check   fail if wire/ differs from what proto/ generates
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$PY" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/misalign/v1/monitor.proto
# protoc writes imports relative to the proto root; ours live in the wire package.
sed -i 's/^from misalign\.v1 import monitor_pb2/from wire import monitor_pb2/' \
  "$out/misalign/v1/monitor_pb2_grpc.py"
gen="$out/misalign/v1"
if [ "${1:-}" = "--check" ]; then
  for f in monitor_pb2.py monitor_pb2.pyi monitor_pb2_grpc.py; do
    if ! cmp -s "$gen/$f" "wire/$f"; then
      echo "wire/$f is out of date with proto/: run scripts/gen_proto.sh" >&2
      exit 1
    fi
  done
  echo "generated code is up to date"
else
  cp "$gen"/monitor_pb2.py "$gen"/monitor_pb2.pyi "$gen"/monitor_pb2_grpc.py wire/
fi
