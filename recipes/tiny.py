"""Tiny Llama-style model (~4.5M parameters) on the offline default corpus: trains on a laptop CPU in minutes.

    python recipes/tiny.py                      # 200 steps, TensorBoard logs under lightning_logs/llama-tiny
    tensorboard --logdir lightning_logs
"""

from _cli import main

if __name__ == "__main__":
    main("tiny")
