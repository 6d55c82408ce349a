"""The product's entry point: the one ``misalign-monitor`` command and its demo."""
