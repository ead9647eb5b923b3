"""Tiny Llama-style model (~2.6M parameters) on the offline default corpus: trains on a laptop CPU in minutes.

    python recipes/tiny.py                      # 250 steps, TensorBoard logs under lightning_logs/llama-tiny
    python recipes/tiny.py --ckpt_path last     # resume the newest verified checkpoint of this recipe
    tensorboard --logdir lightning_logs
"""

from _cli import main

if __name__ == "__main__":
    main("tiny")
