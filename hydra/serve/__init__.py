"""An OpenAI-compatible HTTP server (and a browser chat at /) for one model with its Hydra heads.

python -m hydra.serve                       # the shipped heads on the default model, 127.0.0.1:8000
python -m hydra.serve --model HEADS --port 8000 --max-queue 16
"""
