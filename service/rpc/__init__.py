"""Generated from proto/misalign/v1/monitor.proto by scripts/gen_proto.sh; do not edit."""
