"""A token's role, as every part encodes it: in activations, in scores, and on the wire
(``StepBatch.is_response``, one int8 a row)."""

PROMPT, RESPONSE = 0, 1
