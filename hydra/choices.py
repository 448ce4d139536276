"""The values of command-line options that several entry points share, in a module that imports nothing, so
the parsers (chat CLI, server, answer scripts) stay quick to load and name each set once."""

QUANT_CHOICES = ("int4", "int8")  # --quant: the base model's linear layers (hydra.model.quant)
HEADS_QUANT_CHOICES = ("auto", "none", "int8", "int4")  # --heads-quant (hydra.model.quant.heads_quant_for)
