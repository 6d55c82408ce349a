"""The contract between the tap and the sidecar, importing neither.

``monitor_pb2``, ``monitor_pb2_grpc`` (and ``.pyi``): generated from
proto/misalign/v1/monitor.proto by scripts/gen_proto.sh; do not edit them.
``codec``: the one ``StepBatch`` encoder and decoder. ``tls_files``: the PEM files both ends
of the channel read.
"""
