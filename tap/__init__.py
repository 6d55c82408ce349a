"""The vLLM plugin: projects the residual stream onto the bundle's directions inside the model
and streams the k numbers per token to the sidecar. Active only when configured."""
