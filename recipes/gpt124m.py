"""GPT-2 124M (12 layers, 768 wide, 12 heads; learned positions, LayerNorm, GELU), batch 256 x 512 tokens, AdamW + cosine with the benchmark's settings.

    python recipes/gpt124m.py --trainer.devices 8                          # DDP on 8 GPUs
    python recipes/gpt124m.py --config recipes/configs/optim/muon.yaml     # another optimizer, benchmark settings
    python recipes/gpt124m.py --config recipes/configs/fsdp2.yaml          # FSDP2
    python recipes/gpt124m.py --ckpt_path last                             # resume the newest verified checkpoint
    python recipes/gpt124m.py --data.dataset HuggingFaceFW/fineweb-edu --data.dataset_config sample-10BT \
        --data.tokenizer gpt2 --data.max_tokens 3000000000             # the benchmark's data (needs the network)

The default data is the offline corpus (Python's standard library source, local BPE); see --help.
"""

from _cli import main

if __name__ == "__main__":
    main("124m", arch="gpt2", name="gpt124m")
