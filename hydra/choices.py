"""The values of command-line options that several entry points share, in a module that imports nothing, so
the parsers (chat CLI, server, answer scripts) stay quick to load and name each set once."""

QUANT_CHOICES = ("int4", "int8")  # --quant: the base model's linear layers (hydra.model.quant)
HEADS_QUANT_CHOICES = ("auto", "none", "int8", "int4")  # --heads-quant (hydra.model.quant.heads_quant_for)

DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def add_model_options(parser, dtypes: tuple[str, ...] = DTYPE_CHOICES,
                      compile_help: str = "compile the base decoder (ahead of time on a CPU)") -> None:
    """--dtype, --device, --quant, --heads-quant and --compile, worded once for every entry point that loads a
    model through hydra.inference.loading.load_model; `compile_help` says what compiling costs there."""
    parser.add_argument("--dtype", default="bfloat16", choices=dtypes)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default=None,
                        help="CPU only: 4- or 8-bit weights for the base model (the default model's int4 is "
                             "its GGUF file's own); see README, Quantized base model")
    parser.add_argument("--heads-quant", choices=HEADS_QUANT_CHOICES, default="auto",
                        help="CPU only: the draft heads' weights in int8 or int4 (auto: the kind --quant "
                             "gives the base, else float); see README, Quantized base model")
    parser.add_argument("--compile", action="store_true", help=compile_help)
